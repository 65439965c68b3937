"""Expert-parallel and tensor-parallel NVFP4 MoE on a device mesh (``jax.shard_map`` around
``fused_moe``).

* Expert parallel (``expert_axis``, size ``ep``): device ``d`` holds experts
  ``[d E/ep, (d+1) E/ep)`` of the stacked weights. Every device sees the same tokens, routes them
  over all ``E`` experts, and runs only its own through ``fused_moe``'s ``expert_map`` (global id
  -> local id, -1 elsewhere: those (token, expert) pairs contribute zero). The per-device
  outputs are summed.
* Tensor parallel (``tensor_axis``, size ``tp``): every expert's intermediate dim I is split.
  Device ``t`` holds rows ``[gate_t; up_t]`` of w13 (I/tp gate rows and the *matching* I/tp up
  rows; a plain contiguous split of ``[gate; up]`` would pair gate rows with gate rows) and the
  same I columns of w2. The activation is elementwise in I, so each device computes its slice of
  it and a partial down projection; the partials are summed. ``shard_moe_weights`` reorders w13
  (and its bias) once, so that the contiguous split along N is exactly that. A w13 prepared with
  ``gate_up_pairs=True`` needs no reordering (each 16-row tile holds 8 gate rows and the
  matching 8 up rows, so any split into whole tiles keeps the pairs together), only its bias
  is reordered, and each device's GEMM 1 then applies the activation in its epilogue.
* Both at once on a 2-D mesh, plus optional token sharding (``token_axis``): tokens split over
  an axis that also splits experts/I are all-gathered inside the layer and the result is
  reduce-scattered back; over any other axis they are plain data parallelism.

Results are summed in float32 (``psum`` / ``psum_scatter``) and cast to ``x.dtype`` once. Each
device's partial is itself rounded to ``x.dtype`` (``fused_moe``'s output type), so a sharded
layer differs from one device by about one ``x.dtype`` rounding per partial. A w2 bias is added
on tensor rank 0 only (once); the w13 bias is split with w13's rows.

Entry points: ``shard_moe_weights`` (once, at load time) and ``sharded_fused_moe``; for layers
that create their weights already sharded (``jax_nvfp4.nn``): ``moe_state_specs``,
``check_moe_split`` and ``gate_up_per_shard`` / ``gate_up_canonical``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_nvfp4.format import BLOCK_SIZE, NVFP4Weight
from jax_nvfp4.moe.activations import GPTOSS_ALPHA, is_gated
from jax_nvfp4.parallel._axes import (axes as _axes, check_disjoint_axes, entry as _entry,
                                      size as _size)
from jax_nvfp4.prepare import (CHUNK_K, GATE_UP_PAIR_ROWS, PreparedNVFP4Weight,
                               interleave_gate_up)


# ----------------------------------------------------------------------------- weights

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShardedMoEWeights:
  """An MoE layer's expert weights laid out over a mesh by ``shard_moe_weights``.

  Attributes:
    w13: stacked ``[E, N13, H]`` (``NVFP4Weight`` or ``PreparedNVFP4Weight``); with a tensor
      axis and a gated activation its rows are in the per-shard ``[gate_t; up_t]`` order (in
      ``gate_up_pairs`` order they stay so: each shard's whole tiles are its own pairs).
    w2: stacked ``[E, H, I]``.
    w13_bias, w2_bias: float32 ``[E, N13]`` (per-shard ``[gate_t; up_t]`` order with a tensor
      axis, also beside a ``gate_up_pairs`` w13) / ``[E, H]``, or None.
    mesh, expert_axis, tensor_axis, gated: static; how the arrays are laid out.
  """

  w13: Any
  w2: Any
  w13_bias: jax.Array | None
  w2_bias: jax.Array | None
  mesh: Mesh = dataclasses.field(metadata=dict(static=True))
  expert_axis: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
  tensor_axis: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
  gated: bool = dataclasses.field(metadata=dict(static=True))

  @property
  def num_experts(self) -> int:
    return self.w13.shape[0]

  @property
  def intermediate_size(self) -> int:
    return self.w2.shape[2]


def _stacked(w, name):
  if not isinstance(w, (NVFP4Weight, PreparedNVFP4Weight)):
    raise TypeError(f"shard_moe_weights: {name} must be a stacked NVFP4Weight or "
                    f"PreparedNVFP4Weight [E, N, K], got {type(w).__name__}")
  if len(w.shape) != 3:
    raise ValueError(f"shard_moe_weights: {name} must be stacked experts [E, N, K], got logical "
                     f"shape {tuple(w.shape)}")
  return tuple(int(d) for d in w.shape)


def _gate_up_per_shard(a, axis: int, tp: int):
  """Rows ``[gate; up]`` along ``axis`` -> ``[gate_0; up_0; gate_1; up_1; ...]``, each piece
  1/tp of I (for the prepared layout ``axis`` counts 16-row tiles)."""
  return interleave_gate_up(a, axis, tp)


def _gate_up_canonical(a, axis: int, tp: int):
  """Inverse of ``_gate_up_per_shard``: ``[gate_0; up_0; gate_1; up_1; ...]`` -> ``[gate; up]``."""
  return interleave_gate_up(a, axis, tp, inverse=True)


def _permute_w13(w13, tp: int, inverse: bool = False):
  f = _gate_up_canonical if inverse else _gate_up_per_shard
  if isinstance(w13, NVFP4Weight):
    return dataclasses.replace(w13, packed=f(w13.packed, 1, tp), scales=f(w13.scales, 1, tp))
  return dataclasses.replace(w13, qweight=f(w13.qweight, 1, tp), qscales=f(w13.qscales, 1, tp))


def _is_pairs(w13) -> bool:
  return isinstance(w13, PreparedNVFP4Weight) and w13.gate_up_pairs


def _check_pairs_split(w13, tp: int) -> None:
  """A ``gate_up_pairs`` w13 splits over ``tp`` tensor shards only into whole 16-row tiles
  (I/tp a multiple of 8): a tile split between two shards would part gate rows from their up
  rows."""
  inter = w13.n // 2
  if inter % (GATE_UP_PAIR_ROWS * tp):
    raise ValueError(f"gate/up reordering: a w13 in gate_up_pairs order with I = {inter} does "
                     f"not split over {tp} tensor shards into whole 16-row gate/up tiles: I must "
                     f"be a multiple of {GATE_UP_PAIR_ROWS * tp} (I/tp a multiple of "
                     f"{GATE_UP_PAIR_ROWS})")


def gate_up_per_shard(w13, tp: int, w13_bias=None):
  """Reorders the rows ``[gate; up]`` of a stacked w13 (and of its ``[E, N13]`` bias, if given)
  into ``[gate_0; up_0; ...; gate_{tp-1}; up_{tp-1}]``, so that a contiguous split of N over
  ``tp`` tensor shards gives shard ``t`` its own gate rows and the matching up rows (what
  ``shard_moe_weights`` does; the layers do it once, at creation). Exact. Returns
  ``(w13, w13_bias)``.

  A w13 prepared with ``gate_up_pairs=True`` is returned as it is: its 16-row tile j holds gate
  rows 8j..8j+7 and the matching up rows, so a contiguous split into whole tiles already gives
  every shard its own pairs, in pairs order (``ValueError`` unless I/tp is a multiple of 8).
  Only its bias is reordered (``fused_moe`` on each shard pairs that shard's bias itself)."""
  return _reorder_gate_up(w13, tp, w13_bias, inverse=False)


def gate_up_canonical(w13, tp: int, w13_bias=None):
  """Inverse of ``gate_up_per_shard``. Returns ``(w13, w13_bias)``: the bias in ``[gate; up]``
  order, w13 too unless it is in ``gate_up_pairs`` order (returned as it is)."""
  return _reorder_gate_up(w13, tp, w13_bias, inverse=True)


def _reorder_gate_up(w13, tp: int, w13_bias, *, inverse: bool):
  """``gate_up_per_shard`` (or with ``inverse``, ``gate_up_canonical``)."""
  if tp == 1:
    return w13, w13_bias
  reorder = _gate_up_canonical if inverse else _gate_up_per_shard
  bias = None if w13_bias is None else reorder(jnp.asarray(w13_bias), 1, tp)
  if _is_pairs(w13):
    _check_pairs_split(w13, tp)
    return w13, bias
  return _permute_w13(w13, tp, inverse=inverse), bias


def _spec_entries(prepared: bool, ea, n_axis, k_axis):
  """Spec tuples of (a, b, global_scale) of a stacked weight split on E, N and K."""
  if not prepared:
    return (ea, n_axis, k_axis), (ea, n_axis, k_axis), (ea,)
  return (ea, n_axis, k_axis, None, None), (ea, n_axis, k_axis, None), (ea,)


def _weight_specs(w, ea, n_axis, k_axis):
  """Specs of (a, b, global_scale) of a stacked weight split on E, N and K."""
  return tuple(P(*s) for s in _spec_entries(not isinstance(w, NVFP4Weight), ea, n_axis, k_axis))


def moe_state_specs(*, prepared: bool, expert_axis=None, tensor_axis=None) -> dict[str, tuple]:
  """The sharding of every array of an MoE layer under ``shard_moe_weights``' conventions, as
  tuples of mesh-axis entries (one per array dim; what nnx's ``out_sharding`` and Linen's
  ``nn.Partitioned`` names take):

  * ``"w13"``, ``"w2"``: a 3-tuple for the weight's arrays (packed/qweight, scales/qscales,
    global_scale): E over ``expert_axis``; w13's N (rows ``[gate_t; up_t]``) and w2's K (= I)
    over ``tensor_axis``; the remaining dims (and those of the prepared layout's fragments)
    whole.
  * ``"w13_bias"`` ``(expert, tensor)``, ``"w2_bias"`` ``(expert, None)``.
  * ``"router"`` ``(None, None)`` and ``"correction_bias"`` ``(None,)``: replicated.
  """
  ea, ta = _entry(_axes(expert_axis)), _entry(_axes(tensor_axis))
  return {"w13": _spec_entries(prepared, ea, ta, None), "w2": _spec_entries(prepared, ea, None, ta),
          "w13_bias": (ea, ta), "w2_bias": (ea, None), "router": (None, None),
          "correction_bias": (None,)}


def check_moe_split(mesh, num_experts: int, intermediate_size: int, *, prepared: bool,
                    expert_axis=None, tensor_axis=None,
                    who: str = "shard_moe_weights") -> tuple[int, int]:
  """Checks that an MoE layer's E experts and intermediate size I split over ``mesh`` (a
  ``Mesh`` or ``AbstractMesh``) with the given axes, as ``shard_moe_weights`` requires; returns
  ``(ep, tp)``, the sizes of the expert and tensor axes. ``ValueError`` naming the axis and the
  sizes otherwise: unknown or shared axes, ``E % ep != 0``, or ``I/tp`` not a multiple of 16
  (checkpoint layout: whole scale blocks of w2's K) / 64 (prepared: whole k64 chunks of w2 and
  whole 16-row tiles of w13)."""
  ea, ta = _axes(expert_axis), _axes(tensor_axis)
  check_disjoint_axes(mesh, ea, ta, who, f"expert_axis {ea} and tensor_axis {ta} share an axis")
  ep, tp = _size(mesh, ea), _size(mesh, ta)
  e, inter = num_experts, intermediate_size
  if e % ep:
    raise ValueError(f"{who}: E = {e} experts cannot be split over expert_axis "
                     f"{_entry(ea)!r} of size {ep}; E must be a multiple of {ep}")
  granule = CHUNK_K if prepared else BLOCK_SIZE
  if inter % (tp * granule):
    unit = "scale blocks (16)" if granule == BLOCK_SIZE else "kernel chunks (64)"
    raise ValueError(f"{who}: I = {inter} (w2's K) cannot be split over tensor_axis "
                     f"{_entry(ta)!r} of size {tp} into whole {unit}: I per shard = {inter}/{tp}"
                     f" must be a multiple of {granule}, so I a multiple of {tp * granule}")
  return ep, tp


def _arrays(w):
  if isinstance(w, NVFP4Weight):
    return (w.packed, w.scales, w.global_scale)
  return (w.qweight, w.qscales, w.global_scale)


def _with_arrays(w, arrays, n, k):
  a, b, gs = arrays
  if isinstance(w, NVFP4Weight):
    return NVFP4Weight(a, b, gs, dtype=w.dtype)
  return PreparedNVFP4Weight(a, b, gs, n=n, k=k, dtype=w.dtype, gate_up_pairs=w.gate_up_pairs)


def _weight_shardings(w, mesh, ea, n_axis, k_axis):
  specs = [NamedSharding(mesh, s) for s in _weight_specs(w, ea, n_axis, k_axis)]
  return _with_arrays(w, specs, getattr(w, "n", None), getattr(w, "k", None))


def shard_moe_weights(w13, w2, mesh: Mesh, *, expert_axis=None, tensor_axis=None,
                      activation: str = "swiglu", w13_bias=None,
                      w2_bias=None) -> ShardedMoEWeights:
  """Lays out stacked expert weights over ``mesh`` for ``sharded_fused_moe`` (call once).

  Args:
    w13: ``[E, N13, H]`` with rows ``[gate; up]`` (``N13 = 2I``) for gated activations or ``I``
      rows for ``relu2``; ``NVFP4Weight`` or stacked ``PreparedNVFP4Weight`` (gated: also one
      prepared with ``gate_up_pairs=True``, whose activation then runs in GEMM 1).
    w2: ``[E, H, I]``, same kind.
    mesh: the device mesh.
    expert_axis: mesh axis name (or tuple of names) splitting E, or None.
    tensor_axis: mesh axis name (or tuple) splitting I, or None.
    activation: the activation the layer will use (decides whether w13 is ``[gate; up]``).
    w13_bias, w2_bias: optional float ``[E, N13]`` / ``[E, H]``.

  Requirements (``ValueError`` naming the axis and sizes otherwise): ``E % ep == 0``;
  ``I % tp == 0`` with ``I/tp`` a multiple of 16 (checkpoint layout: whole scale blocks of w2's
  K) or of 64 (prepared layout: whole k64 chunks of w2, whole 16-row tiles of w13).
  """
  e, n13, h = _stacked(w13, "w13")
  e2, h2, inter = _stacked(w2, "w2")
  pairs = isinstance(w13, PreparedNVFP4Weight) and w13.gate_up_pairs
  if type(w13) is not type(w2):
    raise TypeError(f"shard_moe_weights: w13 and w2 must be the same kind, got "
                    f"{type(w13).__name__} and {type(w2).__name__}")
  if e2 != e or h2 != h:
    raise ValueError(f"shard_moe_weights: w13 [E, N13, H] = {(e, n13, h)} and w2 [E, H, I] = "
                     f"{(e2, h2, inter)} disagree on E or H")
  gated = is_gated(activation)
  if n13 != (2 * inter if gated else inter):
    raise ValueError(f"shard_moe_weights: activation {activation!r} with w2 [E, H, I = {inter}]"
                     f" needs w13 with {2 * inter if gated else inter} rows, got {n13}")
  ea, ta = _axes(expert_axis), _axes(tensor_axis)
  _, tp = check_moe_split(mesh, e, inter, prepared=not isinstance(w13, NVFP4Weight),
                          expert_axis=expert_axis, tensor_axis=tensor_axis)
  if w13_bias is not None:
    w13_bias = jnp.asarray(w13_bias, jnp.float32)
    if w13_bias.shape != (e, n13):
      raise ValueError(f"shard_moe_weights: w13_bias must be [E, N13] = {(e, n13)}, got "
                       f"{w13_bias.shape}")
  if w2_bias is not None:
    w2_bias = jnp.asarray(w2_bias, jnp.float32)
    if w2_bias.shape != (e, h):
      raise ValueError(f"shard_moe_weights: w2_bias must be [E, H] = {(e, h)}, got "
                       f"{w2_bias.shape}")
  if pairs and not gated:
    raise ValueError(f"shard_moe_weights: w13 was prepared with gate_up_pairs=True, which only "
                     f"a gated activation reads, but activation is {activation!r}")
  if gated:  # a gate_up_pairs w13 stays as it is (whole tiles per shard); its bias moves
    w13, w13_bias = gate_up_per_shard(w13, tp, w13_bias)
  e_, t_ = _entry(ea), _entry(ta)
  put = lambda v, s: None if v is None else jax.device_put(v, s)
  return ShardedMoEWeights(
      w13=put(w13, _weight_shardings(w13, mesh, e_, t_, None)),
      w2=put(w2, _weight_shardings(w2, mesh, e_, None, t_)),
      w13_bias=put(w13_bias, NamedSharding(mesh, P(e_, t_))),
      w2_bias=put(w2_bias, NamedSharding(mesh, P(e_, None))),
      mesh=mesh, expert_axis=ea, tensor_axis=ta, gated=gated)


# ----------------------------------------------------------------------------- the layer

def sharded_fused_moe(x: jax.Array, weights: ShardedMoEWeights, *, token_axis=None,
                      router_logits: jax.Array | None = None,
                      topk_weights: jax.Array | None = None, topk_ids: jax.Array | None = None,
                      top_k: int | None = None, routing=None, activation: str = "swiglu",
                      limit: float | None = None, alpha: float = GPTOSS_ALPHA,
                      block_m: int | None = None, backend: str | None = None) -> jax.Array:
  """``fused_moe`` with expert weights split over a mesh (see the module docstring).

  Args:
    x: ``[M, H]`` (or ``[..., H]``) bfloat16/float16 tokens.
    weights: from ``shard_moe_weights`` (its mesh, expert and tensor axes are used).
    token_axis: mesh axis (or tuple) that splits M, or None (tokens replicated). M must be a
      multiple of its size. Where it is also an expert/tensor axis the tokens are all-gathered
      inside the layer and the output reduce-scattered back.
    router_logits, topk_weights, topk_ids, top_k, routing, activation, limit, alpha, block_m,
      backend: as in ``fused_moe`` (routing is over all ``E`` global experts; ids are global).

  Returns:
    ``[..., H]`` in ``x.dtype``, laid out like ``x`` (split over ``token_axis``): the full
    layer, i.e. equal to ``fused_moe`` on one device up to the rounding of per-device partials.
  """
  from jax_nvfp4.ops.moe import fused_moe  # the layer itself; imports this package's siblings

  if not isinstance(weights, ShardedMoEWeights):
    raise TypeError(f"sharded_fused_moe: weights must come from shard_moe_weights, got "
                    f"{type(weights).__name__}")
  if is_gated(activation) != weights.gated:
    raise ValueError(f"sharded_fused_moe: activation {activation!r} does not match the "
                     f"{'gated' if weights.gated else 'non-gated'} layout shard_moe_weights "
                     f"was given")
  mesh, ea, ta = weights.mesh, weights.expert_axis, weights.tensor_axis
  xa = _axes(token_axis)
  for a in xa:
    if a not in mesh.shape:
      raise ValueError(f"sharded_fused_moe: token_axis {a!r} is not an axis of the mesh "
                       f"{dict(mesh.shape)}")
  x = jnp.asarray(x)
  lead, hidden = x.shape[:-1], x.shape[-1]
  m = int(np.prod(lead))
  xs = _size(mesh, xa)
  if m % xs:
    raise ValueError(f"sharded_fused_moe: M = {m} tokens cannot be split over token_axis "
                     f"{_entry(xa)!r} of size {xs}; M must be a multiple of {xs}")
  e = weights.num_experts
  ep, tp = _size(mesh, ea), _size(mesh, ta)
  e_local, inter_local = e // ep, weights.intermediate_size // tp
  n13_local = (2 if weights.gated else 1) * inter_local

  # Routing inputs travel with their tokens. Their last dim is kept as it is (not -1: with zero
  # tokens, m = 0, reshape cannot infer it).
  tokens = lambda v: jnp.asarray(v).reshape(m, jnp.shape(v)[-1])
  if router_logits is not None:
    route_in = {"router_logits": tokens(router_logits)}
  else:
    if topk_weights is None or topk_ids is None:
      raise ValueError("sharded_fused_moe: give router_logits or both topk_weights and topk_ids")
    route_in = {"topk_weights": tokens(topk_weights), "topk_ids": tokens(topk_ids)}
  gather_axes = tuple(a for a in xa if a in ea + ta)     # tokens that must meet all experts
  sum_axes = tuple(a for a in ea + ta if a not in gather_axes)
  x_entry, e_, t_ = _entry(xa), _entry(ea), _entry(ta)

  w13_specs = _weight_specs(weights.w13, e_, t_, None)
  w2_specs = _weight_specs(weights.w2, e_, None, t_)
  b13, b2 = weights.w13_bias, weights.w2_bias
  operands = (x.reshape(m, hidden), route_in, _arrays(weights.w13), _arrays(weights.w2), b13, b2)
  in_specs = (P(x_entry, None), {k: P(x_entry, None) for k in route_in}, w13_specs, w2_specs,
              None if b13 is None else P(e_, t_), None if b2 is None else P(e_, None))

  def body(x, route_in, w13_arrays, w2_arrays, b13, b2):
    if gather_axes:
      x, route_in = jax.tree.map(lambda v: jax.lax.all_gather(v, gather_axes, axis=0, tiled=True),
                                 (x, route_in))
    expert_map = None
    if ep > 1:
      first = jax.lax.axis_index(ea) * e_local
      ids = jnp.arange(e, dtype=jnp.int32)
      expert_map = jnp.where((ids >= first) & (ids < first + e_local), ids - first, -1)
    if b2 is not None and tp > 1:
      b2 = jnp.where(jax.lax.axis_index(ta) == 0, b2, 0.0)  # added once, not tp times
    w13 = _with_arrays(weights.w13, w13_arrays, n13_local, hidden)
    w2 = _with_arrays(weights.w2, w2_arrays, hidden, inter_local)
    y = fused_moe(x, w13, w2, **route_in, top_k=top_k, routing=routing, activation=activation,
                  limit=limit, alpha=alpha, w13_bias=b13, w2_bias=b2, expert_map=expert_map,
                  block_m=block_m, backend=backend)
    y = y.astype(jnp.float32)
    if sum_axes:
      y = jax.lax.psum(y, sum_axes)
    if gather_axes:
      y = jax.lax.psum_scatter(y, gather_axes, scatter_dimension=0, tiled=True)
    return y.astype(x.dtype)

  out = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P(x_entry, None),
                      check_vma=False)(*operands)
  return out.reshape(*lead, hidden)

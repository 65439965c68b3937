"""Sharding rules for ``nvfp4_matmul``: the op partitioned over a device mesh without gathers.

Without rules XLA treats the dense op's custom call as opaque: it all-gathers every operand and
runs the whole product on every device. Here the op is wrapped in
``jax.experimental.custom_partitioning`` with a Shardy sharding rule (and the GSPMD callbacks),
and each device runs the single-device op on its own shards. The schemes, all composable on one
mesh (say ``("data", "model")``):

* data parallel: ``x``/``out`` sharded on leading (token) dims, weight replicated;
* column parallel: weight, bias and ``out``'s last dim sharded on N;
* row parallel: weight and ``x``'s last dim sharded on K. Each device computes a partial product
  (global scale applied per shard: it is a scalar, so the sum is unchanged), the partials are
  summed in float32 with one ``psum`` over the K axes, then the bias is added once and the
  result cast to ``x.dtype``. The partials are rounded to ``x.dtype`` first (the op's output
  type), so row parallel differs from one device by about one ``x.dtype`` rounding per partial.

The weight's sharding decides: ``x``, ``bias`` and the output are laid out to match it, never the
other way round (moving activations is cheap, moving weights is what we avoid). Where the weight's
sharding cannot be split into whole blocks a ``ValueError`` names the mesh axis, the dim and
the sizes (when the XLA partitioner calls back, it arrives wrapped in XLA's runtime error);
``weight_shardings`` checks a layout before any compilation.

Per layout, for a logical weight ``[N, K]`` and ``s`` devices along an axis:

* ``NVFP4Weight`` (``packed [N, K/2]``, ``scales [N, K/16]``): N sharding splits dim 0 of both
  (``N % s == 0``); K sharding splits dim 1 of both and needs ``K % (16 s) == 0`` (whole
  scale blocks).
* ``PreparedNVFP4Weight`` (``qweight [N16, K64, 32, 4]``, ``qscales [N16, K64, 64]``): N
  sharding splits dim 0 and needs ``N % (16 s) == 0``, K sharding dim 1 and ``K % (64 s) == 0``.
  Tiles and chunks never mix rows/columns of different tiles/chunks and padding sits only at the
  end, so a shard of a prepared weight is exactly ``prepare`` of the weight's shard.

Entry points: ``partitioned_matmul`` (what ``nvfp4_matmul`` calls), ``weight_shardings``,
``shard_weight``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_nvfp4.format import BLOCK_SIZE, NVFP4Weight
from jax_nvfp4.parallel._axes import (axes as _axes, check_disjoint_axes, entry as _entry,
                                      size as _size)
from jax_nvfp4.prepare import CHUNK_K, TILE_N, PreparedNVFP4Weight

CHECKPOINT = "checkpoint"
PREPARED = "prepared"

# ----------------------------------------------------------------------------- routing guard
#
# nvfp4_matmul routes through partitioned_matmul, whose per-shard body calls nvfp4_matmul again
# with local shapes; the guard makes that inner call take the single-device path.

_state = threading.local()


@contextlib.contextmanager
def _single_device_body():
  previous = getattr(_state, "local", False)
  _state.local = True
  try:
    yield
  finally:
    _state.local = previous


def routing() -> bool:
  """Whether ``nvfp4_matmul`` should go through the partitioned op (False inside a shard)."""
  return not getattr(_state, "local", False)


# ----------------------------------------------------------------------------- static config

@dataclasses.dataclass(frozen=True)
class _Config:
  """What the partitioned op needs to know statically: layout, logical [N, K], bias, dtype."""
  layout: str
  n: int
  k: int
  has_bias: bool
  wdtype: Any

  def weight(self, a, b, gs):
    if self.layout == CHECKPOINT:
      return NVFP4Weight(a, b, gs, dtype=self.wdtype)
    return PreparedNVFP4Weight(a, b, gs, n=self.n, k=self.k, dtype=self.wdtype)

  def local(self, n_shards: int, k_shards: int) -> _Config:
    return dataclasses.replace(self, n=self.n // n_shards, k=self.k // k_shards)

  @property
  def granule(self) -> tuple[int, int]:
    """(rows, columns) of the smallest piece a shard may hold."""
    return (1, BLOCK_SIZE) if self.layout == CHECKPOINT else (TILE_N, CHUNK_K)


def _config(w, has_bias: bool) -> _Config:
  if isinstance(w, PreparedNVFP4Weight):
    return _Config(PREPARED, w.n, w.k, has_bias, w.dtype)
  return _Config(CHECKPOINT, w.packed.shape[-2], 2 * w.packed.shape[-1], has_bias, w.dtype)


def _weight_arrays(w):
  if isinstance(w, PreparedNVFP4Weight):
    return (w.qweight, w.qscales, w.global_scale)
  return (w.packed, w.scales, w.global_scale)


# ----------------------------------------------------------------------------- sharding checks

def _check_split(cfg: _Config, mesh, n_axes, k_axes) -> None:
  rows, cols = cfg.granule
  what = "NVFP4Weight" if cfg.layout == CHECKPOINT else "PreparedNVFP4Weight"
  for dim, total, axes, granule, unit in (
      ("N", cfg.n, n_axes, rows, "rows (one kernel tile)"),
      ("K", cfg.k, k_axes, cols, "columns (one " + ("scale block)" if cfg.layout == CHECKPOINT
                                                     else "kernel chunk)"))):
    if not axes:
      continue
    s = _size(mesh, axes)
    if total % (s * granule):
      need = f"a multiple of {granule} {unit}" if granule > 1 else "a whole number"
      raise ValueError(
          f"nvfp4_matmul sharding: the {what}'s {dim} dim (size {total}) is sharded over mesh "
          f"axis {_entry(axes)!r} of size {s}, but {dim} per shard = {total}/{s} must be {need}; "
          f"{dim} must be a multiple of {s * granule}. Shard another dim or use a smaller axis.")


def _weight_specs(cfg: _Config, n_axes, k_axes):
  """PartitionSpecs of (a, b, global_scale) for the layout."""
  n, k = _entry(n_axes), _entry(k_axes)
  if cfg.layout == CHECKPOINT:
    return (P(n, k), P(n, k), P())
  return (P(n, k, None, None), P(n, k, None), P())


def check_weight_split(n: int, k: int, mesh, *, prepared: bool, n_axis=None, k_axis=None,
                       who: str = "check_weight_split") -> None:
  """Raises ``ValueError`` unless a logical ``[N, K]`` weight in the given layout splits into
  whole blocks over ``mesh`` (a ``Mesh`` or ``AbstractMesh``) with ``n_axis`` / ``k_axis`` (names,
  tuples of names or None): the axes must exist and differ, and N, K divide as the module
  docstring says. The message names the mesh axis, the dim and the sizes."""
  n_axes, k_axes = _axes(n_axis), _axes(k_axis)
  check_disjoint_axes(mesh, n_axes, k_axes, who,
                      f"N and K cannot share mesh axes ({n_axes} vs {k_axes})")
  _check_split(_Config(PREPARED if prepared else CHECKPOINT, int(n), int(k), False, None), mesh,
               n_axes, k_axes)


def weight_shardings(w: NVFP4Weight | PreparedNVFP4Weight, mesh: Mesh, *, n_axis=None,
                     k_axis=None):
  """The ``NamedSharding`` pytree (same structure as ``w``) that splits ``w`` over ``mesh``.

  ``n_axis`` / ``k_axis``: a mesh axis name, a tuple of names, or None (replicated), for the
  logical N (output) and K (input) dims. Raises ``ValueError`` if the split does not fall on
  whole blocks (see the module docstring).
  """
  if not isinstance(w, (NVFP4Weight, PreparedNVFP4Weight)):
    raise TypeError(f"weight_shardings: w must be an NVFP4Weight or PreparedNVFP4Weight, got "
                    f"{type(w).__name__}")
  if len(w.shape) != 2:
    raise ValueError(f"weight_shardings: w must be a single [N, K] weight, got logical shape "
                     f"{tuple(w.shape)}; for stacked experts use "
                     "jax_nvfp4.parallel.shard_moe_weights")
  n_axes, k_axes = _axes(n_axis), _axes(k_axis)
  cfg = _config(w, False)
  check_weight_split(cfg.n, cfg.k, mesh, prepared=cfg.layout == PREPARED, n_axis=n_axis,
                     k_axis=k_axis, who="weight_shardings")
  specs = [NamedSharding(mesh, s) for s in _weight_specs(cfg, n_axes, k_axes)]
  if cfg.layout == CHECKPOINT:
    return dataclasses.replace(w, packed=specs[0], scales=specs[1], global_scale=specs[2])
  return dataclasses.replace(w, qweight=specs[0], qscales=specs[1], global_scale=specs[2])


def shard_weight(w, mesh: Mesh, *, n_axis=None, k_axis=None):
  """``jax.device_put(w, weight_shardings(w, mesh, n_axis=..., k_axis=...))``."""
  return jax.device_put(w, weight_shardings(w, mesh, n_axis=n_axis, k_axis=k_axis))


# ----------------------------------------------------------------------------- partitioning

def _spec(shape_with_sharding, ndim: int) -> tuple:
  sharding = getattr(shape_with_sharding, "sharding", None)
  spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
  return spec + (None,) * (ndim - len(spec))


def _plan(cfg: _Config, mesh, arg_shapes, *, check: bool = True):
  """Shardings of every operand and of the result, decided by the weight's sharding."""
  x, a = arg_shapes[0], arg_shapes[1]
  a_spec = _spec(a, len(a.shape))
  n_axes, k_axes = _axes(a_spec[0]), _axes(a_spec[1])
  if check:
    _check_split(cfg, mesh, n_axes, k_axes)
  used = set(n_axes) | set(k_axes)
  lead = []
  for entry in _spec(x, len(x.shape))[:-1]:
    axes = _axes(entry)
    if used & set(axes):  # a token dim on a weight axis: x is regathered along it
      axes = ()
    used |= set(axes)
    lead.append(_entry(axes))
  named = lambda spec: NamedSharding(mesh, spec)
  args = [named(P(*lead, _entry(k_axes)))] + [named(s) for s in _weight_specs(cfg, n_axes, k_axes)]
  if cfg.has_bias:
    args.append(named(P(_entry(n_axes))))
  return named(P(*lead, _entry(n_axes))), tuple(args), n_axes, k_axes


def _infer(cfg, mesh, arg_shapes, result_shape):
  # GSPMD aborts the process on an exception raised here; _partition raises it instead.
  del result_shape
  return _plan(cfg, mesh, arg_shapes, check=False)[0]


def _partition(cfg, mesh, arg_shapes, result_shape):
  del result_shape
  out_sharding, arg_shardings, n_axes, k_axes = _plan(cfg, mesh, arg_shapes)
  local = cfg.local(_size(mesh, n_axes), _size(mesh, k_axes))

  def shard_body(x, a, b, gs, *bias):
    # A per-device body: no mesh in context (under jax.set_mesh with Explicit axes, jnp ops would
    # otherwise emit sharding annotations that the already-partitioned body cannot take).
    with jax.sharding.use_abstract_mesh(_NO_MESH):
      return _shard_body(local, k_axes, x, a, b, gs, *bias)

  return mesh, shard_body, out_sharding, arg_shardings


_NO_MESH = jax.sharding.AbstractMesh((), ())


def _shard_body(local: _Config, k_axes, x, a, b, gs, *bias):
  """One device's part: its shards in, its output shard out (summed over the K axes)."""
  if not k_axes:
    return _local_matmul(local, x, a, b, gs, *bias)
  partial = _local_matmul(dataclasses.replace(local, has_bias=False), x, a, b, gs)
  total = jax.lax.psum(partial.astype(jnp.float32), k_axes)
  if bias:
    total = total + bias[0]
  return total.astype(x.dtype)


def _sharding_rule(cfg, mesh, value_types, result_types):
  """Shardy rule. Compound factors tie x's K to the weight's block/chunk dim, and N to tiles."""
  del mesh, value_types, result_types
  sizes = {}
  if cfg.layout == CHECKPOINT:
    # K = kb blocks * 16 elements = kb * 8 packed bytes.
    x_k, w_dims, out_n = "(kb ke)", ["n (kb kp)", "n kb"], "n"
    sizes.update(ke=BLOCK_SIZE, kp=BLOCK_SIZE // 2)
    reduction = ("kb",)
  else:
    n_tiled, k_tiled = cfg.n % TILE_N == 0, cfg.k % CHUNK_K == 0
    # Unaligned N/K cannot be split (the padding would land in one shard): the weight's tile
    # factor is then not tied to x/out, and _check_split rejects sharding it.
    out_n = "(nt nr)" if n_tiled else "n"
    x_k = "(kc kx)" if k_tiled else "k"
    if n_tiled:
      sizes["nr"] = TILE_N
    if k_tiled:
      sizes["kx"] = CHUNK_K
    w_dims = ["nt kc l j", "nt kc s"]
    reduction = ("kc",) if k_tiled else ("k", "kc")  # in order of first use (Shardy wants so)
  operands = [f"... {x_k}", *w_dims, ""] + ([out_n] if cfg.has_bias else [])
  return f"{', '.join(operands)} -> ... {out_n}", dict(reduction_factors=reduction, **sizes)


def _local_matmul(cfg: _Config, x, a, b, gs, *bias):
  from jax_nvfp4.ops.dense import nvfp4_matmul  # circular: ops.dense routes through here
  with _single_device_body():
    return nvfp4_matmul(x, cfg.weight(a, b, gs), bias[0] if bias else None)


_partitioned = custom_partitioning(_local_matmul, static_argnums=(0,))
_partitioned.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                           sharding_rule=_sharding_rule)


@functools.lru_cache(maxsize=None)
def _vmappable(cfg: _Config):
  """The partitioned op with a batching rule (custom_partitioning itself has none)."""

  @jax.custom_batching.custom_vmap
  def op(x, arrays, bias):
    return _partitioned(cfg, x, *arrays, *(() if bias is None else (bias,)))

  @op.def_vmap
  def _batched(axis_size, in_batched, x, arrays, bias):
    x_batched, arrays_batched, bias_batched = in_batched
    if not any(jax.tree.leaves((arrays_batched, bias_batched))):
      # Only x is batched (at dim 0): a leading dim folds into M.
      return op(x, arrays, bias), True
    grow = lambda v, batched: v if batched else jnp.broadcast_to(v, (axis_size, *v.shape))
    x, arrays, bias = jax.tree.map(grow, (x, arrays, bias), (x_batched, arrays_batched,
                                                              bias_batched))
    return jax.lax.map(lambda ops: op(*ops), (x, arrays, bias)), True

  return op


def partitioned_matmul(x: jax.Array, w: NVFP4Weight | PreparedNVFP4Weight,
                       bias: jax.Array | None = None) -> jax.Array:
  """``nvfp4_matmul(x, w, bias)`` (same arguments and result) with the sharding rules above.

  On one device it lowers to exactly the single-device op. ``bias`` is float32 ``[N]`` or None
  (``nvfp4_matmul`` converts it before calling).
  """
  cfg = _config(w, bias is not None)
  arrays = _weight_arrays(w)
  sharding = None if isinstance(arrays[0], jax.core.Tracer) else getattr(arrays[0], "sharding",
                                                                          None)
  if isinstance(sharding, NamedSharding) and len(arrays[0].shape) >= 2:
    # A concrete, already placed weight (eager call): check its split now rather than when XLA
    # partitions (inside jit the check runs there, see _partition).
    spec = tuple(sharding.spec) + (None, None)
    _check_split(cfg, sharding.mesh, _axes(spec[0]), _axes(spec[1]))
  if not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves((x, arrays, bias))):
    # An eager call runs through jit too: only under jit does the partitioner split the op. Run
    # op by op, the reference lowering's jnp ops (reshapes, table lookups) would see a weight
    # sharded over Explicit mesh axes (jax.make_mesh's default) and reject it.
    return _jitted(cfg, x, arrays, bias)
  return _vmappable(cfg)(x, arrays, bias)


@functools.partial(jax.jit, static_argnums=0)
def _jitted(cfg: _Config, x, arrays, bias):
  return _vmappable(cfg)(x, arrays, bias)

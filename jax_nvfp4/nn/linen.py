"""Flax Linen layers with NVFP4 weights: ``NVFP4Dense`` (and ``NVFP4MoE``, below).

Collections. The float parameters (the bias; the MoE router) live in ``"params"``; the NVFP4
arrays live in a separate collection, ``"nvfp4"`` by default, so an optimizer over
``variables["params"]`` never sees them and ``jax.grad`` over the params gives no gradient for
them (the weight is frozen). Inside ``"nvfp4"`` each layer stores the arrays of its weight pytree
under the field names: ``packed``, ``scales``, ``global_scale`` (checkpoint layout) or
``qweight``, ``qscales``, ``global_scale`` plus ``shape`` (kernel layout, ``prepare=True``).

The kernel layout pads N to 16-row tiles and K to 64-column chunks, so its arrays do not tell
the weight's logical ``[N, K]`` apart from a slightly smaller one. ``shape`` records it: a
small uint8 array of zeros whose *shape* ``(rows, blocks)`` says how much of the last tile and
chunk the weight fills (``rows = N - 16 (N16 - 1)`` in 1..16, ``blocks = K/16 - 4 (K64 - 1)``
16-column blocks in 1..4; with the arrays' ``N16``, ``K64`` and leading dims it gives the
logical shape). The information is in the shape, which is static, so it survives ``jax.jit``
and unboxing; the array is at most 64 bytes and never empty (orbax refuses to save empty
arrays). Apply compares it with the module's ``[features, in]`` (``ValueError`` on a mismatch,
or when a kernel-layout weight lacks it). A gated MoE w13 in ``gate_up_pairs`` row order
(``prepare(w13, gate_up_pairs=True)``, which lets GEMM 1 apply the activation) has a second
record, ``gate_up_pairs``: uint8 zeros of shape ``(8,)`` (8 rows per half of a gate/up pair).
The arrays of both row orders look alike, so the record is what apply reads the order from;
without it the rows are ``[gate; up]``, the layout of state written before this record existed.
``weight_variables`` builds a weight's variables, records included. State written with the
earlier, empty records (``shape`` of shape ``(*logical_shape, 0)``, ``gate_up_pairs`` of shape
``(8, 0)``, ``w13_gate_up_shards`` of shape ``(tp, 0)``) is still read.

Init and apply::

    layer = NVFP4Dense(features=256)
    variables = layer.init(jax.random.key(0), x)   # {"params": {"bias"}, "nvfp4": {...}}
    y = layer.apply(variables, x)                   # pass BOTH collections

``init`` draws a float ``[in, features]`` kernel with ``kernel_init`` from the ``"params"`` rng
(the same draw ``nn.Dense`` makes, in the same order as its kernel and bias), transposes and
quantizes it. At apply time the stored layout is used as it is (``prepare`` only matters at
init). ``quantize_dense_variables`` converts the variables of a trained ``nn.Dense`` instead.

Dtypes follow the NNX layers: ``dtype`` None/bf16/fp16; with None, float32 inputs are computed in
bfloat16 and returned as float32, and bf16/fp16 inputs give bf16/fp16 outputs (``nn.Dense``
would promote them to a float32 bias's dtype).

Gradients: ``NVFP4Dense`` is differentiable in its input and bias (the NVFP4 weight is frozen),
in reverse mode and to first order only (a custom VJP): no ``jax.jvp`` / ``jax.jacfwd``, no
second derivatives. ``NVFP4MoE`` is inference only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jax_nvfp4.format import BLOCK_SIZE, NVFP4Weight, quantize
from jax_nvfp4.nn import _common, _sharding
from jax_nvfp4.parallel import moe as parallel_moe
from jax_nvfp4.prepare import CHUNK_K, GATE_UP_PAIR_ROWS, TILE_N, PreparedNVFP4Weight

COLLECTION = "nvfp4"
#: Name (after the prefix) of the kernel layout's logical-shape record (module docstring).
SHAPE_FIELD = "shape"
#: Name of the MoE record of w13's per-shard row order (``NVFP4MoE``'s docstring).
GATE_UP_FIELD = "w13_gate_up_shards"
#: Name (after the prefix) of the record of a kernel-layout weight in ``gate_up_pairs`` row order.
PAIRS_FIELD = "gate_up_pairs"
default_kernel_init = nn.initializers.lecun_normal()


def weight_variables(w: NVFP4Weight | PreparedNVFP4Weight, *, prepare: bool | None = None,
                     prefix: str = "") -> dict[str, jax.Array]:
  """The arrays a Linen layer stores for weight ``w`` in its NVFP4 collection, named
  ``prefix + field``: ``packed``/``scales``/``global_scale``, or ``qweight``/``qscales``/
  ``global_scale``/``shape`` (the logical-shape record) for the kernel layout, plus the record
  ``gate_up_pairs`` when ``w`` is a ``PreparedNVFP4Weight`` in that row order (kept as it is in
  the kernel layout). ``prepare``: the layout wanted (True/False, converted exactly), or None to
  keep ``w``'s."""
  if not isinstance(w, (NVFP4Weight, PreparedNVFP4Weight)):
    raise TypeError(f"weight_variables: w must be an NVFP4Weight or PreparedNVFP4Weight, got "
                    f"{type(w).__name__}")
  prepared = isinstance(w, PreparedNVFP4Weight) if prepare is None else bool(prepare)
  pairs = prepared and getattr(w, "gate_up_pairs", False)
  w = _common.to_layout(w, prepared, pairs)
  fields = _common.PREPARED_FIELDS if prepared else _common.CHECKPOINT_FIELDS
  out = {prefix + f: a for f, a in zip(fields, _common.weight_arrays(w))}
  if prepared:
    out[prefix + SHAPE_FIELD] = _shape_record(w.shape)
  if pairs:
    out[prefix + PAIRS_FIELD] = _pairs_record()
  return out


# The records (module docstring) are small zero arrays whose shape is the information: shapes
# are static under jit, and a non-empty array is one every checkpointer saves.

def _shape_record(logical) -> jax.Array:
  """uint8 zeros ``(rows, blocks)``: the rows of ``[.., N, K]`` in its last 16-row tile and its
  16-column blocks in its last 64-column chunk."""
  n, k = (int(d) for d in logical[-2:])
  rows = n - TILE_N * (-(-n // TILE_N) - 1)
  blocks = (k - CHUNK_K * (-(-k // CHUNK_K) - 1)) // BLOCK_SIZE
  return jnp.zeros((rows, blocks), jnp.uint8)


def _pairs_record() -> jax.Array:
  """uint8 zeros ``(8,)``: the rows per half of a gate/up pair (NNX's ``LayoutRecord``)."""
  return jnp.zeros((GATE_UP_PAIR_ROWS,), jnp.uint8)


def _shards_record(gate_up_shards: int) -> jax.Array:
  """uint8 zeros ``(tp,)``: the tensor-axis size w13's rows and bias are stored for."""
  return jnp.zeros((int(gate_up_shards),), jnp.uint8)


def _record_shape(module: nn.Module, collection: str, name: str) -> tuple[int, ...] | None:
  record = _get(module, collection, name)
  shape = getattr(record, "shape", None)
  return None if shape is None else tuple(int(d) for d in shape)


def _stored_shape(module: nn.Module, collection: str, prefix: str, qweight_shape, who: str):
  """The logical shape of a kernel-layout weight with ``qweight_shape``, from its record."""
  name = prefix + SHAPE_FIELD
  if not module.has_variable(collection, name):
    raise ValueError(f"{who}: the {collection!r} collection holds a kernel-layout (prepared) "
                     f"{prefix}weight without its logical-shape record {name!r}: the layout pads "
                     "N to 16 and K to 64, so the shape cannot be read from the arrays. Build "
                     "the variables with jax_nvfp4.nn.linen.weight_variables (or init, "
                     "quantize_dense_variables, moe_variables)")
  shape = _record_shape(module, collection, name)
  if shape and len(shape) >= 2 and shape[-1] == 0:  # the earlier, empty record
    return shape[:-1]
  if (shape is None or len(shape) != 2 or not 1 <= shape[0] <= TILE_N
      or not 1 <= shape[1] <= CHUNK_K // BLOCK_SIZE or len(qweight_shape) < 4):
    raise ValueError(f"{who}: {name!r} must be a record of shape (rows, blocks) with rows in "
                     f"1..{TILE_N} and blocks in 1..{CHUNK_K // BLOCK_SIZE} (or, from earlier "
                     f"state, of shape (*logical_shape, 0)), got shape {shape}")
  *lead, n16, k64 = qweight_shape[:-2]
  rows, blocks = shape
  return (*lead, TILE_N * (n16 - 1) + rows, CHUNK_K * (k64 - 1) + BLOCK_SIZE * blocks)


def _stored_pairs(module: nn.Module, collection: str, prefix: str, prepared: bool,
                  who: str) -> bool:
  """Whether the stored weight's rows are in ``gate_up_pairs`` order (its record is there)."""
  name = prefix + PAIRS_FIELD
  if not module.has_variable(collection, name):
    return False
  shape = _record_shape(module, collection, name)
  if shape not in ((GATE_UP_PAIR_ROWS,), (GATE_UP_PAIR_ROWS, 0)):  # (8, 0): earlier state
    raise ValueError(f"{who}: {name!r} must be the gate_up_pairs record, of shape "
                     f"({GATE_UP_PAIR_ROWS},) (or ({GATE_UP_PAIR_ROWS}, 0) from earlier state), "
                     f"got shape {shape}")
  if not prepared:
    raise ValueError(f"{who}: the {collection!r} collection holds the gate_up_pairs record "
                     f"{name!r} beside a checkpoint-layout {prefix}weight ({prefix}packed), "
                     "whose rows are always [gate; up]: the record belongs to other state")
  return True


def _boxed(value, spec):
  """``value`` in an ``nn.Partitioned`` box naming its mesh axes (as is when ``spec`` is None)."""
  return value if spec is None else nn.Partitioned(value, names=tuple(spec))


def _with_partitioning(init, spec):
  return init if spec is None else nn.with_partitioning(init, tuple(spec))


def _get(module: nn.Module, collection: str, name: str):
  return nn.unbox(module.get_variable(collection, name))


def _weight_vars(module: nn.Module, collection: str, make_weight: Callable[[], Any],
                 *, shape: tuple[int, ...], prepared: bool, who: str, prefix: str = "",
                 specs=None):
  """Reads the arrays of a weight of logical ``shape`` from ``collection`` (names
  ``prefix + field``, unboxed), creating them with ``make_weight`` at init, in ``nn.Partitioned``
  boxes where ``specs`` (one per field: codes, scales, global scale) names mesh axes. Returns
  the weight pytree in whichever layout is stored; ``ValueError`` when the stored weight's
  logical shape (for the kernel layout: its record) differs from ``shape``."""
  if module.has_variable(collection, prefix + "qweight"):
    stored_prepared = True
  elif module.has_variable(collection, prefix + "packed"):
    stored_prepared = False
  elif module.is_initializing() or module.is_mutable_collection(collection):
    w = make_weight()  # its row order (gate_up_pairs or not) is the one to store
    w = _common.to_layout(w, prepared, prepared and getattr(w, "gate_up_pairs", False))
    fields = _common.PREPARED_FIELDS if prepared else _common.CHECKPOINT_FIELDS
    field_specs = dict(zip(fields, specs or (None,) * 3))
    for name, a in weight_variables(w, prefix=prefix).items():
      module.put_variable(collection, name, _boxed(a, field_specs.get(name[len(prefix):])))
    return w
  else:
    raise ValueError(f"{who}: the {collection!r} collection holds no {prefix}weight for this "
                     "layer: pass all the variables returned by init to apply (not only "
                     "'params')")
  fields = _common.PREPARED_FIELDS if stored_prepared else _common.CHECKPOINT_FIELDS
  arrays = tuple(_get(module, collection, prefix + f) for f in fields)
  if stored_prepared:
    logical = _stored_shape(module, collection, prefix, arrays[0].shape, who)
  else:
    logical = (*arrays[0].shape[:-1], 2 * arrays[0].shape[-1])
  if tuple(logical) != tuple(shape):
    raise ValueError(f"{who}: the stored {prefix}weight has logical shape {tuple(logical)}, "
                     f"expected {tuple(shape)}")
  pairs = _stored_pairs(module, collection, prefix, stored_prepared, who)
  return _common.weight_from_arrays(arrays, prepared=stored_prepared, n=shape[-2], k=shape[-1],
                                    dtype=jnp.bfloat16, gate_up_pairs=pairs)


def _refuse_pairs(w, prefix: str, who: str, why: str) -> None:
  if getattr(w, "gate_up_pairs", False):
    raise ValueError(f"{who}: the stored {prefix}weight has the gate_up_pairs record "
                     f"{prefix + PAIRS_FIELD!r}, but {why}")


class NVFP4Dense(nn.Module):
  """``y = x @ W.T + b`` with ``W[features, in]`` in NVFP4; a counterpart of ``nn.Dense``.

  ``nn.Dense``'s ``precision``, ``dot_general``, ``dot_general_cls`` and ``promote_dtype`` are
  not attributes (the NVFP4 op fixes the product: 16-bit operands, float32 accumulation), and
  ``dtype=float32`` is a ``ValueError``; outputs are in the activation dtype and gradients are
  reverse mode, first order only (module docstring).

  Attributes:
    features: output size N.
    use_bias: whether to add a bias (``params/bias`` ``[features]`` of ``param_dtype``).
    dtype: None, bfloat16 or float16 (see the module docstring).
    param_dtype: dtype of the bias and of the float kernel drawn at init.
    kernel_init, bias_init: as in ``nn.Dense``.
    prepare: ``"auto"`` (kernel layout iff the backend is "cuda"), True or False; init only.
    backend: ``"auto"``, ``"cuda"`` or ``"reference"`` (``jax_nvfp4.backend.select_backend``).
    activation_format: None (W4A16) or ``"nvfp4"`` (W4A4 checkpoint: activation scales dropped).
    collection: the variable collection of the NVFP4 arrays.
    kernel_sharding: optional mesh-axis names along the weight's ``[features, in]`` dims, e.g.
      ``("model", None)``, as NNX ``NVFP4Linear``'s: init boxes the codes and block scales in
      ``nn.Partitioned`` (the global scale and the shape record stay replicated), so
      ``nn.get_partition_spec(jax.eval_shape(layer.init, ...))`` gives the ``out_shardings`` to
      create the variables directly sharded. With a mesh in context (``jax.set_mesh``) the split
      is checked at init and apply (``ValueError``: N per shard whole, or whole 16-row tiles in
      the kernel layout; K per shard whole 16-column blocks, or 64-column chunks).
    bias_sharding: mesh-axis names for the bias ``[features]``; default
      ``(kernel_sharding[0],)``.
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()
  prepare: bool | str = "auto"
  backend: str = "auto"
  activation_format: str | None = None
  collection: str = COLLECTION
  kernel_sharding: tuple | None = None
  bias_sharding: tuple | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., in] -> [..., features]``; ``in`` must be a multiple of 16."""
    who = "NVFP4Dense"
    x = jnp.asarray(x)
    if x.ndim < 1:
      raise ValueError(f"{who}: input must be [..., in], got a scalar")
    k, n = int(x.shape[-1]), int(self.features)
    _common.check_in_features(k, who)
    if not isinstance(self.features, (int, np.integer)) or n <= 0:
      raise ValueError(f"{who}: features must be a positive int, got {self.features!r}")
    dtype = _common.check_compute_dtype(self.dtype, who)
    choice = _common.choose_backend(self.backend, self.activation_format, who)
    prepared = _common.resolve_prepare(self.prepare, choice, who)

    def make_weight():
      kernel = self.kernel_init(self.make_rng("params"), (k, n), self.param_dtype)
      return quantize(jnp.asarray(kernel).T)

    bias_sharding = self.bias_sharding
    if bias_sharding is None and self.kernel_sharding is not None:
      bias_sharding = (tuple(self.kernel_sharding)[0],)
    w = _weight_vars(self, self.collection, make_weight, shape=(n, k), prepared=prepared,
                     who=who, specs=_common.sharding_specs(self.kernel_sharding, prepared, who))
    _refuse_pairs(w, "", who, "only a gated MoE's w13 has that row order")
    _sharding.check_dense_sharding(self.kernel_sharding, bias_sharding if self.use_bias else None,
                                 n, k, isinstance(w, PreparedNVFP4Weight), who)
    bias = None
    if self.use_bias:
      bias = self.param("bias", _with_partitioning(self.bias_init, bias_sharding), (n,),
                        self.param_dtype)
    compute, out = _common.activation_dtypes(x, dtype, who)
    return _common.matmul(x.astype(compute), w, bias, choice.name).astype(out)


def quantize_dense_variables(params, *, prepare: bool = False, collection: str = COLLECTION,
                             global_scale=None) -> dict:
  """Variables for ``NVFP4Dense`` from the params of an ``nn.Dense`` (``{"kernel": [in, out],
  "bias": [out]}``, bias optional): ``{"params": {"bias"}, collection: {weight arrays}}``.

  The kernel is transposed to ``[out, in]`` and quantized (``jax_nvfp4.quantize``); the bias is
  copied unchanged. Params boxed with partitioning metadata (``nn.with_partitioning`` gives
  ``nn.Partitioned``) are unboxed first; the result carries no boxes (``NVFP4Dense``'s
  ``kernel_sharding`` / ``bias_sharding`` name the mesh axes of its own variables).
  """
  if not hasattr(params, "keys") or "kernel" not in params:
    raise TypeError("quantize_dense_variables: params must be an nn.Dense params dict with a "
                    f"'kernel', got {type(params).__name__}")
  params = nn.unbox(params)  # jnp.asarray cannot take an nn.Partitioned box
  kernel = jnp.asarray(params["kernel"])
  if kernel.ndim != 2:
    raise ValueError(f"quantize_dense_variables: kernel must be [in, out], got {kernel.shape}")
  _common.check_in_features(int(kernel.shape[0]), "quantize_dense_variables")
  w = quantize(kernel.T, global_scale=global_scale)
  out = {collection: weight_variables(w, prepare=bool(prepare)), "params": {}}
  if "bias" in params:
    out["params"]["bias"] = params["bias"]
  return out


class NVFP4MoE(nn.Module):
  """Linen counterpart of ``jax_nvfp4.nn.nnx.NVFP4MoE`` (same math, through ``fused_moe``).

  Variables: ``params/router`` ``[E_global, H]`` (``router_dtype``), ``params/w13_bias``
  ``[E, N13]`` and ``params/w2_bias`` ``[E, H]`` (float32, when ``use_expert_bias``); in
  ``collection``: ``w13_<field>``, ``w2_<field>`` (the stacked NVFP4 arrays, w13 ``[E, N13, H]``
  rows ``[gate; up]`` when gated, w2 ``[E, H, I]``) and, when ``use_correction_bias``,
  ``correction_bias`` float32 ``[E_global]`` (non-trainable: selection only). H is taken from
  the input at init. ``moe_variables`` builds the variables from dense or NVFP4 experts.
  Inference only (the grouped GEMM has no gradient rule).

  Fused activation (``fuse_activation``): where it is safe, init stores w13 in the kernel layout
  with its rows in ``gate_up_pairs`` order (8 gate rows then the matching 8 up rows per 16-row
  tile, ``prepare(w13, gate_up_pairs=True)``) and the record ``w13_gate_up_pairs`` (uint8
  zeros of shape ``(8,)``, module docstring), so that ``fused_moe`` applies the activation in
  GEMM 1's epilogue on a GPU. Apply reads the row order from the record: state without it
  (written before it existed, or by ``moe_variables`` without ``gate_up_pairs``) is ``[gate;
  up]``; a record beside a checkpoint-layout w13 or with a non-gated activation is a
  ``ValueError``. ``w13_bias`` stays ``[gate; up]`` (``fused_moe`` reorders it), or per tensor
  shard beside ``w13_gate_up_shards`` (below): the pairs order needs no per-shard reordering of
  the rows (each shard's whole 16-row tiles are its own gate/up pairs), so with both records
  w13 is in pairs order and its bias per shard.

  Sharding (``expert_axis`` / ``tensor_axis``, as NNX ``NVFP4MoE``'s and
  ``jax_nvfp4.parallel.moe_state_specs``): init boxes every array in ``nn.Partitioned`` (E over
  the expert axis, w13's N and w2's K over the tensor axis, router and correction bias
  replicated), checks the split against the mesh in context, and, for a gated layer with a
  tensor axis of size tp > 1 in that mesh, stores w13's rows (and w13_bias) in per-shard order
  ``[gate_0; up_0; ...]`` with the record ``w13_gate_up_shards`` (uint8 zeros of shape
  ``(tp,)``). Applied under a mesh with these axes (total size > 1) the layer runs
  ``jax_nvfp4.parallel.sharded_fused_moe`` (the mesh's tensor axis size must match the record);
  elsewhere ``fused_moe`` on the whole, reordered-back weights.

  Attributes:
    intermediate_size, num_experts: I and the local expert count E.
    top_k / routing: as ``fused_moe`` (``routing`` a ``RoutingConfig`` without
      ``correction_bias``: that comes from the collection).
    activation, limit, alpha: ``"swiglu"`` (optional limit), ``"gptoss"`` (limit required),
      ``"relu2"``.
    use_expert_bias, use_correction_bias: create those variables at init (zeros).
    expert_map: optional tuple of ints ``[E_global]`` (global id -> local id or -1).
    dtype, router_dtype, expert_init, router_init, prepare, backend, activation_format,
    collection: as ``NVFP4Dense`` / the NNX layer (the chosen backend is passed to
    ``fused_moe``: "reference" runs the pure-JAX path on a GPU too).
    expert_axis, tensor_axis: mesh-axis names (or tuples) for expert / tensor parallelism (see
      above); not combinable with ``expert_map``.
    fuse_activation: whether init stores w13 in ``gate_up_pairs`` order (see above). None
      (default): exactly where it is correct: the kernel layout (``prepare`` resolved to True),
      a gated activation, and I a multiple of 8, or of 8 tp under a tensor split of size tp in
      the mesh at init (whole 16-row gate/up tiles per shard, which the kernel layout's split,
      I/tp a multiple of 64, always gives); an ``expert_axis`` does not matter. ``[gate; up]``
      elsewhere, and at apply whichever order the record says. False: ``[gate; up]`` at init
      (the layout from before the fused activation), and a ``ValueError`` at apply if the
      stored w13 is in pairs order. True: the pairs order at init (``ValueError`` naming why
      where it cannot be), and a ``ValueError`` at apply if the stored w13 is not.
  """

  intermediate_size: int
  num_experts: int
  top_k: int | None = None
  routing: Any = None
  activation: str = "swiglu"
  limit: float | None = None
  alpha: float = 1.702
  use_expert_bias: bool = False
  use_correction_bias: bool = False
  expert_map: tuple[int, ...] | None = None
  dtype: Any = None
  router_dtype: Any = jnp.bfloat16
  expert_init: Callable = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2, batch_axis=(0,))
  router_init: Callable = nn.initializers.lecun_normal()
  prepare: bool | str = "auto"
  backend: str = "auto"
  activation_format: str | None = None
  collection: str = COLLECTION
  expert_axis: Any = None
  tensor_axis: Any = None
  fuse_activation: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., H] -> [..., H]``."""
    from jax_nvfp4.moe import activations as acts
    from jax_nvfp4.moe.routing import RoutingConfig
    from jax_nvfp4.ops import moe as moe_ops
    who = "NVFP4MoE"
    x = jnp.asarray(x)
    if x.ndim < 1:
      raise ValueError(f"{who}: input must be [..., H], got a scalar")
    h, i, e = int(x.shape[-1]), int(self.intermediate_size), int(self.num_experts)
    if h % 16 or i % 16:
      raise ValueError(f"{who}: H = {h} and intermediate_size = {i} must be multiples of 16")
    if self.activation not in acts.ACTIVATIONS:
      raise ValueError(f"{who}: activation must be one of {acts.ACTIVATIONS}, "
                       f"got {self.activation!r}")
    dtype = _common.check_compute_dtype(self.dtype, who)
    choice = _common.choose_backend(self.backend, self.activation_format, who,
                                    moe_activation=self.activation, limit=self.limit)
    prepared = _common.resolve_prepare(self.prepare, choice, who)
    n13 = 2 * i if acts.is_gated(self.activation) else i
    e_global = e if self.expert_map is None else len(self.expert_map)
    routing = self.routing
    if routing is None:
      if self.top_k is None:
        raise ValueError(f"{who}: set top_k or routing")
      routing = RoutingConfig.softmax_topk(int(self.top_k))
    elif not isinstance(routing, RoutingConfig) or routing.correction_bias is not None:
      raise TypeError(f"{who}: routing must be a RoutingConfig without correction_bias (use "
                      "use_correction_bias and the collection for that)")

    gated = acts.is_gated(self.activation)
    sharded = self.expert_axis is not None or self.tensor_axis is not None
    if sharded and self.expert_map is not None:
      raise ValueError(f"{who}: expert_map and expert_axis/tensor_axis are two ways to split the "
                       "experts: give one (the axes compute each device's expert map)")
    stored_layout = (True if self.has_variable(self.collection, "w13_qweight") else
                     False if self.has_variable(self.collection, "w13_packed") else None)
    specs, gate_up_shards, pairs = None, 1, False
    _common.check_fuse_activation(self.fuse_activation, who)
    if stored_layout is None:  # init: the split is checked and w13's row order decided
      specs, gate_up_shards = _sharding.moe_sharding(
          self.expert_axis, self.tensor_axis, num_experts=e, intermediate_size=i,
          prepared=prepared, gated=gated, who=who)
      pairs = _common.resolve_fuse_activation(
          self.fuse_activation, prepared=prepared, activation=self.activation,
          intermediate_size=i, gate_up_shards=gate_up_shards, who=who)
    else:
      if sharded and _sharding.context_mesh() is not None:  # apply: the split is checked
        _sharding.moe_sharding(self.expert_axis, self.tensor_axis, num_experts=e,
                             intermediate_size=i, prepared=stored_layout, gated=gated, who=who)
      if self.has_variable(self.collection, GATE_UP_FIELD):
        gate_up_shards = _stored_gate_up_shards(self, self.collection, who)
    spec = lambda name: None if specs is None else specs[name]

    def make_w13():
      w = quantize(self.expert_init(self.make_rng("params"), (e, n13, h), jnp.float32))
      w = _common.to_layout(w, prepared, pairs)
      return parallel_moe.gate_up_per_shard(w, gate_up_shards)[0]  # pairs: as it is

    router = self.param("router", _with_partitioning(self.router_init, spec("router")),
                        (e_global, h), self.router_dtype)
    w13 = _weight_vars(self, self.collection, make_w13, shape=(e, n13, h), prepared=prepared,
                       who=who, prefix="w13_", specs=spec("w13"))
    if stored_layout is None and gate_up_shards > 1:
      self.put_variable(self.collection, GATE_UP_FIELD, _shards_record(gate_up_shards))
    w2 = _weight_vars(self, self.collection,
                      lambda: quantize(self.expert_init(self.make_rng("params"), (e, h, i),
                                                        jnp.float32)),
                      shape=(e, h, i), prepared=prepared, who=who, prefix="w2_",
                      specs=spec("w2"))
    _check_w13_order(w13, activation=self.activation, intermediate_size=i,
                     gate_up_shards=gate_up_shards, fuse_activation=self.fuse_activation,
                     who=who)
    _refuse_pairs(w2, "w2_", who, "w2 has no gate and up rows")
    b13 = b2 = None
    if self.use_expert_bias:
      zeros = nn.initializers.zeros_init()
      b13 = self.param("w13_bias", _with_partitioning(zeros, spec("w13_bias")), (e, n13),
                       jnp.float32)
      b2 = self.param("w2_bias", _with_partitioning(zeros, spec("w2_bias")), (e, h),
                      jnp.float32)
    if self.use_correction_bias:
      cb = self.variable(self.collection, "correction_bias",
                         lambda: _boxed(jnp.zeros((e_global,), jnp.float32),
                                        spec("correction_bias"))).value
      _common.check_correction_bias(nn.unbox(cb), e_global, who)
      routing = dataclasses.replace(routing, correction_bias=cb)

    compute, out = _common.activation_dtypes(x, dtype, who)
    xc = x.astype(compute)
    logits = jnp.einsum("...h,eh->...e", xc.astype(router.dtype), router,
                        preferred_element_type=jnp.float32)
    kw = dict(router_logits=logits, routing=routing, activation=self.activation,
              limit=self.limit, alpha=self.alpha,
              backend=_common.moe_call_backend(self.backend, choice))
    weights = _sharding.sharded_moe_weights(w13, w2, b13, b2, expert_axis=self.expert_axis,
                                          tensor_axis=self.tensor_axis, gated=gated,
                                          gate_up_shards=gate_up_shards, who=who)
    if weights is not None:
      return parallel_moe.sharded_fused_moe(xc, weights, **kw).astype(out)
    # A pairs w13 goes as it is with the bias in [gate; up] order: fused_moe reorders the bias.
    w13, b13 = parallel_moe.gate_up_canonical(w13, gate_up_shards, b13)
    y = moe_ops.fused_moe(
        xc, w13, w2, w13_bias=b13, w2_bias=b2, **kw,
        expert_map=None if self.expert_map is None else jnp.asarray(self.expert_map, jnp.int32))
    return y.astype(out)


def _stored_gate_up_shards(module: nn.Module, collection: str, who: str) -> int:
  """The tensor-axis size of the ``w13_gate_up_shards`` record."""
  shape = _record_shape(module, collection, GATE_UP_FIELD)
  if shape is None or len(shape) not in (1, 2) or shape[0] < 1 or shape[1:] not in ((), (0,)):
    raise ValueError(f"{who}: {GATE_UP_FIELD!r} must be a record of shape (tp,) (or (tp, 0) "
                     f"from earlier state), got shape {shape}")
  return shape[0]


def _check_w13_order(w13, *, activation: str, intermediate_size: int, gate_up_shards: int,
                     fuse_activation, who: str) -> None:
  """The stored w13's row order (its records) against the layer. Both records together are a
  pairs w13 (in its own order on every tensor shard) with its bias per tensor shard."""
  from jax_nvfp4.moe.activations import is_gated
  pairs = getattr(w13, "gate_up_pairs", False)
  record = "w13_" + PAIRS_FIELD
  if pairs and not is_gated(activation):
    raise ValueError(f"{who}: w13 is stored in gate_up_pairs order (record {record!r}), which "
                     f"only a gated activation reads, but activation is {activation!r}")
  if pairs:
    split = _common.gate_up_pairs_row_blockers(intermediate_size, gate_up_shards)
    if split:
      raise ValueError(f"{who}: w13 is stored in gate_up_pairs order (record {record!r}) for "
                       f"{gate_up_shards} tensor shard(s) (record {GATE_UP_FIELD!r}), which it "
                       f"cannot be: {'; '.join(split)}")
  if fuse_activation is not None and fuse_activation != pairs:
    order = f"gate_up_pairs order (record {record!r})" if pairs else (
        f"[gate; up] order (no record {record!r})")
    raise ValueError(f"{who}: fuse_activation={fuse_activation}, but the stored w13 is in "
                     f"{order}: build the variables in the order asked (init, or "
                     f"moe_variables(..., gate_up_pairs={fuse_activation})), or leave "
                     "fuse_activation=None to run the stored order")


def _check_pairs_request(prepare: bool, n13: int, inter: int, gate_up_shards: int) -> None:
  reasons = []
  if not prepare:
    reasons.append("prepare=False (the pairs order is one of the kernel layout)")
  if n13 != 2 * inter:
    reasons.append(f"w13 has {n13} rows, not the [gate; up] = 2I = {2 * inter} of a gated layer")
  reasons += _common.gate_up_pairs_row_blockers(inter, gate_up_shards)
  if reasons:
    raise ValueError(f"moe_variables: gate_up_pairs=True cannot be used: {'; '.join(reasons)}")


def moe_variables(router_weight, w13, w2, *, w13_bias=None, w2_bias=None, correction_bias=None,
                  prepare: bool = False, router_dtype: Any = jnp.bfloat16,
                  collection: str = COLLECTION, gate_up_shards: int = 1,
                  gate_up_pairs: bool = False) -> dict:
  """Variables for the Linen ``NVFP4MoE`` from checkpoint tensors.

  ``w13`` ``[E, N13, H]`` and ``w2`` ``[E, H, I]`` are float arrays (quantized here, one global
  scale per expert and matrix) or stacked ``NVFP4Weight``/``PreparedNVFP4Weight`` (used as
  they are, converted to the asked layout). ``router_weight`` ``[E_global, H]`` float (stored
  as ``router_dtype``); the optional biases are float ``[E, N13]``, ``[E, H]`` and
  ``[E_global]``. Set the module's ``use_expert_bias`` / ``use_correction_bias`` to match.
  ``gate_up_shards``: for a gated layer with a ``tensor_axis`` of size tp > 1, tp: w13's rows
  ``[gate; up]`` (and w13_bias) are stored in per-shard order with their record, as that
  layer's init does (``jax_nvfp4.parallel.gate_up_per_shard``); 1 keeps ``[gate; up]``.
  ``gate_up_pairs``: store w13 with its rows in ``gate_up_pairs`` order and that record, as
  the init of a layer that fuses the activation does (``NVFP4MoE``'s ``fuse_activation``); it
  needs ``prepare=True``, a gated w13 (``N13 = 2I``) and I a multiple of 8 x gate_up_shards
  (whole 16-row gate/up tiles per tensor shard; ``ValueError`` otherwise). The pairs rows are
  stored as they are for any ``gate_up_shards``; w13_bias stays ``[gate; up]``, or is stored
  per shard when ``gate_up_shards > 1``. False (the default): ``[gate; up]`` rows, also for a
  w13 given in pairs order (reordered, exactly).
  """
  params = {"router": jnp.asarray(router_weight).astype(router_dtype)}
  store = {}
  weights = {}
  for name, w in (("w13", w13), ("w2", w2)):
    if not isinstance(w, (NVFP4Weight, PreparedNVFP4Weight)):
      w = jnp.asarray(w)
      if w.ndim != 3:
        raise ValueError(f"moe_variables: {name} must be [E, N, K], got shape {w.shape}")
      w = quantize(w)
    weights[name] = w
  if gate_up_pairs:
    _check_pairs_request(bool(prepare), weights["w13"].shape[-2], weights["w2"].shape[-1],
                         int(gate_up_shards))
  for name, w in weights.items():
    w = _common.to_layout(w, bool(prepare), name == "w13" and bool(gate_up_pairs))
    if name == "w13" and gate_up_shards > 1:
      w, w13_bias = parallel_moe.gate_up_per_shard(w, int(gate_up_shards), w13_bias)
      store[GATE_UP_FIELD] = _shards_record(gate_up_shards)
    store.update(weight_variables(w, prefix=f"{name}_"))
  if (w13_bias is None) != (w2_bias is None):
    raise ValueError("moe_variables: give both w13_bias and w2_bias or neither")
  if w13_bias is not None:
    params["w13_bias"] = jnp.asarray(w13_bias, jnp.float32)
    params["w2_bias"] = jnp.asarray(w2_bias, jnp.float32)
  if correction_bias is not None:
    correction_bias = jnp.asarray(correction_bias, jnp.float32)
    _common.check_correction_bias(correction_bias, params["router"].shape[0], "moe_variables")
    store["correction_bias"] = correction_bias
  return {"params": params, collection: store}

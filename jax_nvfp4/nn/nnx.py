"""Flax NNX layers with NVFP4 weights: ``NVFP4Linear`` (and ``NVFP4MoE``, below).

State layout. The quantized weight is a pytree of three arrays (``NVFP4Weight``: packed,
scales, global_scale; ``PreparedNVFP4Weight``: qweight, qscales, global_scale). Each array is
its own ``NVFP4Variable`` attribute of the layer, named after the pytree field, and the layer's
``weight`` property rebuilds the pytree. One variable per array (rather than one variable holding
the whole pytree) is what lets every array carry its own sharding metadata: nnx turns a
variable's ``out_sharding`` into one ``PartitionSpec`` for its whole value, and the scalar global
scale cannot take the [N, K] names of the codes and block scales.

``NVFP4Variable`` is an ``nnx.Variable`` that is not an ``nnx.Param``: ``nnx.state(m, nnx.Param)``
holds only the bias (and other float parameters of the model), ``nnx.Optimizer(m, tx,
wrt=nnx.Param)`` never updates the quantized weight, and ``nnx.split(m, nnx.Param, ...)`` puts
the weight in the rest.

Dtypes. The NVFP4 ops take bf16/fp16 activations with float32 accumulation. ``dtype`` (None,
bfloat16 or float16) follows ``nnx.Linear``: when set, inputs are cast to it and the output is
in it. With ``dtype=None``, bf16/fp16 inputs stay as they are; float32 (or float64) inputs are
computed in bfloat16 and the output is cast back to the input dtype, so a float32 model keeps
float32 activations between layers (but the product is a bf16 one: ~3 significant digits).

Gradients. ``NVFP4Linear`` is differentiable in its input and bias (``dx = g @ dequantize(W)``
in the activation dtype with float32 accumulation, ``dbias = sum(g)``), so a frozen NVFP4 base
can sit under trainable layers or biases; the quantized weight gets no gradient. Reverse mode
and first order only (a custom VJP): no ``jax.jvp`` / ``jax.jacfwd``, no second derivatives
(``jax.hessian``, grad of grad). ``NVFP4MoE`` is inference only (the grouped GEMM has no
differentiation rule).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_nvfp4.format import NVFP4Weight, quantize
from jax_nvfp4.nn import _common, _sharding
from jax_nvfp4.parallel import moe as parallel_moe
from jax_nvfp4.prepare import GATE_UP_PAIR_ROWS, PreparedNVFP4Weight

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


class NVFP4Variable(nnx.Variable):
  """A non-trainable variable holding one array of an NVFP4 weight (not an ``nnx.Param``)."""


def is_abstract(value) -> bool:
  """Whether a variable's value is a shape without data (``nnx.eval_shape`` leaves a
  ``jax.ShapeDtypeStruct``; tracers inside a transform are not abstract in this sense)."""
  return isinstance(value, jax.ShapeDtypeStruct)


class NVFP4Linear(nnx.Module):
  """``y = x @ W.T + b`` with ``W[out, in]`` stored in NVFP4 (4.5 bits per weight).

  A replacement for ``nnx.Linear`` at inference: its constructor arguments ``in_features``,
  ``out_features``, ``use_bias``, ``dtype``, ``param_dtype``, ``kernel_init``, ``bias_init`` and
  ``rngs`` mean the same (``kernel_init`` draws a float ``[in, out]`` kernel from
  ``rngs.params()`` exactly as ``nnx.Linear`` does, which is then transposed and quantized with
  ``jax_nvfp4.quantize``; the bias is drawn next, as there), and the call is the same
  ``[..., in] -> [..., out]`` on any number of leading dims. Not a drop-in everywhere:

  * ``nnx.Linear``'s ``precision``, ``dot_general``, ``promote_dtype``,
    ``preferred_element_type``, ``kernel_metadata`` and ``bias_metadata`` are not taken
    (``TypeError``): the NVFP4 op fixes the product (16-bit operands, float32 accumulation),
    and sharding is named with ``kernel_sharding`` / ``bias_sharding``.
  * ``dtype=float32`` (or any dtype but None, bfloat16, float16) is a ``ValueError``.
  * The output dtype is the activation dtype, not ``nnx.Linear``'s promoted one: with
    ``dtype=None`` a bfloat16/float16 input gives a bfloat16/float16 output even with a float32
    bias (``nnx.Linear`` promotes to float32); a float32 input gives float32.
  * Differentiation is reverse mode only (``jax.grad``, ``jax.vjp``, ``nnx.grad``, first
    order): ``jax.jvp`` / ``jax.jacfwd`` raise a ``TypeError`` and second derivatives
    (``jax.hessian``, grad of grad) a ``NotImplementedError``.

  Args:
    in_features: K, a multiple of 16.
    out_features: N.
    use_bias: whether the layer has a bias (an ``nnx.Param`` ``[out]`` of ``param_dtype``).
    dtype: None, bfloat16 or float16: the activation dtype (see the module docstring).
    param_dtype: dtype of the bias and of the float kernel drawn before quantization.
    kernel_init, bias_init: as in ``nnx.Linear``.
    rngs: ``nnx.Rngs`` to draw the kernel and bias. Optional when ``weight`` is given: then the
      bias is drawn from ``bias_init`` with ``rngs.params()`` if rngs is given, else zeros.
    weight: an already-quantized ``NVFP4Weight`` or ``PreparedNVFP4Weight`` of logical shape
      ``[out, in]`` (e.g. from a checkpoint); then no kernel is drawn.
    prepare: ``"auto"`` (kernel layout iff the backend is "cuda"), True or False.
    backend: ``"auto"``, ``"cuda"`` or ``"reference"``, decided by
      ``jax_nvfp4.backend.select_backend`` at construction (a ValueError lists the reasons when
      the asked backend cannot run here).
    activation_format: None for a W4A16 checkpoint, ``"nvfp4"`` for a W4A4 one (its activation
      scales are dropped, logged once; the layer is weight-only either way).
    kernel_sharding: optional mesh-axis names along the weight's ``[out, in]`` dims, e.g.
      ``("model", None)``, stored as nnx ``out_sharding`` metadata on the codes and block scales
      (the global scale is replicated). As for ``nnx.Linear`` with sharding metadata, creating
      the layer then needs a mesh (``jax.set_mesh``) while nnx's eager sharding is on. With a
      mesh in context the split is checked at construction (``ValueError``): N per shard must be
      a whole number (kernel layout: whole 16-row tiles), K per shard whole 16-column scale
      blocks (kernel layout: 64-column chunks).
    bias_sharding: mesh-axis names for the bias ``[out]``; defaults to ``(kernel_sharding[0],)``.

  Attributes:
    weight: the quantized weight pytree (rebuilt from the variables on access).
    bias: ``nnx.Param`` ``[out]`` or None.
    backend: the ``BackendChoice`` made at construction.
    prepared: whether the weight is in the kernel layout.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               kernel_init=default_kernel_init, bias_init=default_bias_init,
               rngs: nnx.Rngs | None = None,
               weight: NVFP4Weight | PreparedNVFP4Weight | None = None,
               prepare: bool | str = "auto", backend: str = "auto",
               activation_format: str | None = None,
               kernel_sharding=None, bias_sharding=None):
    who = "NVFP4Linear"
    _common.check_in_features(in_features, who)
    if not isinstance(out_features, (int, np.integer)) or out_features <= 0:
      raise ValueError(f"{who}: out_features must be a positive int, got {out_features!r}")
    self.in_features = int(in_features)
    self.out_features = int(out_features)
    self.use_bias = bool(use_bias)
    self.dtype = _common.check_compute_dtype(dtype, who)
    self.param_dtype = param_dtype
    self.backend = _common.choose_backend(backend, activation_format, who)
    self.prepared = _common.resolve_prepare(prepare, self.backend, who)

    if weight is None:
      if rngs is None:
        raise ValueError(f"{who}: pass rngs (to draw the kernel) or an already-quantized weight")
      kernel = kernel_init(rngs.params(), (self.in_features, self.out_features), param_dtype)
      weight = quantize(jnp.asarray(kernel).T)
    elif not isinstance(weight, (NVFP4Weight, PreparedNVFP4Weight)):
      raise TypeError(f"{who}: weight must be an NVFP4Weight or PreparedNVFP4Weight, got "
                      f"{type(weight).__name__}")
    if tuple(weight.shape) != (self.out_features, self.in_features):
      raise ValueError(f"{who}: weight must have logical shape [out, in] = "
                       f"{(self.out_features, self.in_features)}, got {tuple(weight.shape)}")
    if isinstance(weight, NVFP4Weight):
      weight.validate()
    weight = _common.to_layout(weight, self.prepared)
    self.weight_dtype = weight.dtype

    specs = _common.sharding_specs(kernel_sharding, self.prepared, who)
    if bias_sharding is None and kernel_sharding is not None:
      bias_sharding = (tuple(kernel_sharding)[0],)
    _sharding.check_dense_sharding(kernel_sharding, bias_sharding if self.use_bias else None,
                                 self.out_features, self.in_features, self.prepared, who)
    fields = _common.PREPARED_FIELDS if self.prepared else _common.CHECKPOINT_FIELDS
    for name, array, spec in zip(fields, _common.weight_arrays(weight), specs):
      setattr(self, name, _sharding.variable(NVFP4Variable, array, spec))

    if self.use_bias:
      if rngs is None:  # only with an explicit weight
        bias = jnp.zeros((self.out_features,), param_dtype)
      else:
        bias = bias_init(rngs.params(), (self.out_features,), param_dtype)
      self.bias = _sharding.variable(nnx.Param, bias, bias_sharding)
    else:
      self.bias = nnx.data(None)

  # --------------------------------------------------------------------------- constructors

  @classmethod
  def from_linear(cls, linear: nnx.Linear, *, dtype: Any = "same", prepare: bool | str = "auto",
                  backend: str = "auto", global_scale=None) -> "NVFP4Linear":
    """Quantizes an ``nnx.Linear`` (kernel ``[in, out]``: transposed to ``[out, in]``).

    The bias is copied (same values, dtype and metadata); sharding metadata of the kernel
    carries over transposed. ``dtype="same"`` keeps ``linear.dtype`` when it is bf16/fp16 and
    uses None otherwise. ``global_scale`` overrides the per-tensor scale (see ``quantize``).
    """
    if not isinstance(linear, nnx.Linear):
      raise TypeError(f"NVFP4Linear.from_linear expects an nnx.Linear, got "
                      f"{type(linear).__name__}")
    if dtype == "same":
      ld = linear.dtype
      dtype = ld if ld is not None and np.dtype(ld) in _common.COMPUTE_DTYPES else None
    kernel = linear.kernel.get_value()
    if is_abstract(kernel):
      raise TypeError("NVFP4Linear.from_linear: the Linear's kernel is abstract (a "
                      "jax.ShapeDtypeStruct, as nnx.eval_shape makes): there are no values to "
                      "quantize. Quantize inside the abstract evaluation instead, e.g. "
                      "nnx.eval_shape(lambda: NVFP4Linear.from_linear(nnx.Linear(...))) or "
                      "nnx.eval_shape(lambda: quantize_model(Model(...))[0])")
    kernel_spec = linear.kernel.get_metadata().get("out_sharding")
    weight = quantize(jnp.asarray(kernel).T, global_scale=global_scale)
    bias_meta = {}
    if linear.bias is not None:
      bias_meta = {k: v for k, v in linear.bias.get_metadata().items() if k == "out_sharding"}
    layer = cls(linear.in_features, linear.out_features, use_bias=linear.bias is not None,
                dtype=dtype, param_dtype=linear.param_dtype, weight=weight, prepare=prepare,
                backend=backend,
                kernel_sharding=None if not kernel_spec else tuple(kernel_spec)[::-1],
                bias_sharding=bias_meta.get("out_sharding"))
    if linear.bias is not None:
      layer.bias.set_value(_sharding.placed_like(linear.bias.get_value(), layer.bias.get_value()))
    return layer

  @classmethod
  def from_nvfp4(cls, weight: NVFP4Weight | PreparedNVFP4Weight, bias=None, *,
                 dtype: Any = None, prepare: bool | str = "auto", backend: str = "auto",
                 activation_format: str | None = None, kernel_sharding=None,
                 bias_sharding=None) -> "NVFP4Linear":
    """Wraps an already-quantized ``[out, in]`` weight (e.g. loaded from a checkpoint).

    ``bias``: None or a float ``[out]`` array (kept in its dtype).
    """
    if not isinstance(weight, (NVFP4Weight, PreparedNVFP4Weight)) or len(weight.shape) != 2:
      raise TypeError("NVFP4Linear.from_nvfp4: weight must be a 2-D NVFP4Weight or "
                      f"PreparedNVFP4Weight, got {type(weight).__name__}")
    n, k = weight.shape
    param_dtype = jnp.float32
    if bias is not None:
      bias = jnp.asarray(bias)
      if bias.shape != (n,) or not jnp.issubdtype(bias.dtype, jnp.floating):
        raise ValueError(f"NVFP4Linear.from_nvfp4: bias must be a float [{n}] array, got "
                         f"{bias.dtype} {bias.shape}")
      param_dtype = bias.dtype
    layer = cls(k, n, use_bias=bias is not None, dtype=dtype, param_dtype=param_dtype,
                weight=weight, prepare=prepare, backend=backend,
                activation_format=activation_format, kernel_sharding=kernel_sharding,
                bias_sharding=bias_sharding)
    if bias is not None:
      layer.bias.set_value(_sharding.placed_like(bias, layer.bias.get_value()))
    return layer

  # --------------------------------------------------------------------------- use

  @property
  def weight(self) -> NVFP4Weight | PreparedNVFP4Weight:
    fields = _common.PREPARED_FIELDS if self.prepared else _common.CHECKPOINT_FIELDS
    arrays = tuple(getattr(self, f).get_value() for f in fields)
    return _common.weight_from_arrays(arrays, prepared=self.prepared, n=self.out_features,
                                      k=self.in_features, dtype=self.weight_dtype)

  @property
  def nbytes(self) -> int:
    """Bytes of the quantized weight (bias excluded)."""
    return _common.weight_nbytes(self.out_features, self.in_features, self.prepared)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., in] -> [..., out]``; dtypes as in the module docstring."""
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != self.in_features:
      raise ValueError(f"NVFP4Linear: input must be [..., {self.in_features}], got {x.shape}")
    compute, out = _common.activation_dtypes(x, self.dtype, "NVFP4Linear")
    bias = None if self.bias is None else self.bias.get_value()
    y = _common.matmul(x.astype(compute), self.weight, bias, self.backend.name)
    return y.astype(out)


# ============================================================================= MoE

class MoEBuffer(nnx.Variable):
  """A non-trainable float buffer of an MoE layer (the routing score-correction bias)."""


class LayoutRecord(nnx.Variable):
  """A non-trainable record of how an MoE layer stores its arrays: ``w13_gate_up_pairs``, zeros
  uint8 ``[8]`` (the rows per half of a gate/up pair), present iff w13's rows are in
  ``gate_up_pairs`` order. The shape is the record: static under jit, and not empty, which
  orbax refuses to save."""


def _pairs_record() -> jax.Array:
  return jnp.zeros((GATE_UP_PAIR_ROWS,), jnp.uint8)


class NVFP4MoE(nnx.Module):
  """A mixture-of-experts block with NVFP4 experts, through ``jax_nvfp4.ops.moe.fused_moe``.

  ``y = sum_j w_j * (act(x @ W13[e_j].T + b13[e_j]) @ W2[e_j].T + b2[e_j])`` where the top-k
  experts ``e_j`` and weights ``w_j`` come from the router: ``logits = x @ router.T`` (bf16
  router weight ``[E_global, H]``, float32 accumulation) routed by ``routing`` (a
  ``jax_nvfp4.RoutingConfig``; default softmax -> top-k -> renormalize). Inference only: the
  grouped GEMM has no gradient rule.

  State: ``router`` (``nnx.Param`` ``[E_global, H]``, ``router_dtype``), optionally
  ``correction_bias`` (``MoEBuffer`` float32 ``[E_global]``, the DeepSeek-V3 score-correction
  bias: selection only), optionally ``w13_bias`` ``[E, N13]`` and ``w2_bias`` ``[E, H]``
  (``nnx.Param`` float32), and the stacked expert weights as ``NVFP4Variable``\\ s named
  ``w13_<field>`` / ``w2_<field>`` (fields as in ``NVFP4Linear``): w13 ``[E, N13, H]`` with
  ``N13 = 2I`` rows ``[gate; up]`` for gated activations or ``I`` for ``relu2``; w2 ``[E, H, I]``.
  ``expert_map`` (global id -> local id or -1, for expert parallelism) is static config.

  Fused activation. Where it is safe (``fuse_activation`` below) a gated layer stores w13 in the
  kernel layout with its rows in ``gate_up_pairs`` order (``jax_nvfp4.prepare(w13,
  gate_up_pairs=True)``: 8 gate rows then the matching 8 up rows per 16-row tile), so that
  ``fused_moe`` applies the activation in GEMM 1's epilogue on a GPU (one kernel and one bf16
  rounding of GEMM 1's output less). The static attribute ``gate_up_pairs`` says which order
  the layer was built with, and the state holds the record ``w13_gate_up_pairs``
  (``LayoutRecord``) exactly when it is the pairs order: ``nnx.merge`` and an orbax restore of
  state written in the other order fail on that leaf instead of reading the rows in the wrong
  order. ``nnx.update`` only overwrites, so update a layer with state of its own order: state
  written before this layout existed (no record) is ``[gate; up]``, build its layer with
  ``fuse_activation=False``. The w13 bias stays ``[gate; up]`` (``fused_moe`` reorders it), or
  per tensor shard under a tensor split (below). The pairs order also holds with
  ``expert_axis`` / ``tensor_axis``: each tensor shard's whole 16-row tiles are its own gate
  rows and their up rows, so the rows need no per-shard reordering and every device fuses.

  Args:
    hidden_size, intermediate_size, num_experts: H, I and the local expert count E.
    top_k, routing: experts per token and/or a ``RoutingConfig`` (its ``correction_bias`` is
      moved into the ``correction_bias`` buffer).
    activation: ``"swiglu"`` (optional clamp ``limit``), ``"gptoss"`` (``limit`` required,
      ``alpha``), ``"relu2"`` (non-gated).
    use_expert_bias: create zero expert biases (random init only; the constructors take arrays).
    expert_map: optional ints ``[E_global]``.
    dtype: None/bf16/fp16, the activation rule of ``NVFP4Linear``.
    router_dtype: dtype of the router weight (bfloat16, as checkpoints keep it).
    expert_init: initializer for random float experts ``[E, N, K]`` before quantization.
    rngs: draws the router and the experts (random init).
    prepare, backend, activation_format: as in ``NVFP4Linear`` (the oracle also checks the MoE
      activation and that the grouped-GEMM kernel is built for "cuda"); the chosen backend is
      passed to ``fused_moe``, so "reference" runs the pure-JAX path on a GPU too.
    expert_axis, tensor_axis: optional mesh-axis names (or tuples of names) for expert and
      tensor parallelism, with ``jax_nvfp4.parallel.shard_moe_weights``' conventions
      (``parallel.moe_state_specs``): stored as nnx ``out_sharding`` metadata, so the layer can
      be created directly sharded (``jax.set_mesh`` + eager sharding, or ``nnx.eval_shape``
      and a jit with those ``out_shardings``). E splits over ``expert_axis``; w13's N and w2's
      K (= I) over ``tensor_axis``; global scales and biases follow their experts (and w13's
      rows); the router and the correction bias are replicated. With a mesh in context the
      split is checked (``ValueError``: E a multiple of the expert axis size, I/tp a multiple
      of 16, or 64 in the kernel layout). A gated layer with a tensor axis of size tp > 1
      stores w13's rows (and w13_bias) in the per-shard order ``[gate_0; up_0; ...]``
      (``gate_up_shards = tp``; the ``w13`` property still returns ``[gate; up]``); a w13 in
      ``gate_up_pairs`` order is in that order already, so only its bias is reordered. Called
      under a mesh with these axes (of total size > 1), the layer runs
      ``jax_nvfp4.parallel.sharded_fused_moe`` (each device its own experts / I slice, one
      psum; tokens replicated); elsewhere it runs ``fused_moe`` on the whole weights. Not
      combinable with ``expert_map`` (the axes compute it per device).
    fuse_activation: whether w13 is stored in ``gate_up_pairs`` order, so that GEMM 1 applies
      the activation (see "Fused activation" above). None (default): exactly where it is
      correct: the weights are kept in the kernel layout (``prepare`` resolved to True), the
      activation is gated, and I is a multiple of 8, or of 8 tp under a tensor split of size
      tp (whole 16-row gate/up tiles per shard, which the kernel layout's split, I/tp a
      multiple of 64, always gives); an ``expert_axis`` does not matter. ``[gate; up]`` order
      everywhere else. False: always ``[gate; up]`` (the layout before the fused activation
      existed, e.g. to restore state written in it). True: the pairs order, or a
      ``ValueError`` naming why it cannot be used.

  Attributes:
    w13, w2: the stacked weight pytrees (``w13`` rows ``[gate; up]`` whatever the stored order).
    prepared: whether the weights are in the kernel layout.
    gate_up_pairs: whether w13 is stored in ``gate_up_pairs`` order (static).
    gate_up_shards: the tensor-axis size w13's rows and bias are stored for (1: not split).
    backend: the ``BackendChoice`` made at construction.
  """

  def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, *,
               top_k: int | None = None, routing=None, activation: str = "swiglu",
               limit: float | None = None, alpha: float = 1.702, use_expert_bias: bool = False,
               expert_map=None, dtype: Any = None, router_dtype: Any = jnp.bfloat16,
               expert_init=None, rngs: nnx.Rngs | None = None,
               prepare: bool | str = "auto", backend: str = "auto",
               activation_format: str | None = None, expert_axis=None, tensor_axis=None,
               fuse_activation: bool | None = None, _weights=None):
    from jax_nvfp4.moe import activations as acts
    from jax_nvfp4.moe.routing import RoutingConfig
    who = "NVFP4MoE"
    for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                    ("num_experts", num_experts)):
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{who}: {name} must be a positive int, got {v!r}")
    if hidden_size % 16 or intermediate_size % 16:
      raise ValueError(f"{who}: hidden_size = {hidden_size} and intermediate_size = "
                       f"{intermediate_size} must be multiples of 16 (the K dims of w13 / w2)")
    if activation not in acts.ACTIVATIONS:
      raise ValueError(f"{who}: activation must be one of {acts.ACTIVATIONS}, got {activation!r}")
    self.hidden_size, self.intermediate_size = int(hidden_size), int(intermediate_size)
    self.num_experts = int(num_experts)
    self.activation, self.alpha = activation, float(alpha)
    self.limit = None if limit is None else float(limit)
    self.dtype = _common.check_compute_dtype(dtype, who)
    self.backend = _common.choose_backend(backend, activation_format, who,
                                          moe_activation=activation, limit=self.limit)
    self.backend_request = backend
    self.prepared = _common.resolve_prepare(prepare, self.backend, who)
    n13 = 2 * self.intermediate_size if acts.is_gated(activation) else self.intermediate_size
    self.n13 = n13

    self.expert_map = None
    if expert_map is not None:
      em = np.asarray(expert_map)
      if em.ndim != 1 or not np.issubdtype(em.dtype, np.integer):
        raise ValueError(f"{who}: expert_map must be ints [E_global], got {em.dtype} {em.shape}")
      if em.min(initial=-1) < -1 or em.max(initial=-1) >= self.num_experts:
        raise ValueError(f"{who}: expert_map values must be -1 or in [0, {self.num_experts})")
      self.expert_map = tuple(int(v) for v in em)
    e_global = self.num_experts if self.expert_map is None else len(self.expert_map)
    self.num_global_experts = e_global
    if self.expert_map is not None and (expert_axis is not None or tensor_axis is not None):
      raise ValueError(f"{who}: expert_map and expert_axis/tensor_axis are two ways to split the "
                       "experts: give one (the axes compute each device's expert map)")
    self.expert_axis, self.tensor_axis = expert_axis, tensor_axis
    specs, self.gate_up_shards = _sharding.moe_sharding(
        expert_axis, tensor_axis, num_experts=self.num_experts,
        intermediate_size=self.intermediate_size, prepared=self.prepared,
        gated=acts.is_gated(activation), who=who)
    self.gate_up_pairs = _common.resolve_fuse_activation(
        fuse_activation, prepared=self.prepared, activation=activation,
        intermediate_size=self.intermediate_size, gate_up_shards=self.gate_up_shards, who=who)
    spec = lambda name: None if specs is None else specs[name]

    correction = None
    if routing is None:
      if top_k is None:
        raise ValueError(f"{who}: pass top_k or routing=RoutingConfig(...)")
      routing = RoutingConfig.softmax_topk(int(top_k))
    elif not isinstance(routing, RoutingConfig):
      raise TypeError(f"{who}: routing must be a jax_nvfp4.RoutingConfig, got "
                      f"{type(routing).__name__}")
    elif top_k is not None and top_k != routing.top_k:
      raise ValueError(f"{who}: top_k = {top_k} disagrees with routing.top_k = {routing.top_k}")
    if routing.correction_bias is not None:
      correction = jnp.asarray(routing.correction_bias, jnp.float32)
      # Checked here: the bias leaves the config for its buffer, and the config's own check
      # below (routing.validate) no longer sees it.
      _common.check_correction_bias(correction, e_global, who)
      routing = dataclasses.replace(routing, correction_bias=None)
    routing.validate(e_global)
    self.routing = routing
    self.top_k = routing.top_k

    if _weights is None:
      if rngs is None:
        raise ValueError(f"{who}: pass rngs (random init) or use from_dense / from_nvfp4")
      init = expert_init or nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2,
                                                          batch_axis=(0,))
      h, i, e = self.hidden_size, self.intermediate_size, self.num_experts
      router = nnx.initializers.lecun_normal()(rngs.params(), (e_global, h), jnp.float32)
      w13 = quantize(init(rngs.params(), (e, n13, h), jnp.float32))
      w2 = quantize(init(rngs.params(), (e, h, i), jnp.float32))
      b13 = jnp.zeros((e, n13), jnp.float32) if use_expert_bias else None
      b2 = jnp.zeros((e, h), jnp.float32) if use_expert_bias else None
    else:
      router, w13, w2, b13, b2 = _weights

    router = jnp.asarray(router)
    if router.shape != (e_global, self.hidden_size) or not jnp.issubdtype(router.dtype,
                                                                           jnp.floating):
      raise ValueError(f"{who}: router weight must be float [E_global, H] = "
                       f"{(e_global, self.hidden_size)}, got {router.dtype} {router.shape}")
    self.router = _sharding.variable(nnx.Param, router.astype(router_dtype), spec("router"))
    self.correction_bias = (nnx.data(None) if correction is None else
                            _sharding.variable(MoEBuffer, correction, spec("correction_bias")))
    shapes = {"w13": (self.num_experts, n13, self.hidden_size),
              "w2": (self.num_experts, self.hidden_size, self.intermediate_size)}
    weights = {}
    for name, w in (("w13", w13), ("w2", w2)):
      if not isinstance(w, (NVFP4Weight, PreparedNVFP4Weight)):
        raise TypeError(f"{who}: {name} must be an NVFP4Weight or PreparedNVFP4Weight, got "
                        f"{type(w).__name__}")
      if tuple(w.shape) != shapes[name]:
        raise ValueError(f"{who}: {name} must have logical shape {shapes[name]}"
                         + (" ([gate; up] rows)" if name == "w13" and n13 != self.intermediate_size
                            else "") + f", got {tuple(w.shape)}")
      if isinstance(w, NVFP4Weight):
        w.validate()
      weights[name] = _common.to_layout(w, self.prepared, name == "w13" and self.gate_up_pairs)
    biases = {}
    for name, b, shape in (("w13_bias", b13, (self.num_experts, n13)),
                           ("w2_bias", b2, (self.num_experts, self.hidden_size))):
      if b is not None:
        b = jnp.asarray(b)
        if b.shape != shape or not jnp.issubdtype(b.dtype, jnp.floating):
          raise ValueError(f"{who}: {name} must be float {shape}, got {b.dtype} {b.shape}")
        b = b.astype(jnp.float32)
      biases[name] = b
    # Tensor parallel, gated: w13's rows (and bias) in per-shard order (parallel/moe.py); the
    # rows of a gate_up_pairs w13 are that order already, only its bias moves.
    weights["w13"], biases["w13_bias"] = parallel_moe.gate_up_per_shard(
        weights["w13"], self.gate_up_shards, biases["w13_bias"])
    fields = _common.PREPARED_FIELDS if self.prepared else _common.CHECKPOINT_FIELDS
    for name, w in weights.items():
      setattr(self, f"{name}_dtype", w.dtype)
      for f, a, s in zip(fields, _common.weight_arrays(w), spec(name) or (None,) * 3):
        setattr(self, f"{name}_{f}", _sharding.variable(NVFP4Variable, a, s))
    for name, b in biases.items():
      setattr(self, name, nnx.data(None) if b is None
              else _sharding.variable(nnx.Param, b, spec(name)))
    self.w13_gate_up_pairs = (
        _sharding.variable(LayoutRecord, _pairs_record(), None if specs is None else (None,))
        if self.gate_up_pairs else nnx.data(None))

  # --------------------------------------------------------------------------- constructors

  @classmethod
  def from_dense(cls, router_weight, w13, w2, *, w13_bias=None, w2_bias=None,
                 **kwargs) -> "NVFP4MoE":
    """Quantizes float experts: ``w13 [E, N13, H]`` (rows ``[gate; up]`` for gated
    activations), ``w2 [E, H, I]`` (one global scale per expert and matrix, so gate and up of an
    expert share theirs, as ModelOpt writes them); ``router_weight [E_global, H]``.

    ``kwargs``: the constructor's keyword arguments (top_k/routing, activation, limit, ...).
    """
    w13, w2 = jnp.asarray(w13), jnp.asarray(w2)
    if w13.ndim != 3 or w2.ndim != 3:
      raise ValueError(f"NVFP4MoE.from_dense: w13 and w2 must be [E, N, K], got {w13.shape} "
                       f"and {w2.shape}")
    return cls.from_nvfp4(router_weight, quantize(w13), quantize(w2), w13_bias=w13_bias,
                          w2_bias=w2_bias, **kwargs)

  @classmethod
  def from_nvfp4(cls, router_weight, w13, w2, *, w13_bias=None, w2_bias=None,
                 **kwargs) -> "NVFP4MoE":
    """Wraps already-quantized stacked experts (``NVFP4Weight`` or ``PreparedNVFP4Weight``
    ``[E, N13, H]`` and ``[E, H, I]``, e.g. from a checkpoint loader). A w13 prepared with
    ``gate_up_pairs`` is taken too: it is stored in the row order the layer uses (exact)."""
    from jax_nvfp4.moe import activations as acts
    if not isinstance(w2, (NVFP4Weight, PreparedNVFP4Weight)) or len(w2.shape) != 3:
      raise TypeError("NVFP4MoE.from_nvfp4: w2 must be a stacked NVFP4Weight or "
                      f"PreparedNVFP4Weight [E, H, I], got {type(w2).__name__}")
    if "rngs" in kwargs:
      raise TypeError("NVFP4MoE.from_nvfp4: takes no rngs (the weights are given)")
    e, h, i = w2.shape
    activation = kwargs.get("activation", "swiglu")
    if activation not in acts.ACTIVATIONS:
      raise ValueError(f"NVFP4MoE: activation must be one of {acts.ACTIVATIONS}, "
                       f"got {activation!r}")
    return cls(h, i, e, _weights=(router_weight, w13, w2, w13_bias, w2_bias), **kwargs)

  # --------------------------------------------------------------------------- use

  def _weight(self, name: str):
    """The stored weight (w13's rows in per-shard order when ``gate_up_shards > 1``, in
    ``gate_up_pairs`` order when ``gate_up_pairs``)."""
    fields = _common.PREPARED_FIELDS if self.prepared else _common.CHECKPOINT_FIELDS
    arrays = tuple(getattr(self, f"{name}_{f}").get_value() for f in fields)
    n, k = ((self.n13, self.hidden_size) if name == "w13"
            else (self.hidden_size, self.intermediate_size))
    return _common.weight_from_arrays(arrays, prepared=self.prepared, n=n, k=k,
                                      dtype=getattr(self, f"{name}_dtype"),
                                      gate_up_pairs=name == "w13" and self.gate_up_pairs)

  def _check_layout_record(self) -> None:
    """The record must say the row order the layer was built with (it is state: replaced
    variables could carry another one)."""
    record = self.w13_gate_up_pairs
    found = None if record is None else tuple(record.get_value().shape)
    want = (GATE_UP_PAIR_ROWS,) if self.gate_up_pairs else None
    if found != want:
      raise ValueError(
          f"NVFP4MoE: the layout record w13_gate_up_pairs is "
          f"{'absent' if found is None else f'of shape {found}'}, but this layer was built with "
          f"w13 in {'gate_up_pairs' if self.gate_up_pairs else '[gate; up]'} order (expected "
          f"{'a record of shape ' + str(want) if want else 'none'}): its state comes from a "
          "layer of the other order; build the layer with the same fuse_activation")

  def _bias(self, name: str):
    b = getattr(self, name)
    return None if b is None else b.get_value()

  @property
  def w13(self):
    """The stacked gate/up weight pytree ``[E, N13, H]``, rows ``[gate; up]``: in the layout
    of ``prepared``, never in per-shard or ``gate_up_pairs`` order (a pairs-stored w13 is
    repacked, exactly: the weight a layer with ``fuse_activation=False`` stores)."""
    w = parallel_moe.gate_up_canonical(self._weight("w13"), self.gate_up_shards)[0]
    return _common.to_layout(w, self.prepared)

  @property
  def w2(self):
    """The stacked down weight pytree ``[E, H, I]``."""
    return self._weight("w2")

  @property
  def nbytes(self) -> int:
    """Bytes of the quantized expert weights (router and biases excluded)."""
    e = self.num_experts
    return e * (_common.weight_nbytes(self.n13, self.hidden_size, self.prepared)
                + _common.weight_nbytes(self.hidden_size, self.intermediate_size, self.prepared))

  def router_logits(self, x: jax.Array) -> jax.Array:
    """float32 ``[..., E_global]`` = ``x @ router.T`` (inputs in the router's dtype)."""
    r = self.router.get_value()
    return jnp.einsum("...h,eh->...e", x.astype(r.dtype), r,
                      preferred_element_type=jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., H] -> [..., H]``; dtypes as ``NVFP4Linear``."""
    from jax_nvfp4.ops import moe as moe_ops
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != self.hidden_size:
      raise ValueError(f"NVFP4MoE: input must be [..., {self.hidden_size}], got {x.shape}")
    compute, out = _common.activation_dtypes(x, self.dtype, "NVFP4MoE")
    self._check_layout_record()
    xc = x.astype(compute)
    routing = self.routing
    if self.correction_bias is not None:
      routing = dataclasses.replace(routing, correction_bias=self.correction_bias.get_value())
    w13, bias13 = self._weight("w13"), self._bias("w13_bias")
    w2, bias2 = self._weight("w2"), self._bias("w2_bias")
    kw = dict(router_logits=self.router_logits(xc), routing=routing, activation=self.activation,
              limit=self.limit, alpha=self.alpha,
              backend=_common.moe_call_backend(self.backend_request, self.backend))
    sharded = _sharding.sharded_moe_weights(
        w13, w2, bias13, bias2, expert_axis=self.expert_axis, tensor_axis=self.tensor_axis,
        gated=self.n13 != self.intermediate_size, gate_up_shards=self.gate_up_shards,
        who="NVFP4MoE")
    if sharded is not None:
      return parallel_moe.sharded_fused_moe(xc, sharded, **kw).astype(out)
    # A pairs w13 goes as it is with the bias in [gate; up] order: fused_moe reorders the bias.
    w13, bias13 = parallel_moe.gate_up_canonical(w13, self.gate_up_shards, bias13)
    y = moe_ops.fused_moe(
        xc, w13, w2, w13_bias=bias13, w2_bias=bias2, **kw,
        expert_map=None if self.expert_map is None else jnp.asarray(self.expert_map, jnp.int32))
    return y.astype(out)

"""A MoE layer's two grouped GEMMs as one primitive, ``nvfp4_moe_pair`` (one CUDA handler).

Reading order: contract -> checks and abstract eval -> reference lowering -> CUDA lowering ->
batching -> wrapper.

Why: launched by one handler, GEMM 2's blocks may start (programmatic dependent launch, sm_90)
while GEMM 1's last blocks drain. XLA records every custom call as its own command, and no
such overlap exists between two calls (benchmarks/NOTES_moe.md v27-v29). Opt-in
(``JAX_NVFP4_MOE_PAIR=1``, read by ``fused_moe`` at trace time) until the layer measures it
faster on a GPU.

Contract (one result; exactly ``nvfp4_moe_gemm_p`` twice, ``ops/moe.py``'s docstring)::

  nvfp4_moe_pair_p.bind(x, qweight1, qscales1, global_scale1, bias1,
                        qweight2, qscales2, global_scale2, bias2,
                        sorted_ids, block_expert, num_padded, topk_weights,
                        n1=int, k1=int, n2=int, top_k=int, num_rows_out=int, block_m=int,
                        has_bias1=bool, has_bias2=bool, zero_unwritten=bool, backend=str,
                        expert_rows=int, activation=str, limit=float, alpha=float)

  mid = nvfp4_moe_gemm_p(x, W1..., gather_div=top_k, mul_topk_weight=False,
                         zero_unwritten=False, activation=activation)   # [rows, I]
  out = nvfp4_moe_gemm_p(mid, W2..., gather_div=1, mul_topk_weight=True,
                         zero_unwritten=zero_unwritten)                  # [rows, n2]

with ``activation`` one of ``"swiglu"``, ``"gptoss"`` (W1 in ``gate_up_pairs`` order, I = n1 /
2) or ``"relu2"`` (I = n1), and ``k2 = I``. ``topk_weights`` is float32 ``[num_rows_out]``;
``bias1`` ``[E, n1]`` / ``bias2`` ``[E, n2]`` float32, or ``[0]`` when absent. The rows of
``mid`` no block writes are never read (GEMM 2 reads the rows of the same alignment), so the
result is bit for bit the two primitives' on every backend.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_nvfp4 import _ffi
from jax_nvfp4.moe.activations import GPTOSS_ALPHA
from jax_nvfp4.moe.align import Alignment
from jax_nvfp4.ops import dense as dense_ops
from jax_nvfp4.ops import moe as moe_ops
from jax_nvfp4.ops._batching import map_unless_weights_batched
from jax_nvfp4.prepare import PreparedNVFP4Weight

CUDA_TARGET = "jax_nvfp4_moe_pair_cuda"
#: GEMM 1's fused activations (``nvfp4_moe_gemm``'s, but "none": a layer has one).
PAIR_ACTIVATIONS = ("swiglu", "gptoss", "relu2")
#: The environment variable that sends ``fused_moe``'s two grouped GEMMs through this primitive.
ENV = "JAX_NVFP4_MOE_PAIR"


def pair_enabled() -> bool:
  """Whether ``fused_moe`` runs its GEMMs as one ``nvfp4_moe_pair`` (``JAX_NVFP4_MOE_PAIR=1``,
  read at trace time; off by default until measured faster)."""
  return os.environ.get(ENV, "0") == "1"


# ----------------------------------------------------------------------------- checks

def _fail(msg: str, exc=ValueError):
  raise exc(f"nvfp4_moe_pair: {msg}")


def _empty():
  return jax.core.ShapedArray((0,), jnp.float32)


def _gemm_params(params):
  """The two ``nvfp4_moe_gemm_p`` parameter sets of a pair's parameters."""
  p = dict(params)
  n1, k1, n2, top_k = p.pop("n1"), p.pop("k1"), p.pop("n2"), p.pop("top_k")
  has_bias1, has_bias2 = p.pop("has_bias1"), p.pop("has_bias2")
  activation, limit, alpha = p.pop("activation"), p.pop("limit"), p.pop("alpha")
  zero_unwritten = p.pop("zero_unwritten")
  if activation not in PAIR_ACTIVATIONS:
    _fail(f"activation must be one of {PAIR_ACTIVATIONS} (GEMM 1's fused activation), got "
          f"{activation!r}")
  k2 = n1 // 2 if activation in moe_ops.GATED_ACTIVATIONS else n1
  common = dict(num_rows_out=p.pop("num_rows_out"), block_m=p.pop("block_m"),
                backend=p.pop("backend"), expert_rows=p.pop("expert_rows"))
  if p:
    _fail(f"unknown parameters {sorted(p)}", TypeError)
  g1 = dict(common, n=n1, k=k1, gather_div=top_k, mul_topk_weight=False, has_bias=has_bias1,
            zero_unwritten=False, activation=activation, limit=limit, alpha=alpha)
  g2 = dict(common, n=n2, k=k2, gather_div=1, mul_topk_weight=True, has_bias=has_bias2,
            zero_unwritten=zero_unwritten, activation="none", limit=math.inf,
            alpha=GPTOSS_ALPHA)
  return g1, g2


def _abstract_eval(x, qweight1, qscales1, global_scale1, bias1, qweight2, qscales2,
                   global_scale2, bias2, sorted_ids, block_expert, num_padded, topk_weights,
                   **params):
  g1, g2 = _gemm_params(params)
  if qweight1.shape[:1] != qweight2.shape[:1]:
    _fail(f"w13 and w2 must hold the same experts, got E = {qweight1.shape[:1]} and "
          f"{qweight2.shape[:1]}")
  routing = (sorted_ids, block_expert, num_padded)
  mid = moe_ops._abstract_eval(x, qweight1, qscales1, global_scale1, *routing, _empty(), bias1,
                               **g1)
  return moe_ops._abstract_eval(mid, qweight2, qscales2, global_scale2, *routing, topk_weights,
                                bias2, **g2)


nvfp4_moe_pair_p = Primitive("nvfp4_moe_pair")
nvfp4_moe_pair_p.def_abstract_eval(_abstract_eval)
nvfp4_moe_pair_p.def_impl(lambda *args, **params: jax.jit(
    lambda *a: nvfp4_moe_pair_p.bind(*a, **params))(*args))


# ----------------------------------------------------------------------------- reference

def _reference_lowering(x, qweight1, qscales1, global_scale1, bias1, qweight2, qscales2,
                        global_scale2, bias2, sorted_ids, block_expert, num_padded,
                        topk_weights, **params):
  g1, g2 = _gemm_params(params)
  routing = (sorted_ids, block_expert, num_padded)
  mid = moe_ops._reference_lowering(x, qweight1, qscales1, global_scale1, *routing,
                                    jnp.zeros((0,), jnp.float32), bias1, **g1)
  return moe_ops._reference_lowering(mid, qweight2, qscales2, global_scale2, *routing,
                                     topk_weights, bias2, **g2)


_reference_rule = mlir.lower_fun(_reference_lowering, multiple_results=False)


def _default_lowering(ctx, *args, backend, **params):
  """Every platform but cuda: the reference (``backend="cuda"`` cannot lower here)."""
  if backend == "cuda":
    raise ValueError(f"nvfp4_moe_pair: backend='cuda' runs the CUDA kernel, which cannot lower "
                     f"for platform(s) {tuple(ctx.module_context.platforms)}")
  return _reference_rule(ctx, *args, backend=backend, **params)


mlir.register_lowering(nvfp4_moe_pair_p, _default_lowering)


# ----------------------------------------------------------------------------- CUDA

def _cuda_lowering(ctx, *args, backend="auto", **params):
  """The kernel pair (csrc/nvfp4_moe_gemm.cu MoePairImpl) with each GEMM's launch as
  ``nvfp4_moe_gemm`` picks it alone, or the reference for ``backend="reference"`` (and
  ``"auto"`` without the kernel built)."""
  built = CUDA_TARGET in _ffi.REGISTERED
  if backend == "reference" or (backend == "auto" and not built):
    return _reference_rule(ctx, *args, backend=backend, **params)
  if not built:
    raise ValueError(f"nvfp4_moe_pair: backend='cuda' but {CUDA_TARGET} is not in this build "
                     f"of jax_nvfp4 ({_ffi.why_no_kernels() or 'target not registered'})")
  g1, g2 = _gemm_params(dict(params, backend=backend))
  x_aval, slots = ctx.avals_in[0], ctx.avals_in[9].shape[0]
  bf16 = np.dtype(x_aval.dtype) == np.dtype(jnp.bfloat16)
  block_m, rows, expert_rows = params["block_m"], params["num_rows_out"], params["expert_rows"]
  moe_ops.check_block_m_fits("nvfp4_moe_pair", block_m)
  moe_ops.check_token_tiles("nvfp4_moe_pair", slots, block_m)
  attrs, workspaces = {}, []
  for i, g in ((1, g1), (2, g2)):
    dense_ops.check_kernel_weight_size("nvfp4_moe_pair", g["n"], g["k"])
    k_slices, splits, cluster, tiles = moe_ops.moe_launch_spec(slots, g["n"], g["k"], block_m,
                                                               expert_rows, bf16)
    attrs.update({f"splits{i}": np.int64(splits), f"cluster{i}": bool(cluster),
                  f"k_slices{i}": np.int64(k_slices), f"tiles_per_block{i}": np.int64(tiles)})
    workspaces.append(jax.core.ShapedArray(
        (moe_ops.moe_workspace_bytes(slots, g["n"], block_m, splits, cluster),), jnp.uint8))
  mid = jax.core.ShapedArray((rows, g2["k"]), x_aval.dtype)
  results = jax.ffi.ffi_lowering(CUDA_TARGET)(
      ctx.replace(avals_out=[ctx.avals_out[0], mid, *workspaces]), *args,
      n1=np.int64(params["n1"]), k1=np.int64(params["k1"]), n2=np.int64(params["n2"]),
      top_k=np.int64(params["top_k"]), num_rows_out=np.int64(rows), block_m=np.int64(block_m),
      has_bias1=bool(params["has_bias1"]), has_bias2=bool(params["has_bias2"]),
      zero_unwritten=bool(params["zero_unwritten"]), expert_rows=np.int64(expert_rows),
      activation=np.int64(moe_ops.ACTIVATION_CODES[params["activation"]]),
      act_limit=np.float32(params["limit"]), act_alpha=np.float32(params["alpha"]), **attrs)
  return [results[0]]


mlir.register_lowering(nvfp4_moe_pair_p, _cuda_lowering, platform="cuda")


# ----------------------------------------------------------------------------- batching

# As nvfp4_moe_gemm's: one pair per batch element over shared expert weights.
batching.primitive_batchers[nvfp4_moe_pair_p] = map_unless_weights_batched(
    nvfp4_moe_pair_p, tuple(range(1, 9)), "both weights' qweight, qscales, global_scale, bias")


# ----------------------------------------------------------------------------- wrapper

def _bias(b):
  return jnp.zeros((0,), jnp.float32) if b is None else jnp.asarray(b).astype(jnp.float32)


def nvfp4_moe_pair(x: jax.Array, w13: PreparedNVFP4Weight, w2: PreparedNVFP4Weight,
                   alignment: Alignment, *, top_k: int, topk_weights: jax.Array,
                   activation: str, limit: float | None = None, alpha: float = GPTOSS_ALPHA,
                   w13_bias: jax.Array | None = None, w2_bias: jax.Array | None = None,
                   zero_unwritten: bool = True, backend: str | None = "auto",
                   expert_rows: int = 0) -> jax.Array:
  """A layer's GEMM 1 (its activation fused) and GEMM 2 (times the top-k weight) in one call:
  ``[M*top_k, H]``, bit for bit ``nvfp4_moe_gemm`` twice (module docstring).

  Args:
    x: bfloat16/float16 ``[M, H]`` tokens.
    w13: stacked ``PreparedNVFP4Weight`` ``[E, N13, H]``: ``prepare(w13, gate_up_pairs=True)``
      for a gated activation, ``prepare(w13)`` for relu2.
    w2: stacked ``PreparedNVFP4Weight`` ``[E, H, I]``.
    alignment: ``align_tokens``' schedule of the ``M * top_k`` (token, k) pairs.
    top_k: experts per token (GEMM 1 reads x row ``sid // top_k``).
    topk_weights: float ``[M * top_k]`` (or ``[M, top_k]``), GEMM 2's row weights.
    activation, limit, alpha: GEMM 1's fused activation (``nvfp4_moe_gemm``).
    w13_bias, w2_bias: optional float ``[E, N13]`` (in w13's row order) / ``[E, H]``.
    zero_unwritten, backend, expert_rows: as ``nvfp4_moe_gemm`` (for GEMM 2's output).
  """
  for name, w in (("w13", w13), ("w2", w2)):
    if not isinstance(w, PreparedNVFP4Weight):
      raise TypeError(f"nvfp4_moe_pair: {name} must be a stacked PreparedNVFP4Weight, got "
                      f"{type(w).__name__}")
  if activation not in PAIR_ACTIVATIONS:
    raise ValueError(f"nvfp4_moe_pair: activation must be one of {PAIR_ACTIVATIONS} (GEMM 1's "
                     f"fused activation), got {activation!r}")
  gated = activation in moe_ops.GATED_ACTIVATIONS
  if gated != w13.gate_up_pairs:
    raise ValueError(f"nvfp4_moe_pair: activation {activation!r} needs w13 prepared with "
                     f"gate_up_pairs={gated}")
  if w2.gate_up_pairs:
    raise ValueError("nvfp4_moe_pair: w2 must be prepared without gate_up_pairs")
  inter = w13.n // 2 if gated else w13.n
  if w2.k != inter:
    raise ValueError(f"nvfp4_moe_pair: w2 must be [E, H, I = {inter}] (GEMM 1's output "
                     f"columns), got {w2.shape}")
  if activation == "gptoss" and limit is None:
    raise ValueError("nvfp4_moe_pair: activation 'gptoss' needs limit (gpt-oss uses 7.0)")
  backend = "auto" if backend is None else backend
  if backend not in moe_ops.LOWERINGS:
    raise ValueError(f"nvfp4_moe_pair: backend must be None or one of {moe_ops.LOWERINGS}, "
                     f"got {backend!r}")
  rows = x.shape[0] * top_k
  if rows > alignment.num_pairs:
    raise ValueError(f"nvfp4_moe_pair: M * top_k = {rows} exceeds the alignment's "
                     f"{alignment.num_pairs} (token, k) pairs")
  tw = jnp.asarray(topk_weights).astype(jnp.float32).reshape(-1)
  return nvfp4_moe_pair_p.bind(
      x, w13.qweight, w13.qscales, w13.global_scale, _bias(w13_bias), w2.qweight, w2.qscales,
      w2.global_scale, _bias(w2_bias), alignment.sorted_ids, alignment.block_expert,
      alignment.num_padded, tw, n1=w13.n, k1=w13.k, n2=w2.n, top_k=int(top_k),
      num_rows_out=rows, block_m=alignment.block_m, has_bias1=w13_bias is not None,
      has_bias2=w2_bias is not None, zero_unwritten=bool(zero_unwritten), backend=backend,
      expert_rows=int(expert_rows), activation=activation,
      limit=math.inf if limit is None else float(limit), alpha=float(alpha))

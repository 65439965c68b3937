"""``dequantize_blocks``: a prepared (kernel-layout) NVFP4 weight expanded to 16-bit floats.

  out[..., n, k] = e2m1(code[..., n, k]) * block_scale[..., n, k // 16]      (no global scale)

exact in bfloat16 and float16 (a 2-bit-mantissa code times an E4M3 scale). It feeds the prefill
path of ``nvfp4_matmul`` (an XLA GEMM on the expanded weight, the global scale applied to its
float32 result, as the kernel does). On CUDA GPUs it runs ``csrc/nvfp4_dequant.cu`` (HBM speed);
elsewhere, and for ``backend="reference"``, the pure-JAX ``unprepare`` + ``dequantize``.

Reading order: checks -> primitive and abstract eval -> lowerings -> batching -> public API.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_nvfp4 import _ffi
from jax_nvfp4.ops._batching import batch_dim_first
from jax_nvfp4.format import dequantize
from jax_nvfp4.prepare import PreparedNVFP4Weight, interleave_gate_up, kernel_shapes, unprepare

CUDA_TARGET = "jax_nvfp4_dequantize_cuda"
OUT_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


# ----------------------------------------------------------------------------- checks

def _check(qweight, qscales, *, n, k, dtype):
  if np.dtype(dtype) not in OUT_DTYPES:
    raise TypeError(f"dequantize_blocks: dtype must be bfloat16 or float16, got {dtype}")
  if n < 1 or k < 16 or k % 16:
    raise ValueError(f"dequantize_blocks: need N >= 1 and K a positive multiple of 16, got "
                     f"[N, K] = [{n}, {k}]")
  want_w, want_s = kernel_shapes(n, k)
  lead = tuple(qweight.shape[:-4])
  if (np.dtype(qweight.dtype) != np.uint32 or len(qweight.shape) < 4
      or tuple(qweight.shape[-4:]) != want_w):
    raise ValueError(f"dequantize_blocks: qweight must be uint32 [..., {', '.join(map(str, want_w))}]"
                     f" for [N, K] = [{n}, {k}], got {qweight.dtype} {tuple(qweight.shape)}")
  if np.dtype(qscales.dtype) != np.uint8 or tuple(qscales.shape) != (*lead, *want_s):
    raise ValueError(f"dequantize_blocks: qscales must be uint8 {(*lead, *want_s)}, got "
                     f"{qscales.dtype} {tuple(qscales.shape)}")
  return lead


# ----------------------------------------------------------------------------- primitive

nvfp4_dequantize_p = Primitive("nvfp4_dequantize")


def _abstract_eval(qweight, qscales, *, n, k, dtype, backend):
  lead = _check(qweight, qscales, n=n, k=k, dtype=dtype)
  return jax.core.ShapedArray((*lead, n, k), dtype)


nvfp4_dequantize_p.def_abstract_eval(_abstract_eval)
nvfp4_dequantize_p.def_impl(lambda *args, **params: jax.jit(
    lambda *a: nvfp4_dequantize_p.bind(*a, **params))(*args))


# ----------------------------------------------------------------------------- lowerings

def reference(qweight, qscales, *, n, k, dtype, backend="reference"):
  """The primitive's semantics in pure JAX: ``unprepare`` back to the checkpoint layout, then
  ``dequantize`` with a unit global scale."""
  del backend
  unit = jnp.ones(qweight.shape[:-4], jnp.float32)
  return dequantize(unprepare(PreparedNVFP4Weight(qweight, qscales, unit, n=n, k=k)), dtype)


_reference_rule = mlir.lower_fun(reference, multiple_results=False)


def _host_lowering(ctx, qweight, qscales, *, n, k, dtype, backend):
  if backend == "cuda":
    raise ValueError("dequantize_blocks: backend='cuda' needs a computation placed on a CUDA GPU")
  return _reference_rule(ctx, qweight, qscales, n=n, k=k, dtype=dtype, backend=backend)


mlir.register_lowering(nvfp4_dequantize_p, _host_lowering)


def _cuda_lowering(ctx, qweight, qscales, *, n, k, dtype, backend):
  """The kernel where it is built (``backend="auto"``/``"cuda"``), else the reference."""
  built = CUDA_TARGET in _ffi.REGISTERED
  if backend == "reference" or (backend == "auto" and not built):
    return _reference_rule(ctx, qweight, qscales, n=n, k=k, dtype=dtype, backend=backend)
  if not built:
    raise ValueError(f"dequantize_blocks: backend='cuda' but the CUDA kernel is not available: "
                     f"{_ffi.why_no_kernels() or 'not registered'}")
  return jax.ffi.ffi_lowering(CUDA_TARGET)(ctx, qweight, qscales, n=np.int64(n), k=np.int64(k))


mlir.register_lowering(nvfp4_dequantize_p, _cuda_lowering, platform="cuda")


# ----------------------------------------------------------------------------- batching

def _batch(args, dims, **params):
  # The batch dim becomes one more leading (expert-like) dim: the kernel handles any.
  _, args = batch_dim_first(args, dims)
  return nvfp4_dequantize_p.bind(*args, **params), 0


batching.primitive_batchers[nvfp4_dequantize_p] = _batch


# ----------------------------------------------------------------------------- public API

def dequantize_blocks(w: PreparedNVFP4Weight, dtype=jnp.bfloat16, *,
                      backend: str = "auto") -> jax.Array:
  """``e2m1(code) * block_scale`` of a prepared weight, ``[..., N, K]`` in ``dtype``; exact.
  Rows are in the logical order (a ``gate_up_pairs`` w13 comes back as ``[gate; up]``, as
  ``dequantize`` and ``unprepare`` give it).

  The global scale is *not* applied (multiply the float32 product of a GEMM by
  ``w.global_scale``, as ``nvfp4_matmul``'s prefill path does).

  Args:
    w: a ``PreparedNVFP4Weight`` ``[..., N, K]`` (stacked weights keep their leading dims).
    dtype: ``jnp.bfloat16`` (default) or ``jnp.float16``.
    backend: ``"auto"`` (the CUDA kernel where built, when lowered for a GPU), ``"cuda"``
      (require it there) or ``"reference"`` (pure JAX everywhere).
  """
  if not isinstance(w, PreparedNVFP4Weight):
    raise TypeError(f"dequantize_blocks expects a PreparedNVFP4Weight, got {type(w).__name__}")
  if backend not in ("auto", "cuda", "reference"):
    raise ValueError(f"dequantize_blocks: backend must be 'auto', 'cuda' or 'reference', got "
                     f"{backend!r}")
  out = nvfp4_dequantize_p.bind(w.qweight, w.qscales, n=w.n, k=w.k, dtype=np.dtype(dtype),
                                backend=backend)
  if w.gate_up_pairs:  # stored in gate/up pairs of 8 rows per tile: back to [gate; up]
    out = interleave_gate_up(out, out.ndim - 2, w.n // 16, inverse=True)
  return out

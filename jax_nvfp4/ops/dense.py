"""``nvfp4_matmul``: ``y = x @ W.T (+ bias)`` with an NVFP4 weight ``W[N, K]`` (W4A16).

Reading order: argument checks -> primitive and abstract eval -> lowerings -> batching.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_nvfp4.format import BLOCK_SIZE, NVFP4Weight, check_weight
from jax_nvfp4.reference import reference_matmul

ACTIVATION_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


# ----------------------------------------------------------------------------- checks

def _check(x_aval, packed_aval, scales_aval, gs_aval, bias_aval):
  if np.dtype(x_aval.dtype) not in ACTIVATION_DTYPES:
    raise TypeError(f"nvfp4_matmul: x must be bfloat16 or float16 [..., K], got {x_aval.dtype}")
  if len(x_aval.shape) < 1:
    raise ValueError("nvfp4_matmul: x must have rank >= 1 ([..., K]), got a scalar")
  check_weight(packed_aval, scales_aval, gs_aval)
  if len(packed_aval.shape) != 2:
    raise ValueError("nvfp4_matmul: w must be a single [N, K] weight (no leading dims), got "
                     f"logical shape {(*packed_aval.shape[:-1], 2 * packed_aval.shape[-1])}")
  n, k = packed_aval.shape[0], 2 * packed_aval.shape[1]
  if x_aval.shape[-1] != k:
    raise ValueError(f"nvfp4_matmul: x's last dim is {x_aval.shape[-1]} but w has K = {k} "
                     f"(w is [N, K] = [{n}, {k}])")
  if bias_aval is not None:
    if tuple(bias_aval.shape) != (n,):
      raise ValueError(f"nvfp4_matmul: bias must have shape ({n},), got {tuple(bias_aval.shape)}")
    if np.dtype(bias_aval.dtype) != np.float32:
      raise TypeError(f"nvfp4_matmul: bias must be float32 here, got {bias_aval.dtype}")
  return n, k


# ----------------------------------------------------------------------------- primitive

nvfp4_matmul_p = Primitive("nvfp4_matmul")


def _abstract_eval(x, packed, scales, global_scale, *bias, has_bias):
  n, _ = _check(x, packed, scales, global_scale, bias[0] if has_bias else None)
  return jax.core.ShapedArray((*x.shape[:-1], n), x.dtype)


nvfp4_matmul_p.def_abstract_eval(_abstract_eval)
nvfp4_matmul_p.def_impl(lambda *args, **params: jax.jit(
    lambda *a: nvfp4_matmul_p.bind(*a, **params))(*args))


# ----------------------------------------------------------------------------- lowering

def _reference_impl(x, packed, scales, global_scale, *bias, has_bias):
  w = NVFP4Weight(packed, scales, global_scale)
  return reference_matmul(x, w, bias[0] if has_bias else None)


# Every platform gets the reference; the CUDA kernel lowering overrides it where it is built.
mlir.register_lowering(nvfp4_matmul_p, mlir.lower_fun(_reference_impl, multiple_results=False))


# ----------------------------------------------------------------------------- batching

def _batch(args, dims, *, has_bias):
  x, *weight_ops = args
  x_dim, *weight_dims = dims
  if all(d is None for d in weight_dims):
    # Leading dims of x fold into M: just move the batch dim to the front.
    x = jnp.moveaxis(x, x_dim, 0)
    return nvfp4_matmul_p.bind(x, *weight_ops, has_bias=has_bias), 0
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  args = [jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
          for a, d in zip(args, dims)]
  out = jax.lax.map(lambda ops: nvfp4_matmul_p.bind(*ops, has_bias=has_bias), tuple(args))
  return out, 0


batching.primitive_batchers[nvfp4_matmul_p] = _batch


# ----------------------------------------------------------------------------- public API

def nvfp4_matmul(x: jax.Array, w: NVFP4Weight, bias: jax.Array | None = None) -> jax.Array:
  """``x @ dequantize(w).T + bias`` with the weight kept in NVFP4.

  Args:
    x: ``[..., K]`` bfloat16 or float16 activations (any leading dims, including M = 0).
    w: an ``NVFP4Weight`` with logical shape ``[N, K]``, K a multiple of 16.
    bias: optional ``[N]`` float bias, added in float32 before the cast to ``x.dtype``.

  Returns:
    ``[..., N]`` in ``x.dtype``. Accumulation is float32; the result equals
    ``reference_matmul`` up to accumulation order.
  """
  if not isinstance(w, NVFP4Weight):
    raise TypeError(f"nvfp4_matmul: w must be an NVFP4Weight, got {type(w).__name__}")
  x = jnp.asarray(x)
  ops = [x, w.packed, w.scales, w.global_scale]
  if bias is not None:
    bias = jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"nvfp4_matmul: bias must be floating, got {bias.dtype}")
    ops.append(bias.astype(jnp.float32))
  return nvfp4_matmul_p.bind(*ops, has_bias=bias is not None)

"""Reference (pure JAX) implementations: the CPU lowering and the test oracle for the kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_nvfp4.format import NVFP4Weight, dequantize


def reference_matmul(x: jax.Array, w: NVFP4Weight, bias: jax.Array | None = None) -> jax.Array:
  """``x @ dequantize(w).T (+ bias)``: float32 weight and accumulation, output in ``x.dtype``.

  ``x``: ``[..., K]`` bf16/fp16; ``w``: an ``NVFP4Weight`` (checkpoint layout) of logical shape
  ``[N, K]``; ``bias``: float ``[N]`` or None, added in float32 before the cast.
  Returns ``[..., N]`` in ``x.dtype``. The oracle of ``nvfp4_matmul`` and its CPU lowering.
  """
  w32 = dequantize(w, jnp.float32)
  out = jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w32,
                   precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  return out.astype(x.dtype)

"""FP8 (E4M3) weights with a per-tensor float32 scale, as ModelOpt's ``FP8`` layers store them.

``W = float32(weight) * scale`` (ModelOpt: ``weight`` F8_E4M3 ``[N, K]``, ``weight_scale`` F32
``[]``). Stacked MoE experts carry leading dims: ``weight [E, N, K]``, ``scale [E]``.

jax_nvfp4 has no FP8 kernel: ``fp8_matmul`` upcasts the weight to the activation dtype in XLA
(exact: every E4M3 value is a bfloat16 and a float16), multiplies with float32 accumulation,
and applies the scale to the float32 result, as FP8 engines apply a per-tensor weight scale to
their accumulator.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FP8_DTYPE = np.dtype(jnp.float8_e4m3fn)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FP8Weight:
  """An FP8 E4M3 weight ``[..., N, K]`` with one float32 scale per tensor ``[...]``.

  Attributes:
    weight: float8_e4m3fn ``[..., N, K]``.
    scale: float32 ``[...]`` (a scalar for a plain Linear, ``[E]`` for stacked experts).
    dtype: the dtype ``dequantize_fp8`` returns by default (static).
  """

  weight: jax.Array
  scale: jax.Array
  dtype: Any = dataclasses.field(default=jnp.bfloat16, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.weight.shape)

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for a in (self.weight, self.scale))

  def validate(self) -> None:
    check_fp8_weight(self.weight, self.scale)


def check_fp8_weight(weight, scale, *, name: str = "w") -> None:
  """Raises TypeError/ValueError unless ``weight``/``scale`` form an ``FP8Weight``."""
  if np.dtype(weight.dtype) != FP8_DTYPE:
    raise TypeError(f"{name}.weight must be float8_e4m3fn [..., N, K], got {weight.dtype}")
  if np.dtype(scale.dtype) != np.float32:
    raise TypeError(f"{name}.scale must be float32 [...], got {scale.dtype}")
  if len(weight.shape) < 2:
    raise ValueError(f"{name}.weight must have rank >= 2 ([..., N, K]), got {weight.shape}")
  if tuple(scale.shape) != tuple(weight.shape[:-2]):
    raise ValueError(f"{name}.scale must have shape {tuple(weight.shape[:-2])} (one per "
                     f"leading index), got {tuple(scale.shape)}")


def dequantize_fp8(w: FP8Weight, dtype=None) -> jax.Array:
  """``float32(weight) * scale`` in float32, cast to ``dtype`` (default ``w.dtype``)."""
  dtype = w.dtype if dtype is None else dtype
  scale = jnp.asarray(w.scale, jnp.float32)[..., None, None]
  return (w.weight.astype(jnp.float32) * scale).astype(dtype)


def fp8_matmul(x: jax.Array, w: FP8Weight, bias: jax.Array | None = None) -> jax.Array:
  """``y = x @ W.T + bias`` for an FP8 weight ``W [N, K]`` and ``x [..., K]`` (bf16/fp16).

  Computed as ``(x @ upcast(weight).T in float32) * scale + bias``, cast to ``x.dtype``.
  Returns ``[..., N]``.
  """
  x = jnp.asarray(x)
  if not isinstance(w, FP8Weight):
    raise TypeError(f"fp8_matmul: w must be an FP8Weight, got {type(w).__name__}")
  check_fp8_weight(w.weight, w.scale)
  if w.weight.ndim != 2:
    raise ValueError(f"fp8_matmul: w must be one [N, K] weight, got shape {w.shape}")
  if np.dtype(x.dtype) not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
    raise TypeError(f"fp8_matmul: x must be bfloat16 or float16, got {x.dtype}")
  n, k = w.weight.shape
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"fp8_matmul: x must be [..., K = {k}], got shape {x.shape}")
  if bias is not None and tuple(jnp.shape(bias)) != (n,):
    raise ValueError(f"fp8_matmul: bias must have shape ({n},), got {tuple(jnp.shape(bias))}")
  wx = w.weight.astype(x.dtype)  # exact
  acc = jax.lax.dot_general(x, wx, (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
  acc = acc * jnp.asarray(w.scale, jnp.float32)
  if bias is not None:
    acc = acc + jnp.asarray(bias, jnp.float32)
  return acc.astype(x.dtype)

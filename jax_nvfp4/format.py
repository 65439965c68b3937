"""The NVFP4 weight format, in pure JAX.

Logical weight ``W[..., N, K]`` (``[out, in]``, optional leading expert dims) is stored as:

* ``packed``  uint8 ``[..., N, K/2]``: FP4 E2M1 codes, two per byte along K. Byte ``j`` of a row
  holds element ``2j`` in the low nibble and element ``2j+1`` in the high nibble. A code is
  ``sign << 3 | index`` where ``index`` points into ``E2M1_VALUES``.
* ``scales``  float8_e4m3fn ``[..., N, K/16]``: one block scale per 16 consecutive K elements.
* ``global_scale`` float32 ``[...]``: one per tensor (per expert for stacked experts). This is
  ModelOpt's ``weight_scale_2`` convention: it *multiplies*.

``W = e2m1 * (float32(scales) * global_scale)``, computed in float32, then cast.

Everything here is jit-able and works with any number of leading dims.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Elements per E4M3 block scale, consecutive along K (the last axis).
BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9

#: The magnitudes of the 8 non-negative E2M1 codes, indexed by the 3 low bits of a code.
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
#: All 16 codes: ``E2M1_CODE_VALUES[code]`` (codes 8..15 are the negatives, code 8 is -0.0).
E2M1_CODE_VALUES = np.concatenate([E2M1_VALUES, -E2M1_VALUES]).astype(np.float32)

# Rounding thresholds onto the E2M1 grid (round to nearest, ties to the even mantissa):
# |x| <= .25 -> 0, < .75 -> .5, <= 1.25 -> 1, < 1.75 -> 1.5, <= 2.5 -> 2, < 3.5 -> 3, <= 5 -> 4,
# else 6. "<=" where the tie goes down (to an even mantissa), "<" where it goes up.
_THRESHOLDS = ((0.25, True), (0.75, False), (1.25, True), (1.75, False),
               (2.5, True), (3.5, False), (5.0, True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NVFP4Weight:
  """An NVFP4-quantized weight in checkpoint layout (see the module docstring).

  A pytree (the three arrays are leaves, ``dtype`` is static) for a logical weight
  ``W[..., N, K]`` (``[out, in]``; leading dims for stacked experts), ``K`` a multiple of 16:
  ``W = e2m1(codes) * (float32(scales) * global_scale)``.

  Attributes:
    packed: uint8 ``[..., N, K // 2]``: byte ``j`` of a row holds element ``2j`` in its low
      nibble and ``2j + 1`` in its high nibble; a nibble is ``sign << 3 | i``, value
      ``(-1)^sign * E2M1_VALUES[i]``.
    scales: float8_e4m3fn ``[..., N, K // 16]``: the scale of elements ``16b .. 16b + 15``.
    global_scale: float32 ``[...]`` (one per leading index; a scalar for a plain Linear), a
      multiplier (ModelOpt's ``weight_scale_2``).
    dtype: the dtype ``dequantize`` returns by default (static).

  Properties: ``shape`` (logical ``(..., N, K)``), ``n``, ``k``, ``nbytes`` (bytes of the three
  arrays).
  """

  packed: jax.Array
  scales: jax.Array
  global_scale: jax.Array
  dtype: Any = dataclasses.field(default=jnp.bfloat16, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    """Logical shape ``(..., N, K)``."""
    *lead, n, half_k = self.packed.shape
    return (*lead, n, 2 * half_k)

  @property
  def n(self) -> int:
    return self.shape[-2]

  @property
  def k(self) -> int:
    return self.shape[-1]

  @property
  def nbytes(self) -> int:
    """Bytes held by the quantized representation."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for a in (self.packed, self.scales, self.global_scale))

  def validate(self) -> None:
    """Raises ValueError/TypeError if the arrays do not form a consistent NVFP4 weight."""
    check_weight(self.packed, self.scales, self.global_scale)


def check_weight(packed, scales, global_scale, *, name: str = "w") -> None:
  """Validates the dtypes and shapes of an NVFP4 weight's three arrays."""
  if np.dtype(packed.dtype) != np.uint8:
    raise TypeError(f"{name}.packed must be uint8 [..., N, K/2], got {packed.dtype}")
  if np.dtype(scales.dtype) != np.dtype(jnp.float8_e4m3fn):
    raise TypeError(f"{name}.scales must be float8_e4m3fn [..., N, K/16], got {scales.dtype}")
  if np.dtype(global_scale.dtype) != np.float32:
    raise TypeError(f"{name}.global_scale must be float32, got {global_scale.dtype}")
  if len(packed.shape) < 2:
    raise ValueError(f"{name}.packed must have rank >= 2 ([..., N, K/2]), got {packed.shape}")
  *lead, n, half_k = packed.shape
  k = 2 * half_k
  if k % BLOCK_SIZE:
    raise ValueError(f"{name}: K = {k} must be a multiple of {BLOCK_SIZE}")
  if tuple(scales.shape) != (*lead, n, k // BLOCK_SIZE):
    raise ValueError(f"{name}.scales must have shape {(*lead, n, k // BLOCK_SIZE)} for packed "
                     f"{tuple(packed.shape)}, got {tuple(scales.shape)}")
  if tuple(global_scale.shape) != tuple(lead):
    raise ValueError(f"{name}.global_scale must have shape {tuple(lead)} (one per leading index), "
                     f"got {tuple(global_scale.shape)}")


def round_to_e2m1(x: jax.Array) -> jax.Array:
  """Rounds float32 ``x`` (already divided by its scale) to E2M1 codes (uint8 in 0..15).

  Round to nearest, ties to the even mantissa, saturating at +-6. Strictly negative inputs keep
  the sign bit even when they round to zero (code 8, "-0"), as the reference tools write them.
  NaN maps to code 0.
  """
  x = jnp.asarray(x, jnp.float32)
  mag = jnp.abs(x)
  index = jnp.zeros(x.shape, jnp.uint8)
  for threshold, tie_down in _THRESHOLDS:
    above = mag > threshold if tie_down else mag >= threshold
    index = index + above.astype(jnp.uint8)
  index = jnp.where(jnp.isnan(x), jnp.uint8(0), index)
  sign = (x < 0).astype(jnp.uint8) << 3
  return sign | index


def e2m1_to_float(codes: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Maps E2M1 codes (any integer dtype, 0..15) to their values (``E2M1_CODE_VALUES``).

  By arithmetic on the bits (sign, 2-bit exponent e, 1-bit mantissa m: ``m / 2`` for e = 0,
  ``2^(e-1) (1 + m / 2)`` else), not a table lookup: a gather by codes sharded over an
  explicit mesh axis is refused by JAX, elementwise code keeps the codes' sharding.
  """
  c = codes.astype(jnp.int32)
  e, m = (c >> 1) & 3, (c & 1).astype(jnp.float32)
  mag = jnp.where(e == 0, 0.5 * m, (1 << e).astype(jnp.float32) * (0.25 * m + 0.5))
  return jnp.where((c & 8) != 0, -mag, mag).astype(dtype)


def pack_fp4(codes: jax.Array) -> jax.Array:
  """Packs E2M1 codes ``[..., K]`` (any integer dtype, values 0..15, K even) into uint8 bytes
  ``[..., K/2]``: element ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high one."""
  if codes.shape[-1] % 2:
    raise ValueError(f"pack_fp4 needs an even last dimension, got {codes.shape}")
  # Pairs as a trailing axis of 2, not strided slices: a strided slice of codes sharded on K over
  # an explicit mesh axis becomes a gather JAX refuses outside jit.
  pairs = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
  return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: jax.Array) -> jax.Array:
  """Inverse of ``pack_fp4``: bytes ``[..., K/2]`` (any integer dtype, read as uint8) to
  uint8 codes ``[..., K]`` in 0..15 (low nibble first)."""
  packed = packed.astype(jnp.uint8)
  lo = packed & 0xF
  hi = packed >> 4
  return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _div(a: jax.Array, b) -> jax.Array:
  """IEEE ``a / b`` with ``b`` broadcast to ``a``'s shape.

  XLA rewrites a division by a broadcast divisor into a multiplication by its reciprocal, which
  is off by an ulp for a quarter of the inputs (measured on CPU). The reference tools divide,
  so we hide the broadcast behind an optimization barrier to keep the true division.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape))
  return a / b


def _leading_amax(w: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(w), axis=(-2, -1))


def _check_global_scale(global_scale) -> None:
  """A concrete ``global_scale`` must be finite and > 0 (a traced one cannot be checked)."""
  if isinstance(global_scale, jax.core.Tracer):
    return
  g = np.asarray(global_scale, np.float32)
  if not (np.isfinite(g).all() and (g > 0).all()):
    bad = g[~(np.isfinite(g) & (g > 0))]
    raise ValueError(
        f"quantize: global_scale must be finite and > 0, got {float(bad.ravel()[0])}. It is a "
        "multiplier (W = e2m1 * scale * global_scale, ModelOpt's weight_scale_2); "
        "compressed-tensors' weight_global_scale is its reciprocal")


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
  try:
    return np.broadcast_shapes(shape, target) == target
  except ValueError:
    return False


def quantize(w: jax.Array, *, global_scale: jax.Array | None = None) -> NVFP4Weight:
  """Quantizes ``w[..., N, K]`` (float) to NVFP4 with NVIDIA ModelOpt's reference algorithm.

  * Per tensor (per leading index): ``global_scale = amax / (6 * 448)`` unless given, so the
    largest block scale lands at E4M3's maximum. An all-zero tensor gets ``global_scale = 1``.
  * Per 16-element block along K: ``s = block_amax / (6 * global_scale)``; a zero block gets
    ``s = 1``; ``s`` is clamped to ``[2^-9, 448]`` and rounded to E4M3 (nearest even).
  * Elements: ``x / (float32(s_e4m3) * global_scale)`` rounded to E2M1 (nearest, ties to even,
    saturating at 6).

  ``global_scale`` (a multiplier, ModelOpt's ``weight_scale_2``; not compressed-tensors'
  reciprocal ``weight_global_scale``) must be finite and > 0: a concrete value that is not
  raises ValueError (a traced value is not checked).

  Returns an ``NVFP4Weight`` whose ``dtype`` is ``w.dtype``. Never produces NaN for finite input.
  """
  w = jnp.asarray(w)
  if w.ndim < 2:
    raise ValueError(f"quantize expects w[..., N, K] with rank >= 2, got shape {w.shape}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"quantize expects a floating weight, got {w.dtype}")
  *lead, n, k = w.shape
  if k % BLOCK_SIZE:
    raise ValueError(f"quantize: K = {k} (last dim of w) must be a multiple of {BLOCK_SIZE}")
  if n == 0 or k == 0:
    raise ValueError(f"quantize: w[..., N, K] needs N >= 1 and K >= 16, got shape {w.shape}")
  w32 = w.astype(jnp.float32)
  if global_scale is not None:
    if not _broadcasts_to(np.shape(global_scale), tuple(lead)):
      raise ValueError(f"quantize: global_scale must be a scalar or broadcast to w's leading "
                       f"dims {tuple(lead)} (one per tensor), got shape "
                       f"{np.shape(global_scale)}")
    _check_global_scale(global_scale)
  if global_scale is None:
    amax = _leading_amax(w32)
    global_scale = jnp.where(amax > 0, _div(amax, E2M1_MAX * E4M3_MAX), 1.0)
    # A tensor so small that amax / 2688 underflows would divide by zero below.
    global_scale = jnp.where(global_scale > 0, global_scale, 1.0)
  global_scale = jnp.broadcast_to(jnp.asarray(global_scale, jnp.float32), tuple(lead))
  gs = global_scale[..., None, None]

  blocks = w32.reshape(*lead, n, k // BLOCK_SIZE, BLOCK_SIZE)
  block_amax = jnp.max(jnp.abs(blocks), axis=-1)
  s = _div(block_amax, E2M1_MAX * gs)
  s = jnp.where(s == 0, 1.0, s)
  s = jnp.clip(s, E4M3_MIN_SUBNORMAL, E4M3_MAX)
  # The barrier keeps the E4M3 rounding for every reader of the scales (our division below, or
  # prepare() in the same jit). XLA GPU may otherwise skip a float32 -> E4M3 -> float32 round
  # trip (xla_allow_excess_precision) and use the unrounded scale: measured on an H100 under jit,
  # 9 % of the codes off, and prepare() writing scales one E4M3 step low.
  scales = jax.lax.optimization_barrier(s.astype(jnp.float8_e4m3fn))

  denom = scales.astype(jnp.float32) * gs
  scaled = jnp.where(denom[..., None] > 0, _div(blocks, denom[..., None]), 0.0)
  codes = round_to_e2m1(scaled).reshape(*lead, n, k)
  return NVFP4Weight(pack_fp4(codes), scales, global_scale, dtype=w.dtype)


def dequantize(w, dtype=None) -> jax.Array:
  """``W = e2m1 * (float32(scales) * global_scale)`` in float32, cast to ``dtype``.

  Args:
    w: an ``NVFP4Weight`` ``[..., N, K]``, or a ``PreparedNVFP4Weight`` (the kernel layout:
      taken back to the checkpoint layout with ``unprepare`` first, which is exact).
    dtype: the result dtype; default ``w.dtype``.

  Returns ``[..., N, K]`` in ``dtype``. The float32 products are taken in that order (block
  scale times global scale first), as ModelOpt does: the result is bit-exact with its
  dequantization, except that code 8 gives -0.0 where the tool writes +0.0.
  """
  if not isinstance(w, NVFP4Weight):
    from jax_nvfp4.prepare import PreparedNVFP4Weight, unprepare  # prepare imports this module
    if not isinstance(w, PreparedNVFP4Weight):
      raise TypeError("dequantize: expected an NVFP4Weight or PreparedNVFP4Weight, got "
                      f"{type(w).__name__}")
    w = unprepare(w)
  dtype = w.dtype if dtype is None else dtype
  *lead, n, k = w.shape
  values = e2m1_to_float(unpack_fp4(w.packed)).reshape(*lead, n, k // BLOCK_SIZE, BLOCK_SIZE)
  factor = w.scales.astype(jnp.float32) * w.global_scale[..., None, None].astype(jnp.float32)
  return (values * factor[..., None]).reshape(*lead, n, k).astype(dtype)

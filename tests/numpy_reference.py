"""Independent float64 NumPy oracles. They share no code with jax_nvfp4: E2M1 and E4M3 rounding
come from ml_dtypes, the dequant and the matmul are plain float64 NumPy."""

import ml_dtypes
import numpy as np

E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float64)


def codes_from_packed(packed: np.ndarray) -> np.ndarray:
  packed = np.asarray(packed, np.uint8)
  out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
  out[..., 0::2] = packed & 0x0F
  out[..., 1::2] = packed >> 4
  return out


def dequantize(packed, scales, global_scale) -> np.ndarray:
  """float64 W[..., N, K] = e2m1 * scale * global_scale."""
  codes = codes_from_packed(np.asarray(packed))
  s = np.asarray(scales).astype(np.float64)
  gs = np.asarray(global_scale, np.float64)[..., None, None]
  s = np.repeat(s, 16, axis=-1)
  return E2M1[codes] * s * gs


def quantize(w: np.ndarray, gs=None):
  """ModelOpt's algorithm, per tensor over the last two dims; returns codes, scales, gs.

  ``gs`` overrides the global scale (to follow a quantizer whose float32 division of amax was
  one ulp off, as XLA's GPU division can be)."""
  w = np.asarray(w, np.float32)
  amax = np.abs(w).max(axis=(-2, -1))
  if gs is None:
    gs = np.where(amax > 0, amax / np.float32(2688.0), 1.0).astype(np.float32)
  gs = np.asarray(gs, np.float32)
  blocks = w.reshape(*w.shape[:-1], -1, 16)
  bamax = np.abs(blocks).max(axis=-1)
  s = (bamax / (np.float32(6.0) * gs[..., None, None])).astype(np.float32)
  s[s == 0] = 1.0
  s = np.clip(s, 2.0**-9, 448.0).astype(ml_dtypes.float8_e4m3fn)
  denom = s.astype(np.float32) * gs[..., None, None]
  scaled = (blocks / denom[..., None]).astype(np.float32)
  codes = np.clip(scaled, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
  return codes.reshape(w.shape), s, gs

"""prepare(): the kernel layout, decoded by an independent NumPy unpacker written from the
documented bit positions (csrc/nvfp4_gemm.cu), must reproduce the checkpoint weight bit-exactly."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_nvfp4 as nf
from tests import numpy_reference as npref


# The documented bit positions (prepare.CODE_BIT_POSITIONS, restated here on purpose): word bit
# of code bit b (mantissa, exponent low, exponent high, sign) of element e of fragment pair i.
BIT_POSITIONS = [[(0, 1, 2, 9), (16, 17, 18, 25)], [(4, 5, 6, 13), (20, 21, 22, 29)],
                 [(10, 11, 12, 19), (26, 27, 28, 3)], [(14, 7, 8, 15), (30, 23, 24, 31)]]


def code_at(word, pair, e):
  """The 4-bit code of element e of pair `pair` in uint64 words (any shape)."""
  return sum(((word >> np.uint64(pos)) & np.uint64(1)) << np.uint64(b)
             for b, pos in enumerate(BIT_POSITIONS[pair][e]))


def decode_kernel_layout(qweight, qscales, n, k):
  """Independent decoder: returns (codes[N, K] uint8, scales[N, K/16] float64)."""
  qweight = np.asarray(qweight, np.uint32)
  qscales = np.asarray(qscales, np.uint8)
  n16, k64 = qweight.shape[:2]
  codes = np.zeros((n16 * 16, k64 * 64), np.uint8)
  scales = np.zeros((n16 * 16, k64 * 4), np.float64)
  for lane in range(32):
    g, t = divmod(lane, 4)
    for j in range(4):
      word = qweight[:, :, lane, j].astype(np.uint64)            # [n16, k64]
      for pair, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8),
                                         (g + 8, 2 * t + 8)]):
        for e in range(2):
          rows = np.arange(n16)[:, None] * 16 + row
          cols = np.arange(k64)[None, :] * 64 + j * 16 + col + e
          codes[rows, cols] = code_at(word, pair, e).astype(np.uint8)
  for g in range(8):
    for h in range(2):
      for j in range(4):
        u = qscales[:, :, g * 8 + h * 4 + j].astype(np.int64)      # [n16, k64]
        value = (1 + (u & 7) / 8.0) * 2.0 ** ((u >> 3) - 10)
        scales[np.arange(n16)[:, None] * 16 + h * 8 + g, np.arange(k64)[None, :] * 4 + j] = value
  return codes[:n, :k], scales[:n, :k // 16]


@pytest.mark.parametrize("n, k", [(1, 16), (16, 64), (100, 48), (33, 1664), (257, 1408)])
def test_layout_round_trip_bit_exact(rng, n, k):
  packed = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
  # Every positive E4M3 value, subnormals included.
  all_scales = np.arange(1, 127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
  scales = rng.choice(all_scales, size=(n, k // 16))
  w = nf.NVFP4Weight(jnp.asarray(packed), jnp.asarray(scales), jnp.float32(0.75))
  p = jax.jit(nf.prepare)(w)
  assert p.qweight.shape == (-(-n // 16), -(-k // 64), 32, 4) and p.qweight.dtype == jnp.uint32
  codes, dec_scales = decode_kernel_layout(p.qweight, p.qscales, n, k)
  np.testing.assert_array_equal(codes, npref.codes_from_packed(packed))
  np.testing.assert_array_equal(dec_scales, scales.astype(np.float64))
  back = nf.unprepare(p)
  np.testing.assert_array_equal(np.asarray(back.packed), packed)
  np.testing.assert_array_equal(np.asarray(back.scales).view(np.uint8), scales.view(np.uint8))
  assert float(p.global_scale) == 0.75


def test_padding_is_zero_codes():
  w = nf.quantize(jnp.ones((20, 80)))
  p = nf.prepare(w)
  codes, _ = decode_kernel_layout(p.qweight, p.qscales, 32, 128)
  assert not codes[20:, :].any() and not codes[:, 80:].any()


def test_zero_and_negative_scales_made_exact(rng):
  packed = rng.integers(0, 256, size=(16, 32), dtype=np.uint8)
  scales = np.full((16, 4), 2.0, np.float32)
  scales[0, 0], scales[1, 1], scales[2, 2] = 0.0, -3.0, np.nan
  w = nf.NVFP4Weight(jnp.asarray(packed), jnp.asarray(scales, jnp.float8_e4m3fn),
                     jnp.float32(1.0))
  want = npref.dequantize(packed, scales.astype(ml_dtypes.float8_e4m3fn), 1.0)
  want[2, 32:48] = 0.0  # a NaN scale's block is taken as zero
  got = np.asarray(nf.dequantize(nf.unprepare(nf.prepare(w)), jnp.float32), np.float64)
  np.testing.assert_array_equal(np.where(np.signbit(got) & (got == 0), 0.0, got),
                                np.where(want == 0, 0.0, want))


def test_prepare_rejects_bad_weights():
  with pytest.raises(TypeError, match="NVFP4Weight"):
    nf.prepare(jnp.ones((16, 32)))


def test_prepared_matmul_on_reference_path_equals_unprepared(rng):
  w = nf.quantize(jnp.asarray(rng.standard_normal((70, 96)), jnp.float32))
  x = jnp.asarray(rng.standard_normal((3, 96)), jnp.bfloat16)
  bias = jnp.asarray(rng.standard_normal(70), jnp.float32)
  a = nf.reference_matmul(x, w, bias)
  b = jax.jit(nf.nvfp4_matmul)(x, nf.prepare(w), bias)
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  out = jax.eval_shape(nf.nvfp4_matmul, jax.ShapeDtypeStruct((2, 5, 96), jnp.float16),
                       nf.prepare(w))
  assert out.shape == (2, 5, 70) and out.dtype == jnp.float16
  with pytest.raises(ValueError, match="K = 96"):
    nf.nvfp4_matmul(jnp.zeros((2, 64), jnp.bfloat16), nf.prepare(w))


def test_dequantize_takes_the_kernel_layout(rng):
  # A stacked weight off the tile sizes: the prepared weight dequantizes to the same bits, and
  # the values are the NumPy decode of the checkpoint codes.
  w = nf.quantize(jnp.asarray(rng.standard_normal((3, 20, 48)), jnp.float32))
  got = np.asarray(nf.dequantize(nf.prepare(w), jnp.float32))
  np.testing.assert_array_equal(got, np.asarray(nf.dequantize(w, jnp.float32)))
  want = npref.dequantize(np.asarray(w.packed[1]), np.asarray(w.scales[1]),
                          float(w.global_scale[1]))
  np.testing.assert_allclose(got[1], want, rtol=1e-6)
  with pytest.raises(TypeError, match="NVFP4Weight or PreparedNVFP4Weight"):
    nf.dequantize(jnp.ones((16, 32)))

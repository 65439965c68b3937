"""dequantize_blocks (code x block scale of a prepared weight) against float64 NumPy."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.ops import dense
from tests import numpy_reference as npref

DTYPES = [jnp.bfloat16, jnp.float16]


def random_weight(rng, shape, *, tiny=False):
  """All 16 codes; E4M3 block scales over the normal range, or near its subnormal end."""
  *lead, n, k = shape
  packed = rng.integers(0, 256, size=(*lead, n, k // 2), dtype=np.uint8)
  lo, hi = (2.0**-9, 2.0**-5) if tiny else (2.0**-6, 448.0)
  scales = rng.uniform(lo, hi, size=(*lead, n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  gs = rng.uniform(0.01, 0.1, size=tuple(lead)).astype(np.float32)
  return nf.NVFP4Weight(jnp.asarray(packed), jnp.asarray(scales), jnp.asarray(gs))


def expected(w, dtype):
  """float64 e2m1 * scale (no global scale), rounded once to ``dtype`` (exact anyway)."""
  ones = np.ones(np.shape(w.global_scale), np.float64)
  return npref.dequantize(np.asarray(w.packed), np.asarray(w.scales), ones).astype(dtype)


def assert_bitwise(out, want):
  out = np.asarray(out)
  assert out.dtype == want.dtype and out.shape == want.shape
  np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))


# Shapes not a multiple of the 16 x 64 tile; stacked (expert) weights.
SHAPES = [(16, 64), (40, 80), (33, 1664), (2, 24, 208), (3, 2, 17, 48)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_exact(rng, shape, dtype):
  w = random_weight(rng, shape)
  out = jax.jit(lambda p: nf.dequantize_blocks(p, dtype, backend="reference"))(nf.prepare(w))
  assert_bitwise(out, expected(w, dtype))


def test_tiny_scales_exact_in_fp16(rng):
  w = random_weight(rng, (48, 128), tiny=True)
  assert_bitwise(nf.dequantize_blocks(nf.prepare(w), jnp.float16, backend="reference"),
                 expected(w, jnp.float16))


def test_vmap_matches_the_stacked_call(rng):
  w = random_weight(rng, (3, 24, 80))
  p = nf.prepare(w)
  mapped = jax.vmap(lambda q, s: nf.dequantize_blocks(
      nf.PreparedNVFP4Weight(q, s, jnp.float32(1), n=24, k=80)), in_axes=(0, 0))(p.qweight, p.qscales)
  assert_bitwise(mapped, expected(w, jnp.bfloat16))


def test_gate_up_pairs_come_back_in_the_logical_row_order(rng):
  w = random_weight(rng, (2, 96, 80))  # an MoE w13 [E, 2I, H], I = 48
  out = nf.dequantize_blocks(nf.prepare(w, gate_up_pairs=True), backend="reference")
  assert_bitwise(out, expected(w, jnp.bfloat16))


def test_bad_inputs_raise_clear_errors(rng):
  p = nf.prepare(random_weight(rng, (32, 64)))
  with pytest.raises(TypeError, match="PreparedNVFP4Weight"):
    nf.dequantize_blocks(nf.unprepare(p))
  with pytest.raises(TypeError, match="bfloat16 or float16"):
    nf.dequantize_blocks(p, jnp.float32)
  with pytest.raises(ValueError, match="backend"):
    nf.dequantize_blocks(p, backend="triton")
  bad = nf.PreparedNVFP4Weight(p.qweight[:1], p.qscales, p.global_scale, n=32, k=64)
  with pytest.raises(ValueError, match="qweight must be uint32"):
    nf.dequantize_blocks(bad)
  bad = nf.PreparedNVFP4Weight(p.qweight, p.qscales[:1], p.global_scale, n=32, k=64)
  with pytest.raises(ValueError, match="qscales must be uint8"):
    nf.dequantize_blocks(bad)


def test_cuda_backend_refuses_the_host(rng):
  p = nf.prepare(random_weight(rng, (32, 64)))
  traced = jax.jit(lambda p: nf.dequantize_blocks(p, backend="cuda")).trace(p)
  with pytest.raises(ValueError, match="CUDA GPU"):
    traced.lower(lowering_platforms=("cpu",))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES + [(14336, 4096), (4, 200, 1664)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_is_exact(rng, shape, dtype):
  w = random_weight(rng, shape)
  p = nf.prepare(w)
  poison = jnp.full(shape, jnp.nan, dtype).block_until_ready()
  del poison  # the kernel's output reuses the freed block: unwritten elements stay NaN
  out = jax.jit(lambda p: nf.dequantize_blocks(p, dtype, backend="cuda"))(p)
  assert_bitwise(out, expected(w, dtype))


@pytest.mark.gpu
def test_kernel_tiny_scales_fp16(rng):
  w = random_weight(rng, (48, 1600), tiny=True)
  out = jax.jit(lambda p: nf.dequantize_blocks(p, jnp.float16, backend="cuda"))(nf.prepare(w))
  assert_bitwise(out, expected(w, jnp.float16))


@pytest.mark.gpu
def test_prefill_path_runs_the_kernel(rng):
  w = nf.prepare(random_weight(rng, (256, 512)))
  x = jnp.ones((dense.KERNEL_MAX_M + 1, 512), jnp.bfloat16)
  hlo = jax.jit(nf.nvfp4_matmul).lower(x, w).compile().as_text()
  assert "jax_nvfp4_dequantize_cuda" in hlo and "jax_nvfp4_gemm_cuda" not in hlo

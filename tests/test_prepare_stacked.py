"""prepare()/unprepare() of stacked (expert) weights: each slice equals the 2-D prepare."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_nvfp4 as nf


def _weight(rng, lead, n, k):
  packed = rng.integers(0, 256, size=(*lead, n, k // 2), dtype=np.uint8)
  scales = rng.uniform(2.0**-9, 448, size=(*lead, n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  gs = rng.uniform(0.01, 2, size=lead).astype(np.float32)
  return nf.NVFP4Weight(jnp.asarray(packed), jnp.asarray(scales), jnp.asarray(gs))


@pytest.mark.parametrize("lead, n, k", [((3,), 40, 80), ((2, 2), 16, 64), ((1,), 100, 1664)])
def test_stacked_prepare_equals_per_slice(rng, lead, n, k):
  w = _weight(rng, lead, n, k)
  p = jax.jit(nf.prepare)(w)
  n16, k64 = -(-n // 16), -(-k // 64)
  assert p.qweight.shape == (*lead, n16, k64, 32, 4) and p.qweight.dtype == jnp.uint32
  assert p.qscales.shape == (*lead, n16, k64, 64) and p.global_scale.shape == lead
  assert (p.n, p.k) == (n, k) and p.shape == (*lead, n, k)
  for idx in np.ndindex(*lead):
    one = nf.prepare(jax.tree.map(lambda a: a[idx], w))   # the 2-D path
    assert one.shape == (n, k)
    np.testing.assert_array_equal(np.asarray(p.qweight[idx]), np.asarray(one.qweight))
    np.testing.assert_array_equal(np.asarray(p.qscales[idx]), np.asarray(one.qscales))
    assert float(p.global_scale[idx]) == float(one.global_scale)
  back = jax.jit(nf.unprepare)(p)
  assert back.shape == (*lead, n, k)
  np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(w.packed))
  np.testing.assert_array_equal(np.asarray(back.scales).view(np.uint8),
                                np.asarray(w.scales).view(np.uint8))
  np.testing.assert_array_equal(np.asarray(back.global_scale), np.asarray(w.global_scale))


def test_two_d_prepare_unchanged_and_stacked_rejected_by_dense_matmul(rng):
  w = _weight(rng, (2,), 32, 64)
  p = nf.prepare(w)
  x = jnp.ones((1, 64), jnp.bfloat16)
  with pytest.raises(ValueError):
    nf.nvfp4_matmul(x, p)  # a stack of experts is not a dense [N, K] weight
  with pytest.raises(TypeError, match="NVFP4Weight"):
    nf.prepare(jnp.ones((2, 16, 32)))

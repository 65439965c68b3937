"""Runs the dequantize kernel on awkward shapes (odd N, K, stacked); for compute-sanitizer."""
import jax, jax.numpy as jnp, numpy as np, ml_dtypes
import jax_nvfp4 as nf
rng = np.random.default_rng(0)
for shape in [(40, 80), (33, 1664), (3, 17, 48), (4000, 1664)]:
  *lead, n, k = shape
  w = nf.NVFP4Weight(jnp.asarray(rng.integers(0, 256, (*lead, n, k // 2), dtype=np.uint8)),
                     jnp.asarray(rng.uniform(2**-6, 8, (*lead, n, k // 16)).astype(ml_dtypes.float8_e4m3fn)),
                     jnp.ones(tuple(lead), jnp.float32))
  p = nf.prepare(w)
  for dt in (jnp.bfloat16, jnp.float16):
    out = jax.jit(lambda p: nf.dequantize_blocks(p, dt, backend="cuda"))(p)
    want = nf.dequantize(w, jnp.float32).astype(dt)
    assert np.array_equal(np.asarray(out).view(np.uint16), np.asarray(want).view(np.uint16)), shape
print("dequant sanitize script ok")

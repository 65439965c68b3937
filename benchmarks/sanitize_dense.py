"""Runs the dense kernel on a few awkward shapes; meant to be run under compute-sanitizer."""
import jax
import jax.numpy as jnp
import numpy as np

import jax_nvfp4 as nf

rng = np.random.default_rng(0)
for m, n, k in [(1, 100, 1664), (7, 33, 48), (17, 2368, 1664), (255, 832, 1408), (3, 512, 8192),
                (64, 4000, 256)]:
  for dtype in (jnp.bfloat16, jnp.float16):
    w = nf.quantize(jnp.asarray(rng.standard_normal((n, k)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    out = jax.jit(nf.nvfp4_matmul)(x, nf.prepare(w), b)
    ref = nf.reference_matmul(x, w, b)
    err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) /
                jnp.linalg.norm(ref.astype(jnp.float32)))
    print(m, n, k, dtype.__name__, f"rel {err:.2e}")
    assert err < 1e-2
print("sanitize run done")

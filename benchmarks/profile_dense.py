"""One dense call per shape, for ncu / compute-sanitizer: python benchmarks/profile_dense.py M K N."""
import sys

import jax
import jax.numpy as jnp

import jax_nvfp4 as nf

m, k, n = (int(v) for v in sys.argv[1:4])
kp, ks, kx = jax.random.split(jax.random.key(0), 3)
packed = jax.random.randint(kp, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
scales = jax.random.uniform(ks, (n, k // 16), jnp.float32, 0.05, 8.0).astype(jnp.float8_e4m3fn)
p = nf.prepare(nf.NVFP4Weight(packed, scales, jnp.float32(0.01)))
x = jax.random.normal(kx, (m, k), jnp.bfloat16)
f = jax.jit(nf.nvfp4_matmul)
for _ in range(3):
  f(x, p).block_until_ready()

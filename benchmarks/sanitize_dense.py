"""Runs the dense kernel on a few awkward shapes; meant to be run under compute-sanitizer.

  python benchmarks/sanitize_dense.py [--decode-only]

``--decode-only`` runs only the k-sliced decode shapes (M <= 16)."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_nvfp4 as nf

rng = np.random.default_rng(0)
K_SLICED = {(1, 4000, 4160), (1, 9000, 2048), (2, 4000, 4160), (3, 9000, 2048),
            (16, 2200, 4160), (12, 4200, 1088)}
# (1, 12000, 1024) and (5, 9000, 2048) split K in two and three: a cluster reduction on sm_90.
# (1, 4000, 4160), (1, 9000, 2048): the k-sliced decode launch (8 warps split K in the block;
# the second one with 3 N tiles per block, the last block short) on the 1-row x tile;
# (2, 4000, 4160) and (3, 9000, 2048) on the 2- and 4-row tiles; (16, 2200, 4160) and
# (12, 4200, 1088): the same at m_tile 2.
for m, n, k in [(1, 100, 1664), (7, 33, 48), (17, 2368, 1664), (255, 832, 1408), (3, 512, 8192),
                (64, 4000, 256), (1, 12000, 1024), (5, 9000, 2048), (1, 4000, 4160),
                (8, 2200, 1088), (1, 9000, 2048), (2, 4000, 4160), (3, 9000, 2048),
                (16, 2200, 4160), (12, 4200, 1088)]:
  if "--decode-only" in sys.argv[1:] and (m, n, k) not in K_SLICED:
    continue
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
# The cluster reduction at 16 splits (largest cluster), forced, where the GPU has clusters.
from jax_nvfp4.ops import dense  # noqa: E402
if dense.use_cluster(2, 1) and dense._cluster_limit(1) >= 16:
  w = nf.prepare(nf.quantize(jnp.asarray(rng.standard_normal((1000, 4160)), jnp.float32)))
  x = jnp.asarray(rng.standard_normal((3, 4160)), jnp.bfloat16)
  out = jax.jit(lambda x: dense.nvfp4_gemm_p.bind(
      x, w.qweight, w.qscales, w.global_scale, jnp.zeros((1,), jnp.float32), n=1000, k=4160,
      has_bias=False, splits=16, m_tile=1, cluster=True)[0])(x)
  ref = nf.nvfp4_matmul(x, w)
  print("forced 16-block cluster, max |diff| vs default launch:",
        float(jnp.max(jnp.abs((out - ref).astype(jnp.float32)))))
print("sanitize run done")

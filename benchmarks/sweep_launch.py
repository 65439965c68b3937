"""Times the dense kernel over forced (m_tile, splits) launch choices (not a test).

Used to check ``jax_nvfp4.ops.dense.choose_launch`` against measurement: for each weight shape
and M it times every candidate and prints the one the heuristic picks beside the fastest.
Method as ``bench_dense.py`` (8 weight copies to defeat L2, many calls per jitted program).

  python benchmarks/sweep_launch.py [--shapes 4096x14336,...] [--ms 64,256] [--out F.json]
"""
import argparse
import json

import jax
import jax.numpy as jnp

from jax_nvfp4 import prepare
from jax_nvfp4.bench.common import many, parse_ints, parse_shapes, time_per_call
from jax_nvfp4.format import NVFP4Weight
from jax_nvfp4.ops import dense as dense_ops

COPIES = 8


def weights(k, n, key):
  out = []
  for kk in jax.random.split(key, COPIES):
    kp, ks = jax.random.split(kk)
    packed = jax.random.randint(kp, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = jax.random.uniform(ks, (n, k // 16), jnp.float32, 0.05, 8.0)
    out.append(prepare(NVFP4Weight(packed, scales.astype(jnp.float8_e4m3fn), jnp.float32(0.01))))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="4096x14336,14336x4096,8192x28672,4096x4096")
  ap.add_argument("--ms", default="16,64,256,1024,4096")
  ap.add_argument("--tiles", default="2,4,8")
  ap.add_argument("--splits", default="1,2,3,4,6,8,16")
  ap.add_argument("--out")
  a = ap.parse_args()
  heuristic = dense_ops.choose_launch
  dense_ops.KERNEL_MAX_M = 1 << 40  # the kernel at every M (no prefill dispatch)
  print("blocks/SM by m_tile:", {mt: dense_ops._blocks_per_sm(mt) for mt in (1, 2, 4, 8)},
        "SMs:", dense_ops._sm_count())
  rows = []
  for k, n in parse_shapes(a.shapes, 2, "KxN"):
    ws = weights(k, n, jax.random.key(0))
    k64 = -(-k // 64)
    for m in parse_ints(a.ms, "M"):
      x = [jax.random.normal(kx, (m, k), jnp.bfloat16) for kx in jax.random.split(
          jax.random.key(1), COPIES)]
      picked = heuristic(m, n, k)
      results = {}
      for mt in parse_ints(a.tiles, "m_tile"):
        for s in parse_ints(a.splits, "splits"):
          units = -(-k64 // dense_ops.unsliced_unit_chunks(mt))
          if s > units or s * m * n * 4 > (1 << 28) or (mt, s) in results:
            continue
          dense_ops.choose_launch = lambda m_, n_, k_, s=s, mt=mt: (s, mt)
          try:
            results[(mt, s)] = time_per_call(many(dense_ops.nvfp4_matmul), x, ws, runs=5,
                                             trials=3) * 1e6
          finally:
            dense_ops.choose_launch = heuristic
      if not results:
        continue
      best = min(results, key=results.get)
      print(f"{k:6d}x{n:<6d} M={m:<5d} best mt={best[0]} splits={best[1]:2d} "
            f"{results[best]:8.1f} us | heuristic mt={picked[1]} splits={picked[0]:2d} "
            f"{results.get((picked[1], picked[0]), float('nan')):8.1f} us | " +
            " ".join(f"{mt}:{s}={t:.0f}" for (mt, s), t in sorted(results.items())), flush=True)
      rows.append(dict(k=k, n=n, m=m, picked=list(picked), best=list(best),
                       times={f"{mt}:{s}": t for (mt, s), t in results.items()}))
  if a.out:
    with open(a.out, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

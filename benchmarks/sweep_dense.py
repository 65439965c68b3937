"""Kernel-only sweep of the dense launch heuristic (not a test): python benchmarks/sweep_dense.py

Times nvfp4_matmul (method of bench_dense.py: COPIES distinct weights, back-to-back dispatch) for
each ops.dense.WAVES value on the decode shapes, so the default can be chosen from one run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jax_nvfp4 as nf
from jax_nvfp4.ops import dense

import bench_dense as bd

SHAPES = [(4096, 14336), (14336, 4096), (8192, 28672), (4096, 4096)]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--waves", default="1,2,3")
  ap.add_argument("--ms", default="1,16")
  args = ap.parse_args()
  waves = [float(w) for w in args.waves.split(",")]
  ms = [int(m) for m in args.ms.split(",")]
  bw = bd.copy_bandwidth()
  print(f"{jax.devices()[0].device_kind}: copy bandwidth {bw / 1e9:.0f} GB/s")
  key = jax.random.key(0)
  for k, n in SHAPES:
    keys = jax.random.split(key, bd.COPIES + 1)
    prepared = []
    for i in range(bd.COPIES):
      kp, ks = jax.random.split(keys[i])
      packed = jax.random.randint(kp, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
      scales = jax.random.uniform(ks, (n, k // 16), jnp.float32, 0.05, 8.0)
      prepared.append(nf.prepare(nf.NVFP4Weight(packed, scales.astype(jnp.float8_e4m3fn),
                                                jnp.float32(0.01))))
    for m in ms:
      x = [jax.random.normal(kx, (m, k), jnp.bfloat16) for kx in jax.random.split(keys[-1], bd.COPIES)]
      roof = (n * k // 2 + n * k // 16 + m * k * 2 + m * n * 2) / bw * 1e6
      cells = []
      for w in waves:
        dense.WAVES = w
        splits, mt = dense.choose_launch(m, n, k)
        t = bd._time_program(bd._many(nf.nvfp4_matmul), x, prepared) * 1e6
        cells.append(f"waves {w:g} (splits {splits:2d}) {t:6.1f} us {100 * roof / t:4.0f} %")
      print(f"{k:>6}x{n:<6} M={m:<3} roof {roof:5.1f} | " + " | ".join(cells), flush=True)
    del prepared


if __name__ == "__main__":
  main()

"""Dense NVFP4 GEMM benchmark (not a test). Run on a GPU:  python benchmarks/bench_dense.py

A command-line wrapper of ``jax_nvfp4.bench.dense`` (the measuring code; its ``METHOD`` is the
method, recorded in the JSON): kernel vs XLA bf16 dot, cuBLAS (torch, when importable) and the
pure-JAX dequant+dot, with the HBM roofline from a copy measured in the same run. The same
measurements, with the MoE benchmark, tables and a plot: ``python -m jax_nvfp4 bench``.
"""

from __future__ import annotations

import argparse
import json

from jax_nvfp4.bench import dense


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="4096x14336,14336x4096,8192x28672,4096x4096",
                  help="comma-separated KxN")
  ap.add_argument("--ms", default="1,16,64,256,1024,4096")
  ap.add_argument("--out", default=None, help="write JSON results here")
  ap.add_argument("--no-torch", action="store_true")
  args = ap.parse_args(argv)
  ms = [int(v) for v in args.ms.split(",")]
  shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
  result = dense.run(shapes, ms, with_torch=not args.no_torch)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()

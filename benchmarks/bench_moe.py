"""Whole-layer NVFP4 MoE benchmark (not a test). Run on a GPU:  python benchmarks/bench_moe.py

A command-line wrapper of ``jax_nvfp4.bench.moe`` (the measuring code; its ``METHOD`` is the
method, recorded in the JSON): ``fused_moe`` from router logits to the combined output vs the
same layer in bf16 with ``jax.lax.ragged_dot``, against the roofline of the experts actually
hit. The same measurements, with the dense benchmark, tables and a plot:
``python -m jax_nvfp4 bench``.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from jax_nvfp4.bench import moe
from jax_nvfp4.bench.moe import SHAPES, TOKENS


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                  help="comma-separated ExHxIxTOPK (default: %(default)s)")
  ap.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                  help="comma-separated token counts T (default: %(default)s)")
  ap.add_argument("--quick", action="store_true",
                  help="fewer runs/trials and T in {1, 64, 1024}")
  ap.add_argument("--no-ragged", action="store_true", help="skip the bf16 ragged_dot baseline")
  ap.add_argument("--out", default=None, help="write JSON results here")
  ap.add_argument("--allow-cpu", action="store_true",
                  help="run without a GPU (reference path; only to smoke-test this script)")
  args = ap.parse_args(argv)
  if jax.default_backend() != "gpu" and not args.allow_cpu:
    sys.exit("bench_moe.py needs a GPU (pass --allow-cpu to smoke-test the script on CPU)")
  tokens = [int(v) for v in args.tokens.split(",")]
  runs, trials = moe.RUNS, moe.TRIALS
  if args.quick:
    runs, trials = moe.QUICK_RUNS, moe.QUICK_TRIALS
    if args.tokens == ",".join(map(str, TOKENS)):
      tokens = list(moe.QUICK_TOKENS)
  shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
  result = moe.run(shapes, tokens, ragged=not args.no_ragged, runs=runs, trials=trials)
  print("\n" + moe.format_table(result["rows"]))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()

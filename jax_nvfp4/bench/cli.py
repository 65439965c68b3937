"""``python -m jax_nvfp4 bench``: the dense and MoE benchmarks, their roofline tables, and a PNG
plot of time per call vs tokens against the bf16 baselines and the HBM roofline.

It measures the CUDA kernels, so it needs an NVIDIA GPU with jax_nvfp4's kernels built; elsewhere
it exits with code 1 and one ``error:`` line (``--allow-cpu`` runs it anyway on the pure-JAX
reference path, to smoke-test the method: at the small ``CPU_*`` sizes unless shapes, M or T are
given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jax_nvfp4.bench import common, dense, moe

#: ``--quick``: two dense shapes (all M) and the two smaller MoE shapes at T in {1, 64, 1024}
#: with the MoE benchmark's quick runs/trials. A few minutes on an H100.
QUICK_DENSE_SHAPES = ((4096, 14336), (4096, 4096))
QUICK_MOE_SHAPES = ((128, 2048, 768, 8), (8, 4096, 14336, 2))
DEFAULT_PLOT = "jax_nvfp4_bench.png"
#: ``--allow-cpu`` without a GPU: the defaults shrink to these (options given explicitly win), so
#: that the smoke test of the method takes seconds on the reference path, not hours.
CPU_DENSE_SHAPES = ((512, 256), (256, 512))
CPU_MS = (1, 16, 64)
CPU_MOE_SHAPES = ((8, 256, 128, 2),)
CPU_TOKENS = (1, 16)


def _fmt_shapes(shapes) -> str:
  return ",".join("x".join(map(str, s)) for s in shapes)


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--quick", action="store_true",
                 help=f"smaller sizes: dense {_fmt_shapes(QUICK_DENSE_SHAPES)} (all M), MoE "
                 f"{_fmt_shapes(QUICK_MOE_SHAPES)} at T in "
                 f"{{{','.join(map(str, moe.QUICK_TOKENS))}}} with fewer MoE runs/trials")
  p.add_argument("--only", choices=("dense", "moe"), default=None,
                 help="run one of the two benchmarks")
  p.add_argument("--dense-shapes", metavar="KxN,...", default=None,
                 help=f"dense weight shapes (default {_fmt_shapes(dense.SHAPES)})")
  p.add_argument("--ms", metavar="M,...", default=None,
                 help=f"dense token counts M (default {','.join(map(str, dense.MS))})")
  p.add_argument("--moe-shapes", metavar="ExHxIxTOPK,...", default=None,
                 help=f"MoE layer shapes (default {_fmt_shapes(moe.SHAPES)})")
  p.add_argument("--tokens", metavar="T,...", default=None,
                 help=f"MoE token counts T (default {','.join(map(str, moe.TOKENS))})")
  p.add_argument("--no-torch", action="store_true", help="skip the cuBLAS (torch) column")
  p.add_argument("--no-ragged", action="store_true",
                 help="skip the bf16 jax.lax.ragged_dot MoE baseline")
  p.add_argument("--json", metavar="PATH", default=None,
                 help='write {"dense": result, "moe": result} here (the formats of '
                 "benchmarks/bench_dense.py and bench_moe.py --out)")
  p.add_argument("--plot", metavar="PATH", default=DEFAULT_PLOT,
                 help="write the PNG plot here (default %(default)s)")
  p.add_argument("--no-plot", action="store_true", help="write no plot (no matplotlib needed)")
  p.add_argument("--allow-cpu", action="store_true",
                 help="run without a GPU on the pure-JAX reference path (only to smoke-test the "
                 "benchmark at small sizes; the numbers mean nothing for the kernels)")


def why_not_gpu() -> str | None:
  """None when the CUDA kernels would run the dense and MoE ops here, else why not."""
  import jax
  try:
    jax.devices()
  except RuntimeError as e:
    return f"JAX found no device ({str(e).splitlines()[0]})"
  from jax_nvfp4.backend import select_backend
  choice = select_backend(weight_format="nvfp4", moe_activation="swiglu")
  if choice.name == "cuda":
    return None
  reason = choice.reason
  if "cuda unavailable: " in reason:
    reason = reason.split("cuda unavailable: ", 1)[1].rsplit(");", 1)[0]
  return reason


def _config(parser, args, small: bool = False):
  """(dense shapes, ms, moe shapes, tokens, moe runs, moe trials) from the options; ``small``:
  the CPU smoke test's defaults."""
  try:
    dshapes = (common.parse_shapes(args.dense_shapes, 2, "--dense-shapes") if args.dense_shapes
               else list(CPU_DENSE_SHAPES if small else
                         QUICK_DENSE_SHAPES if args.quick else dense.SHAPES))
    ms = (common.parse_ints(args.ms, "--ms") if args.ms
          else list(CPU_MS if small else dense.MS))
    mshapes = (common.parse_shapes(args.moe_shapes, 4, "--moe-shapes") if args.moe_shapes
               else list(CPU_MOE_SHAPES if small else
                         QUICK_MOE_SHAPES if args.quick else moe.SHAPES))
    tokens = (common.parse_ints(args.tokens, "--tokens") if args.tokens
              else list(CPU_TOKENS if small else
                        moe.QUICK_TOKENS if args.quick else moe.TOKENS))
  except ValueError as e:
    parser.error(str(e))
  for k, _ in dshapes:
    if k % 16:
      parser.error(f"--dense-shapes: K = {k} must be a multiple of 16")
  for e, h, i, k in mshapes:
    if h % 16 or i % 16:
      parser.error(f"--moe-shapes: H = {h} and I = {i} must be multiples of 16")
    if k > e:
      parser.error(f"--moe-shapes: top-k {k} exceeds E = {e}")
  quick = args.quick or small
  runs, trials = (moe.QUICK_RUNS, moe.QUICK_TRIALS) if quick else (moe.RUNS, moe.TRIALS)
  return dshapes, ms, mshapes, tokens, runs, trials


def _print(line: str) -> None:
  print(line, flush=True)


def main(parser: argparse.ArgumentParser, args) -> int:
  """Runs the subcommand; returns the exit code (1 with an ``error:`` line when it cannot)."""
  dshapes, ms, mshapes, tokens, runs, trials = _config(parser, args)  # option errors first
  why = why_not_gpu()
  if why is not None and args.allow_cpu:
    dshapes, ms, mshapes, tokens, runs, trials = _config(parser, args, small=True)
  if why is not None and not args.allow_cpu:
    print(f"error: python -m jax_nvfp4 bench measures jax_nvfp4's CUDA kernels, which cannot run "
          f"here: {why}. It needs an NVIDIA GPU (compute capability >= 8.0) and jax_nvfp4 built "
          "with its kernels. Measured H100 results are in benchmarks/results/; --allow-cpu "
          "smoke-tests the benchmark on the reference path.", file=sys.stderr)
    return 1
  if args.json:  # before minutes of measuring, not after
    try:
      os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    except OSError as e:
      print(f"error: --json {args.json}: cannot create its directory ({e})", file=sys.stderr)
      return 1
  plot = None if args.no_plot or not args.plot else args.plot
  if plot is not None:
    try:
      import matplotlib  # noqa: F401  (checked before minutes of measuring)
    except ImportError:
      print("error: the plot needs matplotlib (pip install matplotlib), or pass --no-plot",
            file=sys.stderr)
      return 1

  import jax
  bw = common.copy_bandwidth()
  kernel = moe.kernel_used()
  _print(moe.header_line(bw, kernel))
  if why is not None:
    _print(f"NOT the CUDA kernels ({why}): these are {jax.devices()[0].platform} numbers of the "
           "pure-JAX reference path")
  results = {}
  if args.only in (None, "dense"):
    _print("\n== dense: nvfp4_matmul vs bf16 (XLA dot, cuBLAS), pure-JAX dequant+dot, roofline")
    results["dense"] = dense.run(dshapes, ms, with_torch=not args.no_torch, bw=bw)
  if args.only in (None, "moe"):
    _print("\n== MoE: fused_moe vs the bf16 layer with jax.lax.ragged_dot, roofline of the "
           "experts hit")
    results["moe"] = moe.run(mshapes, tokens, ragged=not args.no_ragged, bw=bw, runs=runs,
                             trials=trials)
  if "dense" in results:
    _print("\ndense roofline table (us per call; x bf16 = XLA bf16 dot time / NVFP4 time)")
    _print(dense.format_table(results["dense"]["rows"]))
  if "moe" in results:
    _print("\nMoE roofline table (us per layer)")
    _print(moe.format_table(results["moe"]["rows"]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
    _print(f"\nresults: {os.path.abspath(args.json)}")
  if plot is not None:
    from jax_nvfp4.bench.plot import plot_results
    plot_results(plot, results.get("dense"), results.get("moe"))
    _print(f"plot: {os.path.abspath(plot)}")
  return 0

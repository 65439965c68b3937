"""Where a grouped GEMM's time goes, block by block, inside the real MoE layer (not a test; run on
a GPU with the extension built with the lab timeline, from benchmarks/):

  bash benchmarks/moe_timeline.sh        (builds it, runs this, rebuilds the plain extension)
  python moe_timeline.py [--tokens 1,16]

The extension built with -DJAX_NVFP4_LAB_TIMELINE=1 has thread 0 of every GEMM block record
%globaltimer and %clock64 at its start, when its first pipeline unit has landed, when its last
unit's hand-off and epilogue begin, and at its end (csrc/nvfp4_tile.cuh lab_mark), only for the
weight with the chosen number of N tiles, so each of a layer's two GEMMs is read on its own
from one call of the whole layer (routing -> GEMM 1 -> GEMM 2 -> combine), with a weight copy
the previous call did not touch. Prints, per GEMM, percentiles over its blocks: when they start
after the first one, the time to their first landed unit, their steady loop, their last
hand-off and epilogue, and when they end (us; phases from %clock64 at the device's clock rate,
starts and ends from %globaltimer), and how the blocks spread over the SMs (NOTES_moe.md v25).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import ab_moe_overhead
from jax_nvfp4 import _ffi
from jax_nvfp4.bench import moe as bench_moe

RECORDS = 16384   # csrc/nvfp4_tile.cuh kLabTimelineBlocks


def percentiles(v) -> str:
  if len(v) == 0:
    return "-"
  return " / ".join(f"{np.percentile(v, q):6.2f}" for q in (0, 50, 90, 100))


def report(name: str, records: np.ndarray, clock_khz: float) -> None:
  """``records``: int64 [blocks, 9]; differences are taken in integers (a %globaltimer value,
  ~1.7e18 ns, keeps only 256 ns in a float64)."""
  done = records[records[:, 3] != 0]
  if len(done) == 0:
    print(f"  {name}: no blocks recorded")
    return
  first = done[:, 0].min()
  us_per_clock = 1e3 / clock_khz
  phases = {
      "start": (done[:, 0] - first) * 1e-3,   # integer differences, then floats
      "first unit landed after": (done[:, 5] - done[:, 4]) * us_per_clock,
      "steady loop": (done[:, 6] - done[:, 5]) * us_per_clock,
      "last hand-off, epilogue": (done[:, 7] - done[:, 6]) * us_per_clock,
      "end": (done[:, 3] - first) * 1e-3,
  }
  per_sm = np.bincount(done[:, 8].astype(np.int64))
  print(f"  {name}: {len(done)} blocks on {np.count_nonzero(per_sm)} SMs (at most "
        f"{per_sm.max()} per SM), us as p0 / p50 / p90 / p100:")
  for phase, v in phases.items():
    print(f"    {phase:<24} {percentiles(v)}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", default="1,16")
  ap.add_argument("--clock-mhz", type=float, default=1980.0,
                  help="SM clock that converts %%clock64 phases to us (default: the H200's "
                       "boost clock; moe_timeline.sh passes nvidia-smi's clocks.max.sm)")
  args = ap.parse_args()
  module = _ffi._C
  reset = getattr(module, "moe_lab_timeline_reset", None)
  if not _ffi.cuda_kernels_built() or reset is None or not reset(0):
    raise SystemExit("the extension was not built with -DJAX_NVFP4_LAB_TIMELINE=1 "
                     "(bash benchmarks/moe_timeline.sh builds it)")
  clock_khz = args.clock_mhz * 1e3
  print(f"{jax.devices()[0].device_kind}, SM clock taken as {args.clock_mhz:.0f} MHz")
  key = jax.random.key(1)
  for e, h, inter, k in bench_moe.SHAPES:
    routing = bench_moe.routing_for(e, k)
    w13s, w2s, key = ab_moe_overhead.weight_copies(key, e, h, inter)
    layer = jax.jit(bench_moe.nvfp4_layer(routing))
    for t in (int(v) for v in args.tokens.split(",")):
      kx, kl = jax.random.split(jax.random.fold_in(key, t))
      x = jax.random.normal(kx, (t, h), jnp.bfloat16)
      logits = jax.random.normal(kl, (t, e), jnp.float32)
      print(f"E={e} H={h} I={inter} top_k={k} T={t}:")
      for c, (gemm, n) in enumerate((("GEMM 1", 2 * inter), ("GEMM 2", h))):
        copy = c % len(w13s)
        jax.block_until_ready(layer(x, logits, w13s[copy], w2s[copy]))   # compiled, warm
        other = (copy + 1) % len(w13s)
        module.moe_lab_timeline_reset(-(-n // 16))
        jax.block_until_ready(layer(x, logits, w13s[other], w2s[other]))
        raw = np.frombuffer(module.moe_lab_timeline(RECORDS), np.uint64).reshape(-1, 9)
        report(f"{gemm} (N = {n}, K = {h if c == 0 else inter})", raw.astype(np.int64),
               clock_khz)
    del w13s, w2s


if __name__ == "__main__":
  main()

"""Device-side time of the MoE layer (small T above all), from the profiler (not a test; run on a GPU):

  python benchmarks/profile_moe.py [--tokens 1,16] [--out FILE.json]

Why: wall-clock timing of a short program is bounded by host dispatch (a program of C layers
is dispatched in tens of microseconds whatever the GPU does), so small-T layer times from
bench_moe.py mix host and device. Here one ``many`` program (C layers, distinct weight copies,
as bench_moe.py) runs under ``jax.profiler.trace`` and the GPU activity of that one execution is
read from the Perfetto trace: ``span`` = last kernel end - first kernel start, divided by C
(what a layer costs inside a longer program, launch gaps included), ``busy`` = the summed kernel
durations per layer by kind (our GEMMs, our alignment or routing + alignment kernel, memsets,
XLA's kernels), ``kernels`` =
launches per layer, ``by_name_us`` = the same per kernel (XLA's per-copy numbering removed).
Median of three executions. Variants (``--variants``): ``fused_moe`` (the library's layer),
``unsliced`` (the same layer compiled with the grouped GEMM's k-slices off: the v6 launch, K split
across blocks only; the A/B of NOTES_moe.md v7), ``one_tile`` (one N block per block at prefill:
the A/B of NOTES_moe.md v8), ``eight_rows`` (no ``expert_rows`` hint: the k-sliced decode block
holds 8 x rows, not 1-4; NOTES_moe.md v11), ``ksliced`` (k-slices at every block_m-8 GEMM, whatever
the rule says), ``ksliced_eight_rows`` (both), ``ksliced4`` / ``ksliced4_units`` (4 k-slices at
every block_m-8 GEMM / where K is a multiple of 1024; NOTES_moe.md v20), ``xla_routing`` (routing
by XLA's kernels and the separate alignment kernel, as before the routing kernel: NOTES_moe.md v12)
and ``tiles2`` / ``tiles4`` (2 / 4 N blocks per block in every unsliced, unsplit GEMM, decode
included: NOTES_moe.md v16), ``ks_tiles8`` / ``ks_tiles16`` (the k-sliced rule's
``MOE_K_SLICES_MAX_TOKEN_TILES`` at 8 / 16, not 4) and ``split6`` (``MIN_CHUNKS_PER_SPLIT`` 6, not
48: the short-K decode GEMMs split K; NOTES_moe.md v17) and ``unfused`` (w13 in plain ``[gate;
up]`` order: GEMM1 writes both halves and XLA applies the activation, the layer before v17) and
``route_general`` (``JAX_NVFP4_ROUTE_SMALL=0``: decode batches in the general routing kernel, not
the decode one; NOTES_moe.md v18) and ``decode_tiles1`` (one N block per block at block_m 8: the
rule before v18's decode tiles) and ``short_units`` (``JAX_NVFP4_MOE_LONG_UNITS=0``: 4-chunk units
in the unsliced block_m-8 GEMMs with K >= 2048 too, the rule before v23) and ``route_wide``
(``JAX_NVFP4_ROUTE_WIDE=1``: the wide decode routing kernel, a warp per 32 experts, wherever it
fits; NOTES_moe.md v24) and ``route_decode`` (``JAX_NVFP4_ROUTE_WIDE=0``: never; the layer
without v26's default) and ``pair`` (``JAX_NVFP4_MOE_PAIR=1``: both grouped GEMMs in one custom
call, ``ops/moe_pair.py``; NOTES_moe.md v29). Large T works too
(``--tokens 1024,4096``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import statistics
import tempfile

import jax
import jax.numpy as jnp
from jax_nvfp4.bench import moe as bench_moe
from jax_nvfp4.bench.common import copy_bandwidth, gpu_events, many
from jax_nvfp4.ops import dense as dense_ops
from jax_nvfp4.ops import moe as moe_ops
from jax_nvfp4.ops import moe_route

import ab_moe_overhead  # benchmarks/, next to this file


def kind_of(name: str) -> str:
  low = name.lower()
  if "moe_align" in low or "moe_route" in low:   # the alignment, or routing + alignment
    return "align"
  if "nvfp4" in low:
    return "gemm"
  if "memset" in low:
    return "memset"
  return "xla"


def profile_once(fn, lists, copies: int) -> dict:
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      jax.block_until_ready(fn(*lists))
    events = gpu_events(d)
  start = min(e["ts"] for e in events)
  end = max(e["ts"] + e["dur"] for e in events)
  busy = collections.Counter()
  for e in events:
    busy[kind_of(e["name"])] += e["dur"]
  # Each layer runs GEMM 1 then GEMM 2: alternate in time order.
  gemms = sorted((e for e in events if kind_of(e["name"]) == "gemm"), key=lambda e: e["ts"])
  for i, e in enumerate(gemms):
    busy[f"gemm{1 + i % 2}"] += e["dur"]
  by_name = collections.Counter()
  for e in events:
    by_name[kernel_family(e["name"])] += e["dur"] / copies
  return dict(span_us=(end - start) / copies, kernels=len(events) / copies,
              **{f"{k}_us": v / copies for k, v in busy.items()},
              names=sorted({e["name"][:60] for e in events}), by_name=dict(by_name))


def kernel_family(name: str) -> str:
  """A kernel's name without the per-copy numbering XLA gives fusions (``sort_10_1`` ->
  ``sort``), so the C copies of one op add up."""
  name = name[:60]
  if name.startswith(("void ", "jax_nvfp4")):
    return name
  return re.sub(r"(_\d+)+$", "", name)


@contextlib.contextmanager
def patched(name: str, value, module=moe_ops):
  """Lowerings inside see ``module.<name>`` replaced by ``value`` (a rule function or a
  threshold constant; a variant is compiled at its first call, so the patch is read then)."""
  saved = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, saved)


@contextlib.contextmanager
def environment(name: str, value: str):
  """The handlers read ``os.environ[name]`` as ``value`` (they read it at each call)."""
  saved = os.environ.get(name)
  os.environ[name] = value
  try:
    yield
  finally:
    if saved is None:
      del os.environ[name]
    else:
      os.environ[name] = saved


def rule_returning(name: str, value, module=moe_ops):
  """``module.<name>`` returns ``value``: ``unsliced`` sets ``ops.moe.choose_moe_k_slices`` to
  1, ``one_tile`` ``ops.moe.choose_moe_prefill_tiles`` to 1, ``xla_routing``
  ``ops.moe_route.fits_one_block`` to False (XLA routing and the alignment kernel at every T)."""
  return patched(name, lambda *args, **kw: value, module)


def unsplit_tiles_per_block(tiles: int):
  """Every unsliced, unsplit grouped GEMM (block_m 8 at decode too, not only 64) runs ``tiles``
  N blocks per block: the A/B of NOTES_moe.md v16."""
  return patched("choose_moe_prefill_tiles",
                 lambda num_slots, n, k, block_m, splits, bf16=True: tiles if splits == 1 else 1)


def decode_one_tile():
  """One N block per block at block_m 8 (the rule before NOTES_moe.md v18's decode tiles)."""
  saved = moe_ops.choose_moe_prefill_tiles
  return patched("choose_moe_prefill_tiles",
                 lambda num_slots, n, k, block_m, splits, bf16=True:
                 1 if block_m == 8 else saved(num_slots, n, k, block_m, splits, bf16))


def gemms_without_row_hint():
  """fused_moe's grouped GEMMs get ``expert_rows=0``: the 8-row decode block."""
  saved = moe_ops.nvfp4_moe_gemm
  return patched("nvfp4_moe_gemm", lambda *a, **kw: saved(*a, **{**kw, "expert_rows": 0}))


@contextlib.contextmanager
def all_ksliced(eight_rows: bool = False):
  with rule_returning("choose_moe_k_slices", moe_ops.MOE_K_SLICES):
    with (gemms_without_row_hint() if eight_rows else contextlib.nullcontext()):
      yield


def four_slices(whole_units: bool):
  """4 k-slices (pairs of N tiles) at every block_m-8 GEMM, whatever the token-tile count:
  ``ksliced4``; ``ksliced4_units`` only where K is a whole number of 4-slice units (1024), the
  rule elsewhere. The question of NOTES_moe.md v20's Next: the 8-slice unit (2048) left K = 7168
  3.5 units, which the 4-slice unit divides."""
  saved = moe_ops.choose_moe_k_slices
  unit = dense_ops.k_sliced_unit_k(1, moe_ops.PAIR_K_SLICES)

  def rule(num_slots, n, k, block_m, expert_rows=0):
    if block_m == 8 and (not whole_units or k % unit == 0):
      return moe_ops.PAIR_K_SLICES
    return saved(num_slots, n, k, block_m, expert_rows)
  return patched("choose_moe_k_slices", rule)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", default="1,16")
  ap.add_argument("--out", default=None)
  ap.add_argument("--ref-gbs", type=float, default=4543.0,
                  help="a fixed copy bandwidth (GB/s) the shares are also given at, so that "
                       "runs compare across the bandwidth each run measures (default: the "
                       "4543 GB/s of NOTES_moe.md v20's H200 run, the targets' reference)")
  ap.add_argument("--variants", default="unsliced,fused_moe",
                  help="comma-separated, of: fused_moe (the library's layer), unsliced (no "
                       "k-slices at decode), one_tile (one N block per block at prefill), "
                       "eight_rows (8-row decode blocks), ksliced (k-slices at every block_m-8 "
                       "GEMM), ksliced_eight_rows, ksliced4 / ksliced4_units (4 k-slices at "
                       "every block_m-8 GEMM / where K is a multiple of 1024), xla_routing "
                       "(no routing kernel), tiles2 / "
                       "tiles4 (2 / 4 N blocks per block in every unsliced unsplit GEMM), "
                       "ks_tiles8 / ks_tiles16 (the k-sliced rule's token-tile limit raised "
                       "from 4), split6 (split K down to 6 k64 chunks per split, not 48), "
                       "unfused (w13 in plain order: the activation as an XLA kernel), "
                       "route_general (the general routing kernel at decode too), "
                       "decode_tiles1 (one N block per block at block_m 8), short_units "
                       "(JAX_NVFP4_MOE_LONG_UNITS=0: 4-chunk units in the unsliced block_m-8 "
                       "GEMMs with K >= 2048 too), route_wide (JAX_NVFP4_ROUTE_WIDE=1: the "
                       "wide decode routing kernel wherever it fits), route_decode "
                       "(JAX_NVFP4_ROUTE_WIDE=0: never), pair (JAX_NVFP4_MOE_PAIR=1: both "
                       "GEMMs in one custom call)")
  args = ap.parse_args()
  rows = []
  key = jax.random.key(1)
  bw = copy_bandwidth()
  print(f"{jax.devices()[0].device_kind}: copy bandwidth {bw / 1e9:.0f} GB/s (the roofline's)")
  for e, h, inter, k in bench_moe.SHAPES:
    routing = bench_moe.routing_for(e, k)
    w13s, w2s, key = ab_moe_overhead.weight_copies(key, e, h, inter)
    copies = len(w13s)
    contexts = {"unsliced": lambda: rule_returning("choose_moe_k_slices", 1),
                "fused_moe": contextlib.nullcontext,
                "one_tile": lambda: rule_returning("choose_moe_prefill_tiles", 1),
                "eight_rows": gemms_without_row_hint,
                "ksliced": all_ksliced,
                "ksliced_eight_rows": lambda: all_ksliced(eight_rows=True),
                "ksliced4": lambda: four_slices(whole_units=False),
                "ksliced4_units": lambda: four_slices(whole_units=True),
                "xla_routing": lambda: rule_returning("fits_one_block", False, moe_route),
                "tiles2": lambda: unsplit_tiles_per_block(2),
                "tiles4": lambda: unsplit_tiles_per_block(4),
                "ks_tiles8": lambda: patched("MOE_K_SLICES_MAX_TOKEN_TILES", 8),
                "ks_tiles16": lambda: patched("MOE_K_SLICES_MAX_TOKEN_TILES", 16),
                "split6": lambda: patched("MIN_CHUNKS_PER_SPLIT", 6),
                "unfused": contextlib.nullcontext,
                "route_general": lambda: environment("JAX_NVFP4_ROUTE_SMALL", "0"),
                "short_units": lambda: environment("JAX_NVFP4_MOE_LONG_UNITS", "0"),
                "route_wide": lambda: environment("JAX_NVFP4_ROUTE_WIDE", "1"),
                "route_decode": lambda: environment("JAX_NVFP4_ROUTE_WIDE", "0"),
                "pair": lambda: environment("JAX_NVFP4_MOE_PAIR", "1"),
                "decode_tiles1": decode_one_tile}
    variants = {name: (many(bench_moe.nvfp4_layer(routing)), contexts[name])
                for name in args.variants.split(",")}
    for t in (int(v) for v in args.tokens.split(",")):
      kx = jax.random.split(jax.random.fold_in(key, t), 2 * copies)
      xs = [jax.random.normal(kx[2 * c], (t, h), jnp.bfloat16) for c in range(copies)]
      logits = [jax.random.normal(kx[2 * c + 1], (t, e), jnp.float32) for c in range(copies)]
      lists = (xs, logits, w13s, w2s)
      # "unfused": w13 in plain [gate; up] order, GEMM1 writes [M*k, 2I] and XLA applies the
      # activation (the layer before NOTES_moe.md v17; random weights, so only the flag moves).
      plain = (xs, logits, [dataclasses.replace(w, gate_up_pairs=False) for w in w13s], w2s)
      # The roofline as bench_moe.py's: the FP4 bytes of the experts hit, at the copy bandwidth.
      hit = bench_moe.experts_hit(logits, routing)
      roof_us = hit * bench_moe.layer_expert_bytes(h, inter) / bw * 1e6
      for name, (fn, context) in variants.items():
        operands = plain if name == "unfused" else lists
        with context():
          jax.block_until_ready(fn(*operands))
          runs = [profile_once(fn, operands, copies) for _ in range(3)]
        row = dict(e=e, h=h, i=inter, top_k=k, tokens=t, variant=name, copies=copies,
                   names=runs[0]["names"], experts_hit=hit, roofline_us=roof_us,
                   copy_bandwidth_gbs=bw / 1e9, ref_gbs=args.ref_gbs)
        for field in sorted({f for r in runs for f in r if f.endswith("_us") or f == "kernels"}):
          row[field] = statistics.median(r.get(field, 0.0) for r in runs)
        row["by_name_us"] = {n: statistics.median(r["by_name"].get(n, 0.0) for r in runs)
                             for n in sorted(runs[0]["by_name"])}
        row["pct_roofline"] = 100 * roof_us / row["span_us"]
        row["pct_roofline_ref"] = row["pct_roofline"] * bw / (args.ref_gbs * 1e9)
        rows.append(row)
        print(f"E={e:<4} T={t:<4} {name:<18} span {row['span_us']:7.1f} us/layer "
              f"({row['pct_roofline']:4.1f} % of {roof_us:.1f}; {row['pct_roofline_ref']:4.1f} "
              f"% at {args.ref_gbs:.0f} GB/s) | kernels "
              f"{row['kernels']:5.1f} | " + " ".join(
                  f"{f[:-3]} {row[f]:6.1f}" for f in ("gemm_us", "gemm1_us", "gemm2_us",
                                                       "align_us", "memset_us", "xla_us")
                  if f in row), flush=True)
        print("    " + "; ".join(f"{n} {v:.1f}" for n, v in sorted(
            row["by_name_us"].items(), key=lambda kv: -kv[1])), flush=True)
    del w13s, w2s
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, method=__doc__,
                     rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

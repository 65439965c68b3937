"""A/B of the MoE layer's non-GEMM work at small T (not a test; run on a GPU):

  python benchmarks/ab_moe_overhead.py [--tokens 1,16,64] [--out FILE.json]

Variants of the same SwiGLU layer (router logits -> combined output), each timed with
bench/common.py's method (``many`` program over distinct weight copies, RUNS dispatches back to
back, median over TRIALS), the variants interleaved trial by trial so that drift between trials
hits all of them alike:

* ``v7``: the alignment in plain JAX (``align_tokens(backend="reference")``, ~9 XLA kernels)
  and both GEMM outputs cleared by a memset (``zero_unwritten=True``): v7's layer, but with the
  current split-K rule (NOTES_moe.md v5 has the numbers with v7's rule).
* ``align_kernel``: the one-launch CUDA alignment, memsets kept.
* ``fused_moe``: the library's layer (CUDA alignment, no memsets, masked combine).
* ``gemms_only``: the two grouped GEMMs and the activation with the alignment computed outside
  the timed program: what is left when routing, alignment and combine cost nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_nvfp4 as nf
from jax_nvfp4.bench import moe as bench_moe
from jax_nvfp4.bench.common import many

RUNS, TRIALS = 4, 9


def layer(routing, *, align_backend, zero_unwritten):
  def run(x, logits, w13, w2):
    tw, ti = nf.route(logits, routing)
    m, k = ti.shape
    al = nf.align_tokens(ti, w13.qweight.shape[0], nf.choose_block_m(m, k, logits.shape[1]),
                         backend=align_backend)
    h = nf.nvfp4_moe_gemm(x, w13, al, gather_div=k, num_rows_out=m * k,
                          zero_unwritten=zero_unwritten)
    a = nf.apply_activation(h, "swiglu", intermediate_size=w2.k, dtype=x.dtype)
    y = nf.nvfp4_moe_gemm(a, w2, al, gather_div=1, num_rows_out=m * k,
                          topk_weights=tw.reshape(-1), zero_unwritten=zero_unwritten)
    return jnp.sum(y.reshape(m, k, -1).astype(jnp.float32), axis=1).astype(x.dtype)
  return run


def gemms_only(x, al, tw, w13, w2):
  m, k = tw.shape
  h = nf.nvfp4_moe_gemm(x, w13, al, gather_div=k, num_rows_out=m * k, zero_unwritten=False)
  a = nf.apply_activation(h, "swiglu", intermediate_size=w2.k, dtype=x.dtype)
  return nf.nvfp4_moe_gemm(a, w2, al, gather_div=1, num_rows_out=m * k,
                           topk_weights=tw.reshape(-1), zero_unwritten=False)


def weight_copies(key, e, h, inter):
  """bench_moe.py's weight copies of one shape: ``(w13s, w2s, next key)``."""
  per_expert = bench_moe.layer_expert_bytes(h, inter)
  copies = int(max(1, min(bench_moe.MAX_COPIES, bench_moe.FP4_BUDGET // (e * per_expert))))
  keys = jax.random.split(key, 2 * copies + 1)
  w13s = [bench_moe.random_prepared(keys[2 * c], e, 2 * inter, h, True) for c in range(copies)]
  w2s = [bench_moe.random_prepared(keys[2 * c + 1], e, h, inter) for c in range(copies)]
  return w13s, w2s, keys[-1]


def time_once(fn, lists):
  t0 = time.perf_counter()
  for _ in range(RUNS):
    out = fn(*lists)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / (RUNS * len(lists[0]))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", default="1,16,64")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  tokens = [int(t) for t in args.tokens.split(",")]
  rows = []
  key = jax.random.key(1)
  for e, h, inter, k in bench_moe.SHAPES:
    routing = bench_moe.routing_for(e, k)
    w13s, w2s, key = weight_copies(key, e, h, inter)
    copies = len(w13s)
    variants = {
        "v7": many(layer(routing, align_backend="reference", zero_unwritten=True)),
        "align_kernel": many(layer(routing, align_backend="cuda", zero_unwritten=True)),
        "fused_moe": many(bench_moe.nvfp4_layer(routing)),
    }
    for t in tokens:
      kx = jax.random.split(jax.random.fold_in(key, t), 2 * copies)
      xs = [jax.random.normal(kx[2 * c], (t, h), jnp.bfloat16) for c in range(copies)]
      logits = [jax.random.normal(kx[2 * c + 1], (t, e), jnp.float32) for c in range(copies)]
      routed = [nf.route(l, routing) for l in logits]
      als = [nf.align_tokens(ti, e, nf.choose_block_m(t, k, e)) for _, ti in routed]
      tws = [tw for tw, _ in routed]
      lists = {name: (xs, logits, w13s, w2s) for name in variants}
      fns = dict(variants, gemms_only=many(gemms_only))
      lists["gemms_only"] = (xs, als, tws, w13s, w2s)
      outs = {n: fns[n](*lists[n]) for n in fns}          # compile + warm up
      ref_out = np.asarray(outs["v7"][0], np.float32)
      for n in ("align_kernel", "fused_moe"):             # same layer, same bits expected
        np.testing.assert_array_equal(np.asarray(outs[n][0], np.float32), ref_out)
      times = {n: [] for n in fns}
      for _ in range(TRIALS):
        for n in fns:
          times[n].append(time_once(fns[n], lists[n]) * 1e6)
      row = dict(e=e, h=h, i=inter, top_k=k, tokens=t, copies=copies,
                 **{f"{n}_us": statistics.median(v) for n, v in times.items()},
                 **{f"{n}_spread_us": max(v) - min(v) for n, v in times.items()})
      rows.append(row)
      print(f"E={e:<4} T={t:<4} " + "  ".join(
          f"{n} {row[n + '_us']:7.1f} (±{row[n + '_spread_us'] / 2:5.1f})" for n in fns),
          flush=True)
    del w13s, w2s
  result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                runs=RUNS, trials=TRIALS, method=__doc__, rows=rows)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()

"""Whole-layer NVFP4 MoE benchmark: ``fused_moe`` vs the same layer in bf16 with
``jax.lax.ragged_dot``, against the roofline of the experts actually hit. ``METHOD`` says how;
it is recorded in every result. Command lines: ``python benchmarks/bench_moe.py`` and
``python -m jax_nvfp4 bench``.

``run(shapes, tokens)`` returns the result dict the JSON files hold: ``device``, ``date``,
``jax``, ``copy_bandwidth_gbs``, ``kernel`` (whether the grouped-GEMM kernel ran), ``runs``,
``trials``, ``method`` and ``rows``, one per (E, H, I, top-k, T): ``e``, ``h``, ``i``,
``top_k``, ``tokens``, ``nvfp4_us``, ``roofline_us``, ``pct_roofline``, ``nvfp4_tflops``,
``experts_hit`` (distinct experts a call routes to, averaged), ``fp4_copies``,
``ragged_bf16_us`` (None when skipped, then ``ragged_skipped`` says why), ``bf16_copies`` and
``speedup_vs_ragged`` (when measured).
"""

from __future__ import annotations

import datetime
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_nvfp4.bench.common import copy_bandwidth, many, time_per_call
from jax_nvfp4.moe.routing import RoutingConfig, route
from jax_nvfp4.ops import moe as moe_ops
from jax_nvfp4.prepare import PreparedNVFP4Weight

RUNS = 5
TRIALS = 5
#: ``--quick``: fewer runs and trials, and T in QUICK_TOKENS.
QUICK_RUNS, QUICK_TRIALS = 2, 3
#: (E, H, I, top_k): Qwen3-30B-A3B, DeepSeek-V3, Mixtral-8x7B-like.
SHAPES = ((128, 2048, 768, 8), (256, 7168, 2048, 8), (8, 4096, 14336, 2))
TOKENS = (1, 16, 64, 256, 1024, 4096)
QUICK_TOKENS = (1, 64, 1024)
#: GPU memory budget for the weight copies of one shape (bytes), per kind.
FP4_BUDGET = 16e9
BF16_BUDGET = 24e9
MAX_COPIES = 8
#: ragged_dot expands to masked dense work over the experts; skip it past these estimates
#: (seconds per call at ~400 TFLOP/s, bytes of a float32 [rows, E, N] temporary).
RAGGED_MAX_S = 1.0
RAGGED_MAX_BYTES = 20e9

METHOD = """Whole-layer NVFP4 MoE benchmark (not a test). Run on a GPU:  python benchmarks/bench_moe.py

What is timed: ``fused_moe`` from router logits to the combined output (routing -> alignment ->
GEMM1 -> activation -> GEMM2 x top-k weight -> sum over top-k), SwiGLU, bf16 activations,
prepared (kernel-layout) weights. Baseline: the same layer in bf16 with ``jax.lax.ragged_dot``
(tokens sorted by expert, two ragged GEMMs, unsort, weighted sum).

Method (as benchmarks/bench_dense.py). Each timed function is one jitted program that runs the
layer once per weight copy, each call with its own weight copy, tokens and router logits, so no
two calls share an operand (XLA merges dots that share one) and the experts a call reads are not
in L2 from the call before. The program is dispatched RUNS times back to back before waiting for
the last result, so host dispatch overlaps device work; the time per layer is the median over
TRIALS of total / (RUNS * copies). XLA's default flags (command buffers on). Weights are random
codes / block scales generated directly in the kernel layout (timing does not depend on the
values; quantizing or preparing 6 GB of DeepSeek experts would only cost memory).

Roofline: the bytes of the experts actually hit (FP4 codes + block scales of every distinct
(expert, w13/w2) a call routes to, averaged over the calls) / HBM copy bandwidth measured in the
same run (device-to-device copy, bytes read + written). Big layers hold fewer copies (the
DeepSeek shape is ~6.3 GB of FP4 per copy, 22.5 GB in bf16).
"""


def _print(line: str) -> None:
  print(line, flush=True)


def routing_for(e: int, k: int) -> RoutingConfig:
  if e == 256:  # DeepSeek-V3
    return RoutingConfig(top_k=k, scoring="sigmoid", n_group=8, topk_group=4,
                         routed_scaling_factor=2.5)
  return RoutingConfig(top_k=k)  # Qwen3 / Mixtral: softmax, top-k, renormalise


# ----------------------------------------------------------------------------- weights

def fp4_expert_bytes(n: int, k: int) -> int:
  """Bytes of one expert's [n, k] weight in the kernel layout (codes + block scales + gs)."""
  n16, k64 = -(-n // 16), -(-k // 64)
  return n16 * k64 * (32 * 4 * 4 + 64) + 4


def layer_expert_bytes(h: int, inter: int) -> int:
  """Bytes of one expert of a gated layer: its w13 ``[2I, H]`` and w2 ``[H, I]``."""
  return fp4_expert_bytes(2 * inter, h) + fp4_expert_bytes(h, inter)


def experts_hit(logits: list, routing: RoutingConfig) -> float:
  """Distinct experts a call routes to, averaged over the calls' router logits."""
  return float(np.mean([len(np.unique(np.asarray(route(l, routing)[1]))) for l in logits]))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def random_prepared(key, e: int, n: int, k: int, gate_up_pairs: bool = False
                    ) -> PreparedNVFP4Weight:
  """Random stacked weight in the kernel layout: all codes, UE5M3 scales in [2^-2, 2^2]
  (``gate_up_pairs``: marked as a gated w13 in gate/up pairs, so that GEMM1 applies the
  activation, as ``prepare(w13, gate_up_pairs=True)`` gives)."""
  kq, ks = jax.random.split(key)
  n16, k64 = -(-n // 16), -(-k // 64)
  qweight = jax.random.bits(kq, (e, n16, k64, 32, 4), jnp.uint32)
  qscales = jax.random.randint(ks, (e, n16, k64, 64), 64, 104, jnp.int32).astype(jnp.uint8)
  gs = jnp.full((e,), 0.5 / np.sqrt(k), jnp.float32)
  return PreparedNVFP4Weight(qweight, qscales, gs, n=n, k=k, gate_up_pairs=gate_up_pairs)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def random_bf16(key, e: int, k: int, n: int) -> jax.Array:
  """ragged_dot's rhs layout: [E, K, N] (generated in bf16: the DeepSeek w13 is 15 GB)."""
  return jax.random.normal(key, (e, k, n), jnp.bfloat16) * jnp.bfloat16(1 / np.sqrt(k))


# ----------------------------------------------------------------------------- layers

def nvfp4_layer(routing):
  def layer(x, logits, w13, w2):
    return moe_ops.fused_moe(x, w13, w2, router_logits=logits, routing=routing)
  return layer


def ragged_layer(routing):
  """The same layer in bf16 with jax.lax.ragged_dot."""
  def layer(x, logits, w13, w2):
    m, h = x.shape
    e, _, n13 = w13.shape
    inter = n13 // 2
    tw, ti = route(logits, routing)
    k = ti.shape[1]
    flat = ti.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.zeros((e,), jnp.int32).at[flat].add(1)
    xs = x[order // k]
    hid = jax.lax.ragged_dot(xs, w13, group_sizes, preferred_element_type=jnp.float32)
    act = (jax.nn.silu(hid[:, :inter]) * hid[:, inter:]).astype(x.dtype)
    y = jax.lax.ragged_dot(act, w2, group_sizes, preferred_element_type=jnp.float32)
    y = y * tw.reshape(-1)[order][:, None]
    out = jnp.zeros((m * k, h), jnp.float32).at[order].set(y)
    return out.reshape(m, k, h).sum(axis=1).astype(x.dtype)
  return layer


# ----------------------------------------------------------------------------- one shape

def bench_shape(e, h, inter, k, tokens, bw, key, *, ragged=True, runs: int = RUNS,
                trials: int = TRIALS, max_copies: int = MAX_COPIES, log=_print) -> list[dict]:
  """Measures one MoE layer shape at every T of ``tokens``; ``bw``: copy bandwidth in bytes/s.

  ``log`` gets a line per measurement (None: silent).
  """
  log = log if log is not None else (lambda line: None)
  routing = routing_for(e, k)
  per_expert = layer_expert_bytes(h, inter)
  fp4_copies = int(max(1, min(max_copies, FP4_BUDGET // (e * per_expert))))
  bf16_copies = int(max(1, min(max_copies, BF16_BUDGET // (e * 3 * h * inter * 2))))
  keys = jax.random.split(key, 2 * fp4_copies + 2 * bf16_copies + 1)
  w13s = [random_prepared(keys[2 * c], e, 2 * inter, h, True) for c in range(fp4_copies)]
  w2s = [random_prepared(keys[2 * c + 1], e, h, inter) for c in range(fp4_copies)]
  jax.block_until_ready((w13s, w2s))
  fp4_fn = many(nvfp4_layer(routing))
  rows = []
  for t in tokens:
    kx = jax.random.split(jax.random.fold_in(keys[-1], t), 2 * fp4_copies)
    xs = [jax.random.normal(kx[2 * c], (t, h), jnp.bfloat16) for c in range(fp4_copies)]
    logits = [jax.random.normal(kx[2 * c + 1], (t, e), jnp.float32) for c in range(fp4_copies)]
    hit = experts_hit(logits, routing)
    hit_bytes = hit * per_expert
    roof_us = hit_bytes / bw * 1e6
    t_fp4 = time_per_call(fp4_fn, xs, logits, w13s, w2s, runs=runs, trials=trials) * 1e6
    flops = 2 * t * k * 3 * h * inter
    row = dict(e=e, h=h, i=inter, top_k=k, tokens=t, nvfp4_us=t_fp4, roofline_us=roof_us,
               pct_roofline=100 * roof_us / t_fp4, nvfp4_tflops=flops / t_fp4 / 1e6,
               experts_hit=hit, fp4_copies=fp4_copies, ragged_bf16_us=None,
               bf16_copies=bf16_copies)
    rows.append(row)
    log(f"E={e:<4} H={h:<5} I={inter:<6} k={k} T={t:<5} nvfp4 {t_fp4:9.1f} us | roof "
        f"{roof_us:7.1f} us ({row['pct_roofline']:5.1f} %) | {row['nvfp4_tflops']:6.1f} TF/s "
        f"| hit {row['experts_hit']:.1f}")
  del w13s, w2s

  if ragged:
    b13 = [random_bf16(keys[2 * fp4_copies + 2 * c], e, h, 2 * inter) for c in range(bf16_copies)]
    b2 = [random_bf16(keys[2 * fp4_copies + 2 * c + 1], e, inter, h) for c in range(bf16_copies)]
    jax.block_until_ready((b13, b2))
    rag_fn = many(ragged_layer(routing))
    for row in rows:
      t = row["tokens"]
      # Masked-dense expansion over the experts at ~400 TFLOP/s: skip what would take too long.
      estimate_s = 2 * t * k * e * 3 * h * inter / 4e14
      estimate_b = t * k * e * max(2 * inter, h) * 4
      if estimate_s > RAGGED_MAX_S or estimate_b > RAGGED_MAX_BYTES:
        row["ragged_skipped"] = (f"estimated {estimate_s:.2f} s per call, "
                                 f"{estimate_b / 1e9:.0f} GB temporary")
        log(f"E={e:<4} T={t:<5} ragged_dot skipped ({row['ragged_skipped']})")
        continue
      kx = jax.random.split(jax.random.fold_in(keys[-1], t + 7), 2 * bf16_copies)
      xs = [jax.random.normal(kx[2 * c], (t, h), jnp.bfloat16) for c in range(bf16_copies)]
      logits = [jax.random.normal(kx[2 * c + 1], (t, e), jnp.float32)
                for c in range(bf16_copies)]
      try:
        row["ragged_bf16_us"] = time_per_call(rag_fn, xs, logits, b13, b2, runs=runs,
                                              trials=trials) * 1e6
      except Exception as err:  # pylint: disable=broad-except  # e.g. out of device memory
        row["ragged_skipped"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
        log(f"E={e:<4} T={t:<5} ragged_dot {row['ragged_skipped']}")
        continue
      row["speedup_vs_ragged"] = row["ragged_bf16_us"] / row["nvfp4_us"]
      log(f"E={e:<4} T={t:<5} ragged_dot bf16 {row['ragged_bf16_us']:10.1f} us "
          f"(nvfp4 is {row['speedup_vs_ragged']:.1f}x faster)")
    del b13, b2
  return rows


def kernel_used() -> bool:
  """Whether ``fused_moe`` runs the CUDA grouped-GEMM kernel here (else the reference path)."""
  return moe_ops._kernel_wanted()  # pylint: disable=protected-access


def header_line(bw: float, kernel: bool) -> str:
  dev = jax.devices()[0]
  return (f"device: {dev.device_kind}; jax {jax.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s;"
          f" grouped-GEMM kernel: {'yes' if kernel else 'NO (reference path)'}")


def run(shapes=SHAPES, tokens=TOKENS, *, ragged: bool = True, bw: float | None = None,
        runs: int = RUNS, trials: int = TRIALS, max_copies: int = MAX_COPIES,
        log=_print) -> dict:
  """Measures every ``(E, H, I, top_k)`` of ``shapes`` at every T of ``tokens``; returns the
  result dict (module docstring). Without ``bw`` the copy bandwidth is measured first and a
  ``device:`` line is logged."""
  dev = jax.devices()[0]
  kernel = kernel_used()
  if bw is None:
    bw = copy_bandwidth()
    if log is not None:
      log(header_line(bw, kernel))
  rows = []
  key = jax.random.key(0)
  for e, h, inter, k in shapes:
    key, sub = jax.random.split(key)
    rows += bench_shape(e, h, inter, k, tokens, bw, sub, ragged=ragged, runs=runs,
                        trials=trials, max_copies=max_copies, log=log)
  return dict(device=dev.device_kind, date=datetime.date.today().isoformat(),
              jax=jax.__version__, copy_bandwidth_gbs=bw / 1e9, kernel=kernel, runs=runs,
              trials=trials, method=METHOD, rows=rows)


def format_table(rows: list[dict]) -> str:
  """The summary table of MoE rows (times in microseconds)."""
  lines = ["   E     H      I  k     T   nvfp4 us   roof us  %roof  ragged us"]
  for r in rows:
    rag = f"{r['ragged_bf16_us']:10.1f}" if r["ragged_bf16_us"] else "         -"
    lines.append(f"{r['e']:4} {r['h']:5} {r['i']:6} {r['top_k']:2} {r['tokens']:5} "
                 f"{r['nvfp4_us']:10.1f} {r['roofline_us']:9.1f} {r['pct_roofline']:6.1f} {rag}")
  return "\n".join(lines)

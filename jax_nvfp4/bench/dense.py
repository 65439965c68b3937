"""Dense NVFP4 GEMM benchmark: ``nvfp4_matmul`` vs XLA's bf16 dot, cuBLAS bf16 (torch, when
importable), the pure-JAX dequantize + dot, and the HBM roofline. ``METHOD`` says how; it is
recorded in every result. Command lines: ``python benchmarks/bench_dense.py`` and
``python -m jax_nvfp4 bench``.

``run(shapes, ms)`` returns the result dict the JSON files hold: ``device``, ``date``, ``jax``,
``copy_bandwidth_gbs``, ``method`` and ``rows``, one per (K, N, M): ``k``, ``n``, ``m`` and the
microseconds per call ``kernel_us`` (``nvfp4_matmul`` with a ``prepare``\\ d weight),
``xla_bf16_us`` (``x @ w.T`` in bf16), ``cublas_bf16_us`` (None without torch/CUDA),
``jax_dequant_dot_us`` (``x @ dequantize(q, bf16).T``), ``roofline_us``, ``pct_roofline``
(``100 * roofline_us / kernel_us``), ``kernel_tflops`` and ``vs_cublas``
(``cublas_bf16_us / kernel_us`` or None).
"""

from __future__ import annotations

import datetime
import statistics

import jax
import jax.numpy as jnp

from jax_nvfp4.bench.common import copy_bandwidth, device_time_per_call, many, time_per_call
from jax_nvfp4.format import NVFP4Weight, dequantize
from jax_nvfp4.ops.dense import nvfp4_matmul
from jax_nvfp4.prepare import prepare

COPIES = 16
RUNS = 10
TRIALS = 7
#: (K, N) of the default shapes: Llama-3-8B MLP up / down, a 70B-class MLP, a square attention
#: projection.
SHAPES = ((4096, 14336), (14336, 4096), (8192, 28672), (4096, 4096))
MS = (1, 16, 64, 256, 1024, 4096)

METHOD = """Dense NVFP4 GEMM benchmark (not a test). Run on a GPU:  python benchmarks/bench_dense.py

Method. Every timed function is one jitted program that calls the op once on each of COPIES
(more for weights smaller than 4096 x 14336: copies_for) distinct weight copies (more bytes
than L2 holds, so each call streams its weight from HBM), each with its own activation array. No two calls share an operand: XLA merges dots that share one
(a program that multiplied one weight by 4 activations read the weight once, which made the
XLA column look faster than HBM allows). The program is dispatched RUNS
times back to back before waiting for the last result, so the host's dispatch of program r+1
overlaps the device's execution of program r; the time per call is the median over TRIALS of
total / (RUNS * COPIES). (If the host were slower than the device the figure would be an upper
bound; at these sizes a program's device time is hundreds of microseconds.) XLA's default flags are used (command
buffers on). The roofline is bytes moved (NVFP4 weight + scales + x + out) / HBM copy bandwidth measured
in the same run (a device-to-device copy, bytes read + written). cuBLAS is torch.matmul in bf16,
timed with CUDA events over the same rotating copies. Device time (kernel_device_us,
pct_roofline_device): one execution of the kernel's program under jax.profiler.trace, the span of
its GPU kernels (first start to last end, gaps between launches included) / COPIES, median of
three executions; the wall-clock time cannot fall below the host's launch of each custom call
(10-20 us on the lent H100), which hides the device time of small weights.
"""


def _print(line: str) -> None:
  print(line, flush=True)


def torch_cublas_us(m: int, n: int, k: int, *, copies: int = COPIES,
                    trials: int = TRIALS) -> float | None:
  """Microseconds per ``torch.matmul`` in bf16 over ``copies`` rotating weights (CUDA events),
  or None when torch or its CUDA device is missing."""
  try:
    import torch
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
  ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
  for w in ws:
    torch.matmul(xs[0], w.t())
  torch.cuda.synchronize()
  times = []
  for _ in range(trials):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for x, w in zip(xs, ws):
      torch.matmul(x, w.t())
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) * 1e3 / copies)
  del ws
  torch.cuda.empty_cache()
  return statistics.median(times)


def roofline_bytes(m: int, n: int, k: int) -> int:
  """Bytes one call must move: NVFP4 codes + E4M3 block scales, bf16 x and out."""
  return n * k // 2 + n * k // 16 + m * k * 2 + m * n * 2


def format_row(row: dict) -> str:
  """The progress line of one measured row."""
  k, n, m = row["k"], row["n"], row["m"]
  t_torch = row["cublas_bf16_us"]
  return (f"{k:>6}x{n:<6} M={m:<5} kernel {row['kernel_us']:8.1f} us | xla bf16 "
          f"{row['xla_bf16_us']:8.1f} | "
          f"cublas {t_torch if t_torch else float('nan'):8.1f} | dequant+dot "
          f"{row['jax_dequant_dot_us']:8.1f} | "
          f"roof {row['roofline_us']:6.1f} ({row['pct_roofline']:5.1f} %) | "
          f"{row['kernel_tflops']:6.1f} TF/s" + (
              f" | device {row['kernel_device_us']:6.1f} us ({row['pct_roofline_device']:5.1f} %)"
              if row.get("kernel_device_us") else ""))


def copies_for(k: int, n: int, copies: int = COPIES) -> int:
  """``copies`` for a Llama-3-8B MLP-sized weight (4096 x 14336) or larger; proportionally
  more (at most 64) for smaller weights, so that one program keeps the device busy for longer
  than the host takes to dispatch it (16 calls of a 4096 x 4096 weight at M = 1 are ~200 us of
  device work, which measured host-bound: 13-21 us per call between runs)."""
  return int(min(64, max(copies, copies * round(4096 * 14336 / (k * n)))))


def bench_shape(k, n, ms, bw, key, with_torch=True, *, copies: int = COPIES, runs: int = RUNS,
                trials: int = TRIALS, log=_print) -> list[dict]:
  """Measures one ``[N, K]`` weight at every M of ``ms``; ``bw``: copy bandwidth in bytes/s.
  ``copies`` is scaled up for small weights (``copies_for``).

  ``log`` gets each row's ``format_row`` line as it is measured (None: silent).
  """
  copies = copies_for(k, n, copies)
  rows = []
  keys = jax.random.split(key, copies + 1)
  # Random codes and scales directly on the device (quantizing 8 copies is slow and not timed).
  qs = []
  for i in range(copies):
    kp, ks = jax.random.split(keys[i])
    packed = jax.random.randint(kp, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = jax.random.uniform(ks, (n, k // 16), jnp.float32, 0.05, 8.0)
    qs.append(NVFP4Weight(packed, scales.astype(jnp.float8_e4m3fn), jnp.float32(0.01)))
  prepared = [prepare(q) for q in qs]
  jax.block_until_ready(prepared)
  bf16 = [dequantize(q, jnp.bfloat16) for q in qs]
  kernel = many(nvfp4_matmul)
  xla_dot = many(lambda x, w: x @ w.T)
  deq_dot = many(lambda x, q: x @ dequantize(q, jnp.bfloat16).T)
  for m in ms:
    x = [jax.random.normal(kx, (m, k), jnp.bfloat16) for kx in jax.random.split(keys[-1], copies)]
    t_kernel = time_per_call(kernel, x, prepared, runs=runs, trials=trials) * 1e6
    t_device = device_time_per_call(kernel, x, prepared) if jax.default_backend() == "gpu" else None
    t_device = t_device * 1e6 if t_device else None
    t_xla = time_per_call(xla_dot, x, bf16, runs=runs, trials=trials) * 1e6
    t_deq = time_per_call(deq_dot, x, qs, runs=runs, trials=trials) * 1e6
    t_torch = torch_cublas_us(m, n, k, copies=copies, trials=trials) if with_torch else None
    roof = roofline_bytes(m, n, k) / bw * 1e6
    flops = 2 * m * n * k
    row = dict(k=k, n=n, m=m, kernel_us=t_kernel, xla_bf16_us=t_xla, cublas_bf16_us=t_torch,
               jax_dequant_dot_us=t_deq, roofline_us=roof, pct_roofline=100 * roof / t_kernel,
               kernel_tflops=flops / t_kernel / 1e6,
               vs_cublas=(t_torch / t_kernel) if t_torch else None,
               kernel_device_us=t_device,
               pct_roofline_device=100 * roof / t_device if t_device else None)
    rows.append(row)
    if log is not None:
      log(format_row(row))
  del bf16, prepared, qs
  return rows


def run(shapes=SHAPES, ms=MS, *, with_torch: bool = True, bw: float | None = None,
        copies: int = COPIES, runs: int = RUNS, trials: int = TRIALS, log=_print) -> dict:
  """Measures every ``(K, N)`` of ``shapes`` at every M of ``ms``; returns the result dict
  (module docstring). Without ``bw`` the copy bandwidth is measured first and a ``device:``
  line is logged."""
  dev = jax.devices()[0]
  if bw is None:
    bw = copy_bandwidth()
    if log is not None:
      log(f"device: {dev.device_kind}; jax {jax.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s")
  rows = []
  key = jax.random.key(0)
  for k, n in shapes:
    key, sub = jax.random.split(key)
    rows += bench_shape(k, n, ms, bw, sub, with_torch=with_torch, copies=copies, runs=runs,
                        trials=trials, log=log)
  return dict(device=dev.device_kind, date=datetime.date.today().isoformat(),
              jax=jax.__version__, copy_bandwidth_gbs=bw / 1e9, method=METHOD, rows=rows)


def format_table(rows: list[dict]) -> str:
  """A compact table of dense rows: times in microseconds, the roofline share, and the speed
  relative to XLA's bf16 dot."""
  lines = ["      K      N     M  nvfp4 us  bf16 xla us  cublas us  deq+dot us   roof us  %roof"
           "  x bf16  device us  %roof dev"]
  for r in rows:
    cub = f"{r['cublas_bf16_us']:10.1f}" if r.get("cublas_bf16_us") else "         -"
    dev = (f" {r['kernel_device_us']:10.1f} {r['pct_roofline_device']:10.1f}"
           if r.get("kernel_device_us") else "          -          -")
    lines.append(f"{r['k']:7} {r['n']:6} {r['m']:5} {r['kernel_us']:9.1f} {r['xla_bf16_us']:12.1f}"
                 f" {cub} {r['jax_dequant_dot_us']:11.1f} {r['roofline_us']:9.1f}"
                 f" {r['pct_roofline']:6.1f} {r['xla_bf16_us'] / r['kernel_us']:7.2f}{dev}")
  return "\n".join(lines)

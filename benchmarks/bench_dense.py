"""Dense NVFP4 GEMM benchmark (not a test). Run on a GPU:  python benchmarks/bench_dense.py

Method. Every timed function is one jitted program that calls the op once on each of COPIES
distinct weight copies (more bytes than L2 holds, so each call streams its weight from HBM), each
with its own activation array. No two calls share an operand: XLA merges dots that share one
(a program that multiplied one weight by 4 activations read the weight once, which made the
XLA column look faster than HBM allows). The program is dispatched RUNS
times back to back before waiting for the last result, so the host's dispatch of program r+1
overlaps the device's execution of program r; the time per call is the median over TRIALS of
total / (RUNS * COPIES). (If the host were slower than the device the figure would be an upper
bound; at these sizes a program's device time is hundreds of microseconds.) XLA's default flags are used (command
buffers on). The roofline is bytes moved (NVFP4 weight + scales + x + out) / HBM copy bandwidth measured
in the same run (a device-to-device copy, bytes read + written). cuBLAS is torch.matmul in bf16,
timed with CUDA events over the same rotating copies.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_nvfp4 as nf

COPIES = 16
RUNS = 10
TRIALS = 7


def _time_program(fn, xs, ws) -> float:
  """Seconds per call (see the module docstring)."""
  jax.block_until_ready(fn(xs, ws))
  times = []
  for _ in range(TRIALS):
    t0 = time.perf_counter()
    for _ in range(RUNS):
      out = fn(xs, ws)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  return statistics.median(times) / (RUNS * len(ws))


def copy_bandwidth() -> float:
  """Device-to-device copy bandwidth in bytes/s (bytes read + written)."""
  n = 1 << 28 if jax.default_backend() == "gpu" else 1 << 22  # 1 GiB of f32 on a GPU
  a = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda a: [a + jnp.float32(i) for i in range(4)])
  jax.block_until_ready(f(a))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    times.append(time.perf_counter() - t0)
  del a
  return 4 * 2 * n * 4 / statistics.median(times)


def _many(op):
  def program(xs, ws):
    return [op(x, w) for x, w in zip(xs, ws)]
  return jax.jit(program)


def torch_cublas_us(m, n, k):
  try:
    import torch
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
  ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
  for w in ws:
    torch.matmul(xs[0], w.t())
  torch.cuda.synchronize()
  times = []
  for _ in range(TRIALS):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for x, w in zip(xs, ws):
      torch.matmul(x, w.t())
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) * 1e3 / COPIES)
  del ws
  torch.cuda.empty_cache()
  return statistics.median(times)


def bench_shape(k, n, ms, bw, key, with_torch=True):
  rows = []
  keys = jax.random.split(key, COPIES + 1)
  # Random codes and scales directly on the device (quantizing 8 copies is slow and not timed).
  qs = []
  for i in range(COPIES):
    kp, ks = jax.random.split(keys[i])
    packed = jax.random.randint(kp, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = jax.random.uniform(ks, (n, k // 16), jnp.float32, 0.05, 8.0)
    qs.append(nf.NVFP4Weight(packed, scales.astype(jnp.float8_e4m3fn), jnp.float32(0.01)))
  prepared = [nf.prepare(q) for q in qs]
  jax.block_until_ready(prepared)
  bf16 = [nf.dequantize(q, jnp.bfloat16) for q in qs]
  kernel = _many(nf.nvfp4_matmul)
  xla_dot = _many(lambda x, w: x @ w.T)
  deq_dot = _many(lambda x, q: x @ nf.dequantize(q, jnp.bfloat16).T)
  for m in ms:
    x = [jax.random.normal(kx, (m, k), jnp.bfloat16) for kx in jax.random.split(keys[-1], COPIES)]
    t_kernel = _time_program(kernel, x, prepared) * 1e6
    t_xla = _time_program(xla_dot, x, bf16) * 1e6
    t_deq = _time_program(deq_dot, x, qs) * 1e6
    t_torch = torch_cublas_us(m, n, k) if with_torch else None
    nbytes = n * k // 2 + n * k // 16 + m * k * 2 + m * n * 2
    roof = nbytes / bw * 1e6
    flops = 2 * m * n * k
    row = dict(k=k, n=n, m=m, kernel_us=t_kernel, xla_bf16_us=t_xla, cublas_bf16_us=t_torch,
               jax_dequant_dot_us=t_deq, roofline_us=roof, pct_roofline=100 * roof / t_kernel,
               kernel_tflops=flops / t_kernel / 1e6,
               vs_cublas=(t_torch / t_kernel) if t_torch else None)
    rows.append(row)
    print(f"{k:>6}x{n:<6} M={m:<5} kernel {t_kernel:8.1f} us | xla bf16 {t_xla:8.1f} | "
          f"cublas {t_torch if t_torch else float('nan'):8.1f} | dequant+dot {t_deq:8.1f} | "
          f"roof {roof:6.1f} ({row['pct_roofline']:5.1f} %) | {row['kernel_tflops']:6.1f} TF/s",
          flush=True)
  del bf16, prepared, qs
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="4096x14336,14336x4096,8192x28672,4096x4096",
                  help="comma-separated KxN")
  ap.add_argument("--ms", default="1,16,64,256,1024,4096")
  ap.add_argument("--out", default=None, help="write JSON results here")
  ap.add_argument("--no-torch", action="store_true")
  args = ap.parse_args()
  dev = jax.devices()[0]
  bw = copy_bandwidth()
  print(f"device: {dev.device_kind}; jax {jax.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s")
  ms = [int(v) for v in args.ms.split(",")]
  rows = []
  key = jax.random.key(0)
  for shape in args.shapes.split(","):
    k, n = (int(v) for v in shape.split("x"))
    key, sub = jax.random.split(key)
    rows += bench_shape(k, n, ms, bw, sub, with_torch=not args.no_torch)
  result = dict(device=dev.device_kind, date=datetime.date.today().isoformat(),
                jax=jax.__version__, copy_bandwidth_gbs=bw / 1e9, method=__doc__, rows=rows)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()

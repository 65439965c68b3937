"""The measuring method shared by the dense and the MoE benchmarks.

* ``many(op)``: one jitted program that calls ``op`` once per element of its argument lists
  (``op(a[0], b[0], ...)``, ``op(a[1], b[1], ...)``, ...). Each call gets its own operands (its
  own weight copy and activations), so no two calls share one: XLA merges dots that share an
  operand, and distinct weight copies (more bytes than L2 holds) make every call stream its
  weight from HBM.
* ``time_per_call(fn, *lists, runs, trials)``: the program is dispatched ``runs`` times back to
  back before waiting for the last result (host dispatch of program r+1 overlaps device execution
  of program r); the time per call is the median over ``trials`` of
  ``total / (runs * len(lists[0]))``, after one warm-up (compile) call.
* ``copy_bandwidth()``: the HBM roofline's denominator, a device-to-device copy measured in the
  same run (bytes read + written): one elementwise pass ``a * 2`` over 1 GiB of float32 (one
  output, so exactly its bytes move), dispatched 8 times back to back on distinct arrays.
  Until 2026-12-05 it timed one program of four outputs ``a + i`` and counted four reads of
  ``a``; XLA may fuse them and read ``a`` once, and that figure was above what moves (3492-3535
  GB/s on an H100 whose HBM3 peaks at 3350) and the roofline shares computed from it were low by
  the same factor (``benchmarks/copy_bandwidth_check.py`` measures both).
* ``device_time_per_call(fn, *lists)``: GPU time per call without the host: one execution of
  the program under ``jax.profiler.trace``, the span of its GPU kernels (first start to last
  end, launch gaps included) divided by the number of calls, median of three executions. The
  wall-clock figure is bounded below by the host's launch of each call (about 10-20 us per
  custom call on the lent H100), which hides kernels shorter than that.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp


def many(op):
  """``jax.jit`` of ``lists -> [op(*args) for args in zip(*lists)]`` (see the module docstring)."""
  def program(*lists):
    return [op(*args) for args in zip(*lists)]
  return jax.jit(program)


def time_per_call(fn, *lists, runs: int, trials: int) -> float:
  """Seconds per call of a ``many`` program making ``len(lists[0])`` calls (module docstring)."""
  jax.block_until_ready(fn(*lists))
  times = []
  for _ in range(trials):
    t0 = time.perf_counter()
    for _ in range(runs):
      out = fn(*lists)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  return statistics.median(times) / (runs * len(lists[0]))


def _elements() -> int:
  return 1 << 28 if jax.default_backend() == "gpu" else 1 << 22  # 1 GiB of f32 on a GPU


def stream_bandwidth(f, bytes_per_element: int, calls: int = 8) -> float:
  """Bytes/s of ``jax.jit(f)`` over a float32 array of ``_elements()``, moving
  ``bytes_per_element`` per element and call: ``calls`` calls back to back on two arrays in
  turn (dispatch overlapped, one result alive at a time), median of 5 after a warm-up."""
  n = _elements()
  arrays = [jnp.full((n,), i, jnp.float32) for i in range(2)]
  f = jax.jit(f)
  jax.block_until_ready(f(arrays[0]))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    for i in range(calls):
      out = f(arrays[i % 2])
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  del arrays, out
  return calls * bytes_per_element * n / statistics.median(times)


def copy_bandwidth() -> float:
  """Device-to-device copy bandwidth in bytes/s (bytes read + written; module docstring)."""
  return stream_bandwidth(lambda a: a * jnp.float32(2), 2 * 4)


def legacy_copy_bandwidth() -> float:
  """The figure ``copy_bandwidth`` gave until 2026-12-05 (four outputs ``a + i`` counted as four
  reads and four writes), to rescale earlier results: shares times legacy / new."""
  return stream_bandwidth(lambda a: [a + jnp.float32(i) for i in range(4)], 4 * 2 * 4, calls=1)


def gpu_events(trace_dir: str) -> list[dict]:
  """Complete events ("ph": "X") of the GPU tracks of the newest Perfetto trace in trace_dir."""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                key=os.path.getmtime)[-1]
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
              and "GPU" in str(e.get("args", {}).get("name", ""))}
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids
          and e.get("dur", 0) > 0]


def device_time_per_call(fn, *lists, executions: int = 3) -> float | None:
  """Seconds of GPU time per call of a ``many`` program (module docstring); None where the
  trace has no GPU kernels (CPU backend)."""
  calls = len(lists[0])
  jax.block_until_ready(fn(*lists))
  spans = []
  for _ in range(executions):
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d, create_perfetto_trace=True):
        jax.block_until_ready(fn(*lists))
      events = gpu_events(d)
    if not events:
      return None
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    spans.append((end - start) * 1e-6 / calls)
  return statistics.median(spans)


def device_kind() -> str:
  return jax.devices()[0].device_kind


def parse_shapes(text: str, dims: int, what: str) -> list[tuple[int, ...]]:
  """``"4096x14336,4096x4096"`` -> ``[(4096, 14336), (4096, 4096)]`` (positive ints, ``dims``
  per shape); ValueError with a one-line message otherwise."""
  shapes = []
  for part in text.split(","):
    fields = part.strip().lower().split("x")
    try:
      shape = tuple(int(f) for f in fields)
    except ValueError:
      shape = ()
    if len(shape) != dims or min(shape) < 1:
      raise ValueError(f"{what}: {part.strip()!r} is not {dims} positive integers joined by 'x'")
    shapes.append(shape)
  return shapes


def parse_ints(text: str, what: str) -> list[int]:
  """``"1,16,64"`` -> ``[1, 16, 64]`` (positive ints); ValueError otherwise."""
  try:
    values = [int(v) for v in text.split(",")]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise ValueError(f"{what}: {text!r} is not a comma-separated list of positive integers")
  return values

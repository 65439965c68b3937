"""What the roofline's copy bandwidth is (not a test; run on a GPU):

  python benchmarks/copy_bandwidth_check.py

Prints ``jax_nvfp4.bench.copy_bandwidth()`` (one output ``a * 2``: 8 bytes per float32 element
moved), the legacy figure it replaced on 2026-12-05 (four outputs ``a + i`` counted as four
reads; XLA may read ``a`` once), a torch device-to-device ``copy_`` timed with CUDA events where
torch is importable, and a pure read (``jnp.sum``). The ratio legacy / new rescales the roofline
shares in results before that date (share_new = share_old * legacy / new).
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp

from jax_nvfp4.bench.common import copy_bandwidth, legacy_copy_bandwidth, stream_bandwidth


def torch_copy_bandwidth() -> float | None:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  src = torch.ones(1 << 28, device="cuda")
  dst = torch.empty_like(src)
  dst.copy_(src)
  start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
  times = []
  for _ in range(5):
    start.record()
    for _ in range(8):
      dst.copy_(src)
    end.record()
    end.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
  return 8 * 2 * src.numel() * 4 / statistics.median(times)


def main():
  new, legacy = copy_bandwidth(), legacy_copy_bandwidth()
  print(f"{jax.devices()[0].device_kind}")
  print(f"copy_bandwidth (a * 2, 8 B/element):      {new / 1e9:7.0f} GB/s")
  print(f"legacy (4 outputs counted as 4 reads):     {legacy / 1e9:7.0f} GB/s "
        f"(legacy / new = {legacy / new:.3f}: earlier shares x this)")
  tc = torch_copy_bandwidth()
  if tc is not None:
    print(f"torch copy_ (CUDA events):                 {tc / 1e9:7.0f} GB/s")
  read = stream_bandwidth(jnp.sum, 4)
  print(f"read only (jnp.sum):                       {read / 1e9:7.0f} GB/s")


if __name__ == "__main__":
  main()

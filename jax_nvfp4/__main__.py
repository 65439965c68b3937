"""Command line: ``python -m jax_nvfp4 demo``."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jax_nvfp4 as nf
  from jax_nvfp4 import _ffi
  from jax_nvfp4.ops import dense

  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {dev.platform}: {dev.device_kind}")
  if dev.platform == "gpu" and _ffi.cuda_kernels_built():
    print(f"backend: CUDA NVFP4 kernel for <= {dense.KERNEL_MAX_M} tokens, "
          "dequantize + XLA GEMM above (the GPU has no FP4 tensor cores to use)")
  else:
    why = "no GPU" if _ffi.cuda_kernels_built() else _ffi.why_no_kernels()
    print(f"backend: pure-JAX reference ({why})")
  n, k, m = args.n, args.k, args.m
  key_w, key_x = jax.random.split(jax.random.key(args.seed))
  w = (jax.random.normal(key_w, (n, k), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
  x = jax.random.normal(key_x, (m, k), jnp.bfloat16)
  q = nf.quantize(w)
  bf16_bytes = n * k * 2
  print(f"layer [N={n}, K={k}], tokens M={m}")
  print(f"weight bytes: bf16 {bf16_bytes / 2**20:.2f} MiB -> NVFP4 {q.nbytes / 2**20:.2f} MiB "
        f"({bf16_bytes / q.nbytes:.2f}x smaller)")
  y = jax.jit(nf.nvfp4_matmul)(x, nf.prepare(q))
  y_bf16 = jax.jit(lambda a, b: a @ b.T)(x, w)
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
  deq = np.asarray(x, np.float64) @ np.asarray(nf.dequantize(q, jnp.float32), np.float64).T
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
  print(f"rel-L2 error vs the bf16 layer (quantization error): {rel(y, exact):.3e}")
  print(f"rel-L2 error vs the dequantized weight (kernel error): {rel(y, deq):.3e}")
  print(f"rel-L2 error of the bf16 layer itself:                {rel(y_bf16, exact):.3e}")
  if dev.platform == "gpu":
    f_q = jax.jit(nf.nvfp4_matmul)
    f_b = jax.jit(lambda a, b: a @ b.T)
    for name, f, a in (("nvfp4", f_q, nf.prepare(q)), ("bf16", f_b, w)):
      f(x, a).block_until_ready()
      t0 = time.perf_counter()
      for _ in range(50):
        out = f(x, a)
      out.block_until_ready()
      print(f"time per forward ({name}): {(time.perf_counter() - t0) / 50 * 1e6:.1f} us")
  return 0


def _inspect(args) -> int:
  from jax_nvfp4.checkpoint import inspect
  return inspect.main(args.path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jax_nvfp4", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser("demo", help="quantize a random layer, run it, report error and memory")
  demo.add_argument("--n", type=int, default=2048, help="output features")
  demo.add_argument("--k", type=int, default=1024, help="input features (multiple of 16)")
  demo.add_argument("--m", type=int, default=16, help="tokens")
  demo.add_argument("--seed", type=int, default=0)
  inspect = sub.add_parser("inspect", help="list a checkpoint's modules: format, shapes, backend")
  inspect.add_argument("path", help="checkpoint directory (ModelOpt or compressed-tensors)")
  args = parser.parse_args(argv)
  if args.command == "demo":
    return _demo(args)
  if args.command == "inspect":
    return _inspect(args)
  return 2


if __name__ == "__main__":
  sys.exit(main())

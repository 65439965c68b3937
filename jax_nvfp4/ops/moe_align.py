"""The MoE token alignment as one primitive, ``moe_align_p``: a single CUDA launch on GPUs, the
pure-JAX ``align_reference`` (about nine XLA kernels) everywhere else.

Reading order: contract -> checks and abstract eval -> reference lowering -> CUDA lowering ->
batching -> wrapper. ``jax_nvfp4.align_tokens`` is the public entry point.

Contract::

  moe_align_p.bind(topk_ids, expert_map, num_experts=int, block_m=int, backend=str)

  topk_ids    int32 [M, top_k]
  expert_map  int32 [num_experts], or int32 [0] for none
  -> sorted_ids   int32 [P]              P = moe.align.capacity(M * top_k, num_experts, block_m)
     block_expert int32 [P // block_m]
     num_padded   int32 [1]

with exactly the values of ``jax_nvfp4.moe.align.align_reference`` (the module docstring of
``jax_nvfp4.moe.align`` states them); the kernel (csrc/nvfp4_moe_align.cu) gives the same bits.

``backend``: ``"auto"`` (the kernel when lowering for cuda with it built and at most
``ALIGN_MAX_EXPERTS`` experts, the reference otherwise), ``"cuda"`` (the kernel; a
``ValueError`` where it cannot lower) or ``"reference"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_nvfp4 import _ffi
from jax_nvfp4.moe.align import BLOCK_MS, align_reference, capacity
from jax_nvfp4.ops._batching import batch_dim_first

CUDA_TARGET = "jax_nvfp4_moe_align_cuda"
LOWERINGS = ("auto", "cuda", "reference")
#: The kernel keeps a [warps, E] int32 table and two int32 [E] arrays in shared memory
#: (4 * E * (warps + 2) bytes, fewer warps where E is large): 1024 experts fit every SM80+ GPU's
#: opt-in limit with 22 warps or more; more experts go to the reference.
ALIGN_MAX_EXPERTS = 1024
#: Pairs per block of the kernel's grid and its most blocks (csrc/nvfp4_moe_align.cu
#: kAlignPairsPerBlock / kAlignMaxBlocks): more than one block needs a [G, E] int32 scratch.
ALIGN_PAIRS_PER_BLOCK = 1024
ALIGN_MAX_BLOCKS = 64


def align_grid(pairs: int) -> int:
  """Blocks the alignment kernel runs for ``pairs`` (token, k) pairs (the kernel's rule)."""
  return min(max(-(-pairs // ALIGN_PAIRS_PER_BLOCK), 1), ALIGN_MAX_BLOCKS)


def _fail(msg: str, exc=ValueError):
  raise exc(f"moe_align: {msg}")


def _check(topk_ids, expert_map, *, num_experts, block_m, backend):
  if backend not in LOWERINGS:
    _fail(f"backend must be one of {LOWERINGS}, got {backend!r}")
  if not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
    _fail(f"num_experts must be an int >= 1, got {num_experts!r}")
  if block_m not in BLOCK_MS:
    _fail(f"block_m must be one of {BLOCK_MS}, got {block_m!r}")
  if np.dtype(topk_ids.dtype) != np.int32 or len(topk_ids.shape) != 2:
    _fail(f"topk_ids must be int32 [M, top_k], got {topk_ids.dtype} {tuple(topk_ids.shape)}",
          TypeError)
  if np.dtype(expert_map.dtype) != np.int32 or tuple(expert_map.shape) not in (
      (num_experts,), (0,)):
    _fail(f"expert_map must be int32 [{num_experts}] or [0], got {expert_map.dtype} "
          f"{tuple(expert_map.shape)}", TypeError)


moe_align_p = Primitive("nvfp4_moe_align")
moe_align_p.multiple_results = True


def _abstract_eval(topk_ids, expert_map, *, num_experts, block_m, backend):
  _check(topk_ids, expert_map, num_experts=num_experts, block_m=block_m, backend=backend)
  p = capacity(topk_ids.shape[0] * topk_ids.shape[1], num_experts, block_m)
  return (jax.core.ShapedArray((p,), jnp.int32),
          jax.core.ShapedArray((p // block_m,), jnp.int32),
          jax.core.ShapedArray((1,), jnp.int32))


moe_align_p.def_abstract_eval(_abstract_eval)
moe_align_p.def_impl(lambda *args, **params: jax.jit(
    lambda *a: moe_align_p.bind(*a, **params))(*args))


def _reference(topk_ids, expert_map, *, num_experts, block_m, backend):
  del backend
  return align_reference(topk_ids, expert_map if expert_map.shape[0] else None,
                         num_experts=num_experts, block_m=block_m)


_reference_rule = mlir.lower_fun(_reference, multiple_results=True)


def _default_lowering(ctx, *args, backend, **params):
  if backend == "cuda":
    raise ValueError(f"moe_align: backend='cuda' runs the CUDA kernel, which cannot lower for "
                     f"platform(s) {tuple(ctx.module_context.platforms)}")
  return _reference_rule(ctx, *args, backend=backend, **params)


def _cuda_lowering(ctx, topk_ids, expert_map, *, num_experts, block_m, backend):
  built = CUDA_TARGET in _ffi.REGISTERED
  fits = num_experts <= ALIGN_MAX_EXPERTS
  if backend == "reference" or (backend == "auto" and not (built and fits)):
    return _reference_rule(ctx, topk_ids, expert_map, num_experts=num_experts, block_m=block_m,
                           backend=backend)
  if not built:
    raise ValueError(f"moe_align: backend='cuda' but {CUDA_TARGET} is not in this build ("
                     + (_ffi.why_no_kernels() or "target not registered") + ")")
  if not fits:
    raise ValueError(f"moe_align: backend='cuda' handles at most {ALIGN_MAX_EXPERTS} experts, "
                     f"got {num_experts}; use backend='auto' or 'reference'")
  pairs = int(np.prod(ctx.avals_in[0].shape))
  grid = align_grid(pairs)
  scratch = jax.core.ShapedArray((grid * num_experts if grid > 1 else 1,), jnp.int32)
  results = jax.ffi.ffi_lowering(CUDA_TARGET)(
      ctx.replace(avals_out=[*ctx.avals_out, scratch]), topk_ids, expert_map,
      num_experts=np.int64(num_experts), block_m=np.int64(block_m))
  return results[:3]


mlir.register_lowering(moe_align_p, _default_lowering)
mlir.register_lowering(moe_align_p, _cuda_lowering, platform="cuda")


def _batch(args, dims, **params):
  """One alignment per batch element (lax.map): the capacity is per element."""
  _, (ids, emap) = batch_dim_first(args, dims)
  return jax.lax.map(lambda a: moe_align_p.bind(*a, **params), (ids, emap)), (0, 0, 0)


batching.primitive_batchers[moe_align_p] = _batch


def moe_align(topk_ids: jax.Array, num_experts: int, block_m: int,
              expert_map: jax.Array | None = None, *, backend: str | None = "auto"):
  """``(sorted_ids, block_expert, num_padded)`` through ``moe_align_p`` for int32
  ``topk_ids [M, top_k]`` and an optional int32 ``expert_map [num_experts]`` (module
  docstring). ``jax_nvfp4.align_tokens`` checks its arguments and wraps the result."""
  backend = "auto" if backend is None else backend
  if backend not in LOWERINGS:
    raise ValueError(f"moe_align: backend must be None or one of {LOWERINGS}, got {backend!r}")
  emap = jnp.zeros((0,), jnp.int32) if expert_map is None else expert_map
  return tuple(moe_align_p.bind(topk_ids, emap, num_experts=int(num_experts),
                                block_m=int(block_m), backend=backend))

"""Token alignment for the grouped GEMM: group the (token, k) pairs by expert in blocks of block_m.

For ``topk_ids [M, top_k]`` the pairs are flattened (pair ``p = token * top_k + j``) and
stable-sorted by expert id (ties keep ``p`` ascending). Each expert's run is padded with the
sentinel ``M * top_k`` to a multiple of ``block_m``; the runs are laid out expert 0, 1, ...
(empty experts take no space). Every block of ``block_m`` slots belongs to one expert.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_MS = (8, 16, 32, 64)


def choose_block_m(num_tokens: int, top_k: int, num_experts: int) -> int:
  """The smallest block_m in ``BLOCK_MS`` (8, 16, 32, 64) that holds the average rows per expert
  (``num_tokens * top_k / num_experts``), capped at 64: small batches waste little padding,
  large ones get the biggest tile. Returns a Python int; raises ValueError for
  ``num_experts < 1``."""
  if num_experts < 1:
    raise ValueError(f"choose_block_m: num_experts must be >= 1, got {num_experts}")
  avg = num_tokens * top_k / num_experts
  for b in BLOCK_MS:
    if b >= avg:
      return b
  return BLOCK_MS[-1]


def capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
  """Static length P of ``sorted_ids``: an upper bound of the padded length.

  At most ``min(E, num_pairs)`` experts are non-empty and each wastes at most ``block_m - 1``
  slots, so ``P = round_up(num_pairs + min(E, num_pairs) * (block_m - 1), block_m)`` (never more
  than the classic ``num_pairs + E * (block_m - 1)`` bound, and far less at decode).
  """
  bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
  return -(-bound // block_m) * block_m


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Alignment:
  """The grouped GEMM's schedule (operands of ``nvfp4_moe_gemm``).

  Attributes:
    sorted_ids: int32 ``[P]``: pair indices ``p = token * top_k + j`` grouped by expert; padding
      and unused tail slots hold the sentinel ``M * top_k``.
    block_expert: int32 ``[P // block_m]``: the (local) expert of each block; -1 for blocks of
      experts that are not local under ``expert_map`` and for blocks past ``num_padded``.
    num_padded: int32 ``[1]``: slots in use (a multiple of block_m; blocks at or past it are
      unused).
    block_m, num_pairs: static.
  """

  sorted_ids: jax.Array
  block_expert: jax.Array
  num_padded: jax.Array
  block_m: int = dataclasses.field(metadata=dict(static=True))
  num_pairs: int = dataclasses.field(metadata=dict(static=True))


def align_tokens(topk_ids: jax.Array, num_experts: int, block_m: int,
                 expert_map: jax.Array | None = None, *, backend: str | None = "auto"
                 ) -> Alignment:
  """Sorts and pads the (token, k) pairs of ``topk_ids`` by expert (see the module docstring).

  Args:
    topk_ids: integer ``[M, top_k]`` expert ids in ``[0, num_experts)``. Ids outside that range
      are dropped: the pair appears in no block, so it contributes nothing.
    num_experts: E, the number of (global) experts ids refer to; with ``expert_map`` it must be
      ``len(expert_map)``.
    block_m: one of 8, 16, 32, 64.
    expert_map: optional int ``[E]``: global id -> local expert id, or -1 where the expert lives
      on another device. Blocks of such experts keep their place but get block expert -1, so
      their rows are never computed (they stay zero; an expert-parallel combine sums devices).
      Its values become block experts as they are: each must be -1 or below the local weights'
      expert count, which ``nvfp4_moe_gemm``'s kernel does not check (a traced map is not
      checked here either; ``fused_moe`` maps values outside ``[0, E_local)`` to -1).
      Without a map, ``num_experts`` must not exceed the weights' expert count likewise.
    backend: None/``"auto"`` (one CUDA kernel when lowering for a GPU with the kernels built,
      ``align_reference`` elsewhere), ``"cuda"`` (the kernel; a ``ValueError`` where it cannot
      lower) or ``"reference"``. Every backend gives the same bits.

  Returns:
    An ``Alignment`` with ``P = capacity(M * top_k, E, block_m)``. Invariants: every in-range
    pair appears exactly once in ``sorted_ids[:num_padded]``; each expert's pairs are contiguous,
    ascending, and start a block; every other slot holds the sentinel ``M * top_k``.
  """
  from jax_nvfp4.ops import moe_align  # pylint: disable=import-outside-toplevel (import cycle)

  topk_ids = jnp.asarray(topk_ids)
  if topk_ids.ndim != 2:
    raise ValueError(f"align_tokens: topk_ids must be [M, top_k], got shape {topk_ids.shape}")
  if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
    raise TypeError(f"align_tokens: topk_ids must be integer, got {topk_ids.dtype}")
  if num_experts < 1:
    raise ValueError(f"align_tokens: num_experts must be >= 1, got {num_experts}")
  expert_map = check_schedule_args(block_m, expert_map, num_experts, "align_tokens")
  m, top_k = topk_ids.shape
  sorted_ids, block_expert, num_padded = moe_align.moe_align(
      topk_ids.astype(jnp.int32), num_experts, block_m,
      None if expert_map is None else expert_map.astype(jnp.int32), backend=backend)
  return Alignment(sorted_ids, block_expert, num_padded, block_m=block_m, num_pairs=m * top_k)


def check_schedule_args(block_m, expert_map, num_experts: int, caller: str):
  """Raises ValueError unless ``block_m`` is in ``BLOCK_MS`` and ``expert_map`` is None or an
  integer ``[num_experts]`` array; returns ``expert_map`` as an array (or None)."""
  if block_m not in BLOCK_MS:
    raise ValueError(f"{caller}: block_m must be one of {BLOCK_MS}, got {block_m!r}")
  if expert_map is None:
    return None
  expert_map = jnp.asarray(expert_map)
  if expert_map.shape != (num_experts,) or not jnp.issubdtype(expert_map.dtype, jnp.integer):
    raise ValueError(f"{caller}: expert_map must be integer ({num_experts},), got "
                     f"{expert_map.dtype} {expert_map.shape}")
  return expert_map


def align_reference(topk_ids: jax.Array, expert_map: jax.Array | None, *, num_experts: int,
                    block_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The definition of the alignment in plain JAX (argsort, scatters, cumsum, searchsorted):
  ``(sorted_ids, block_expert, num_padded)`` of ``align_tokens`` for int32 ``topk_ids [M, k]``
  and an int32 ``expert_map [E]`` or None; no checks. The CPU path and the reference the
  CUDA kernel (csrc/nvfp4_moe_align.cu) is tested against, bit for bit."""
  m, top_k = topk_ids.shape
  t = m * top_k
  e = num_experts
  p = capacity(t, e, block_m)
  nb = p // block_m
  sentinel = jnp.int32(t)

  flat = topk_ids.reshape(t).astype(jnp.int32)
  valid = (flat >= 0) & (flat < e)
  key = jnp.where(valid, flat, e)                       # out-of-range ids sort last
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  sorted_key = key[order]
  counts = jnp.zeros((e + 1,), jnp.int32).at[key].add(1)[:e]
  padded = (counts + block_m - 1) // block_m * block_m
  starts = jnp.cumsum(counts) - counts                  # first rank of each expert among pairs
  offsets = jnp.cumsum(padded) - padded                 # first slot of each expert
  num_padded = jnp.sum(padded)

  e_idx = jnp.minimum(sorted_key, e - 1)
  rank = jnp.arange(t, dtype=jnp.int32) - starts[e_idx]
  dest = jnp.where(sorted_key < e, offsets[e_idx] + rank, p)  # p: dropped by the scatter
  sorted_ids = jnp.full((p,), sentinel, jnp.int32).at[dest].set(order, mode="drop")

  # Block b belongs to the expert whose padded run contains slot b * block_m.
  block_start = jnp.arange(nb, dtype=jnp.int32) * block_m
  ends = jnp.cumsum(padded)
  block_expert = jnp.searchsorted(ends, block_start, side="right",
                                  method="compare_all").astype(jnp.int32)
  in_use = block_start < num_padded
  block_expert = jnp.minimum(block_expert, e - 1)
  if expert_map is not None:
    block_expert = expert_map.astype(jnp.int32)[block_expert]
  block_expert = jnp.where(in_use, block_expert, -1)
  return sorted_ids, block_expert, num_padded.reshape(1).astype(jnp.int32)

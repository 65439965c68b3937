"""Routing and token alignment in one step: ``route`` then ``align_tokens``, as one CUDA launch
for decode-sized batches (see ``jax_nvfp4.ops.moe_route``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_nvfp4.moe.align import Alignment, check_schedule_args, choose_block_m
from jax_nvfp4.moe.routing import RoutingConfig


def route_and_align(router_logits: jax.Array, config: RoutingConfig, block_m: int | None = None,
                    expert_map: jax.Array | None = None, *, backend: str | None = "auto"
                    ) -> tuple[jax.Array, jax.Array, Alignment]:
  """``route(router_logits, config)`` and ``align_tokens`` of its ids, fused where it pays.

  Args:
    router_logits: float ``[..., E]`` (float32, bfloat16 or float16 are read as they are; other
      float dtypes are cast to float32). The leading dims are flattened into M tokens for the
      alignment (pair ``p = token * top_k + j`` in that order).
    config: a ``RoutingConfig`` (its ``correction_bias``, if any, is cast to float32).
    block_m: rows per expert block of the alignment (8, 16, 32 or 64); default
      ``choose_block_m(M, top_k, E)``.
    expert_map: optional integer ``[E]``: global id -> local expert id or -1 (``align_tokens``).
    backend: None/``"auto"``: on a GPU with the kernels built, one CUDA launch when a single
      block holds the batch (at most 1024 (token, k) pairs, E <= 1024, top_k and n_group at most
      32), else XLA routing and the alignment kernel; the pure-JAX reference elsewhere.
      ``"cuda"``: CUDA kernels only (a ``ValueError`` where they cannot lower).
      ``"reference"``: ``route`` and the pure-JAX alignment.

  Returns:
    ``(topk_weights, topk_ids, alignment)``: float32 ``[..., top_k]``, int32 ``[..., top_k]``
    and an ``Alignment`` of the ``M * top_k`` pairs, as ``route`` and ``align_tokens`` define
    them. The kernel's ids equal ``route``'s except where the selection scores of two experts
    lie within float32 rounding of each other (on exact ties both take the lower index); its weights agree to float32
    rounding; its alignment is exactly ``align_tokens`` of its ids.
  """
  from jax_nvfp4.ops import moe_route  # pylint: disable=import-outside-toplevel (import cycle)

  if not isinstance(config, RoutingConfig):
    raise TypeError(f"route_and_align: config must be a RoutingConfig, got "
                    f"{type(config).__name__}")
  logits = jnp.asarray(router_logits)
  if logits.ndim < 1:
    raise ValueError("route_and_align: router_logits must be [..., E], got a scalar")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"route_and_align: router_logits must be floating, got {logits.dtype}")
  lead, num_experts = logits.shape[:-1], logits.shape[-1]
  config.validate(num_experts)
  m = int(np.prod(lead))
  if block_m is None:
    block_m = choose_block_m(m, config.top_k, num_experts)
  expert_map = check_schedule_args(block_m, expert_map, num_experts, "route_and_align")
  backend = "auto" if backend is None else backend
  weights, ids, sorted_ids, block_expert, num_padded = moe_route.moe_route_align(
      logits.reshape(m, num_experts), config, block_m, expert_map, backend=backend)
  alignment = Alignment(sorted_ids, block_expert, num_padded, block_m=block_m,
                        num_pairs=m * config.top_k)
  return (weights.reshape(*lead, config.top_k), ids.reshape(*lead, config.top_k), alignment)

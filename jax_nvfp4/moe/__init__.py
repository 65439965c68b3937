"""MoE building blocks: routing, token alignment, activations (pure JAX), and
``route_and_align``, which runs the first two as one CUDA launch at decode (``ops.moe_route``).

The layer itself (``fused_moe``) and the grouped-GEMM primitive live in ``jax_nvfp4.ops.moe``
(exported as ``jax_nvfp4.fused_moe``); this package does not import them, so that
``jax_nvfp4.ops.moe`` can import from here without a cycle.
"""

from jax_nvfp4.moe.activations import (ACTIVATIONS, apply_activation, deinterleave_gate_up,
                                       gptoss_glu, is_gated, relu2, swiglu)
from jax_nvfp4.moe.align import BLOCK_MS, Alignment, align_tokens, capacity, choose_block_m
from jax_nvfp4.moe.route_align import route_and_align
from jax_nvfp4.moe.routing import RoutingConfig, route

__all__ = [
    "ACTIVATIONS", "Alignment", "BLOCK_MS", "RoutingConfig", "align_tokens", "apply_activation",
    "capacity", "choose_block_m", "deinterleave_gate_up", "gptoss_glu", "is_gated", "relu2",
    "route", "route_and_align", "swiglu",
]

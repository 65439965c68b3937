"""jax_nvfp4: NVFP4 weight-only (W4A16) inference for JAX on NVIDIA GPUs without FP4 tensor cores."""

from jax_nvfp4 import _ffi  # registers the FFI targets
from jax_nvfp4.format import (BLOCK_SIZE, E2M1_VALUES, NVFP4Weight, dequantize, pack_fp4,
                              quantize, round_to_e2m1, unpack_fp4)
from jax_nvfp4.ops.dense import nvfp4_matmul
from jax_nvfp4.ops.dequantize import dequantize_blocks
from jax_nvfp4.prepare import PreparedNVFP4Weight, prepare, unprepare
from jax_nvfp4.reference import reference_matmul
from jax_nvfp4.moe import (Alignment, RoutingConfig, align_tokens, apply_activation,
                           choose_block_m, deinterleave_gate_up, route, route_and_align)
from jax_nvfp4.ops.moe import fused_moe, nvfp4_moe_gemm
from jax_nvfp4.backend import BackendChoice, export_disabled_checks, select_backend
# The Flax layers: jax_nvfp4.nn (needs flax).

__version__ = "0.1.0"

__all__ = [
    "BLOCK_SIZE", "E2M1_VALUES", "NVFP4Weight", "PreparedNVFP4Weight", "prepare", "unprepare", "dequantize", "dequantize_blocks", "nvfp4_matmul", "pack_fp4",
    "quantize", "reference_matmul", "round_to_e2m1", "unpack_fp4",
    "Alignment", "RoutingConfig", "align_tokens", "apply_activation", "choose_block_m",
    "deinterleave_gate_up", "fused_moe", "nvfp4_moe_gemm", "route", "route_and_align",
    "BackendChoice", "export_disabled_checks", "select_backend",
]

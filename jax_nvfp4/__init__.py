"""jax_nvfp4: NVFP4 weight-only (W4A16) inference for JAX on NVIDIA GPUs without FP4 tensor cores."""

from jax_nvfp4 import _ffi  # registers the FFI targets
from jax_nvfp4.format import (BLOCK_SIZE, E2M1_VALUES, NVFP4Weight, dequantize, pack_fp4,
                              quantize, round_to_e2m1, unpack_fp4)
from jax_nvfp4.ops.dense import nvfp4_matmul
from jax_nvfp4.prepare import PreparedNVFP4Weight, prepare, unprepare
from jax_nvfp4.reference import reference_matmul

__version__ = "0.1.0"

__all__ = [
    "BLOCK_SIZE", "E2M1_VALUES", "NVFP4Weight", "PreparedNVFP4Weight", "prepare", "unprepare", "dequantize", "nvfp4_matmul", "pack_fp4",
    "quantize", "reference_matmul", "round_to_e2m1", "unpack_fp4",
]

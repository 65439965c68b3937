"""Loading and saving NVFP4 checkpoints: NVIDIA ModelOpt (``NVFP4``, ``W4A16_NVFP4``, ``FP8``,
``MIXED_PRECISION``) and compressed-tensors ``nvfp4-pack-quantized`` (llm-compressor), dense and
MoE, from Hugging Face directories of ``.safetensors`` files.

* ``load_checkpoint(path)`` -> ``Checkpoint`` (``modules``: ``ModuleRecord`` with an
  ``NVFP4Weight`` or ``FP8Weight``; ``moe``: stacked ``MoEExperts``; ``params``: plain arrays).
* ``export_modelopt(path, ...)`` writes jax_nvfp4 weights as a ModelOpt ``W4A16_NVFP4``
  checkpoint.
* ``inspect_checkpoint(path)`` lists each module's format, shapes and backend (headers only);
  also ``python -m jax_nvfp4 inspect DIR``.
* ``FP8Weight`` / ``fp8_matmul``: FP8 layers (XLA upcast, no kernel).
"""

from jax_nvfp4.checkpoint.export import export_modelopt
from jax_nvfp4.checkpoint.fp8 import FP8Weight, dequantize_fp8, fp8_matmul
from jax_nvfp4.checkpoint.hf import CheckpointError
from jax_nvfp4.checkpoint.inspect import inspect_checkpoint
from jax_nvfp4.checkpoint.loader import Checkpoint, ModuleRecord, MoEExperts, load_checkpoint

__all__ = [
    "Checkpoint", "CheckpointError", "FP8Weight", "ModuleRecord", "MoEExperts", "dequantize_fp8",
    "export_modelopt", "fp8_matmul", "inspect_checkpoint", "load_checkpoint",
]

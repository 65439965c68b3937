"""Flax layers with NVFP4 weights (needs flax: ``pip install jax_nvfp4[flax]``).

* ``jax_nvfp4.nn.nnx``: ``NVFP4Linear``, ``NVFP4MoE``, ``NVFP4Variable``, ``MoEBuffer`` (NNX),
  re-exported here.
* ``jax_nvfp4.nn.linen``: ``NVFP4Dense``, ``NVFP4MoE``, ``quantize_dense_variables``,
  ``moe_variables``, ``weight_variables`` (Linen).
* ``quantize_model``: swaps the ``nnx.Linear`` layers of an NNX model for ``NVFP4Linear``.
"""

from jax_nvfp4.nn.nnx import MoEBuffer, NVFP4Linear, NVFP4MoE, NVFP4Variable
from jax_nvfp4.nn.quantize_model import (DEFAULT_EXCLUDE, LayerReport, QuantizeReport,
                                         quantize_model)

__all__ = ["DEFAULT_EXCLUDE", "LayerReport", "MoEBuffer", "NVFP4Linear", "NVFP4MoE",
           "NVFP4Variable", "QuantizeReport", "quantize_model"]

"""What a producer's parser hands to the loader: which tensors make which quantized module.

A ``Plan`` is built from the JSON configs and the safetensors headers only (no tensor data), so
everything wrong with a checkpoint is found before any weight is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax_nvfp4.checkpoint.hf import CheckpointError, TensorInfo

#: Roles of an NVFP4 module's tensors (the parser maps checkpoint suffixes onto them).
NVFP4_ROLES = ("packed", "scales", "global_scale")
#: Roles of an FP8 module's tensors.
FP8_ROLES = ("weight", "scale")
#: Optional roles of either: the activation scale (recorded, unused) and a bias.
OPTIONAL_ROLES = ("input_scale", "bias")

#: Name suffixes that only quantization formats use (ModelOpt, compressed-tensors, others).
#: A tensor with one of these that belongs to no quantized module is an error, never a param.
QUANT_SUFFIXES = frozenset({
    "weight_scale", "weight_scale_2", "input_scale", "weight_packed", "weight_global_scale",
    "input_global_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "pre_quant_scale",
    "output_scale", "input_zero_point", "qweight", "qzeros", "scales", "g_idx",
})
KV_SUFFIXES = frozenset({"k_scale", "v_scale"})


@dataclasses.dataclass
class QuantSpec:
  """One quantized Linear as the checkpoint stores it.

  Attributes:
    module: module path, e.g. ``model.layers.0.mlp.down_proj``.
    format: ``"nvfp4"`` or ``"fp8"``.
    tensors: role -> ``TensorInfo`` (roles: ``NVFP4_ROLES`` or ``FP8_ROLES``, plus optional
      ``OPTIONAL_ROLES``).
    divide: True when the global scale divides (compressed-tensors ``weight_global_scale``),
      False when it multiplies (ModelOpt ``weight_scale_2``).
    quant_algo: the producer's name for the scheme (``"NVFP4"``, ``"W4A16_NVFP4"``, ``"FP8"``,
      ``"nvfp4-pack-quantized"``).
    activation_format: ``"nvfp4"``/``"fp8"`` when the checkpoint quantizes this module's input
      (W4A4/W8A8: its ``input_scale`` is recorded, never used), None for weight-only.
    main_suffix: the checkpoint suffix of the module's main tensor (``"weight"`` for ModelOpt,
      ``"weight_packed"`` for compressed-tensors), to name a missing module in messages.
  """

  module: str
  format: str
  tensors: dict[str, TensorInfo]
  divide: bool
  quant_algo: str
  activation_format: str | None
  main_suffix: str

  def tensor_name(self, role: str) -> str:
    return self.tensors[role].name

  @property
  def main(self) -> TensorInfo:
    """The weight tensor proper (packed FP4 codes or FP8 values)."""
    return self.tensors["packed" if self.format == "nvfp4" else "weight"]

  @property
  def logical_shape(self) -> tuple[int, int]:
    """``(N, K)`` of the weight."""
    n, cols = self.main.shape
    return n, cols * (2 if self.format == "nvfp4" else 1)


@dataclasses.dataclass
class Plan:
  """A producer parser's reading of a checkpoint.

  Attributes:
    producer: ``"modelopt"`` or ``"compressed-tensors"``.
    quant_algo: the checkpoint-wide scheme name.
    specs: module -> ``QuantSpec`` for every quantized Linear.
    plain: names of every other tensor (embeddings, norms, routers, unquantized Linears).
    quant_config: the producer's quantization config (as read).
  """

  producer: str
  quant_algo: str
  specs: dict[str, QuantSpec]
  plain: list[str]
  quant_config: dict[str, Any]


def require_scalar(info: TensorInfo, what: str) -> None:
  """A float32 scalar stored as ``[]`` or ``[1]``."""
  if info.dtype != "F32" or info.shape not in ((), (1,)):
    raise CheckpointError(f"tensor {info.name!r} ({what}) must be F32 [] or [1], got "
                          f"{info.describe()}")


def split_name(name: str) -> tuple[str, str]:
  """``"a.b.weight_scale"`` -> ``("a.b", "weight_scale")``; no dot -> ``("", name)``."""
  module, _, suffix = name.rpartition(".")
  return module, suffix

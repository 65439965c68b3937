"""``python -m jax_nvfp4 inspect DIR``: what a checkpoint holds and how jax_nvfp4 would run it.

Reads the configs and safetensors headers only (no weights), runs every check the loader runs
before reading data, and lists each quantized module (MoE experts as their stacks) with its
format, logical shape ``[..., N, K]``, activation format and the backend that would run it, then
the unquantized 2-D weights (embeddings, routers, ``lm_head``) and a count of other tensors.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from jax_nvfp4.checkpoint.hf import CheckpointError
from jax_nvfp4.checkpoint.loader import group_experts, model_dims, read_plan
from jax_nvfp4.checkpoint.plan import split_name


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the listing."""

  module: str
  format: str  # "nvfp4", "fp8" or the plain tensor's dtype ("bf16"...)
  shape: tuple[int, ...]
  activation: str | None
  backend: str
  note: str = ""


def backend_for(weight_format: str, activation_format: str | None, moe: bool) -> str:
  """The backend jax_nvfp4 would use (the one call site of the backend oracle)."""
  try:
    from jax_nvfp4.backend import select_backend
  except ImportError:  # the oracle is missing: the same rule, coarsely
    import jax

    from jax_nvfp4 import _ffi
    if weight_format != "nvfp4":
      return "plain JAX"
    gpu = any(d.platform == "gpu" for d in jax.devices())
    return "cuda" if _ffi.cuda_kernels_built() and gpu else "reference"
  try:
    return select_backend(weight_format=weight_format, activation_format=activation_format,
                          moe_activation="swiglu" if moe else None).name
  except ValueError:
    return "fp8_matmul (XLA upcast)" if weight_format == "fp8" else "plain JAX"


_PLAIN_FORMATS = {"BF16": "bf16", "F16": "fp16", "F32": "float32"}


def _fmt_shape(shape) -> str:
  return "[" + ", ".join(str(d) for d in shape) + "]"


def inspect_checkpoint(path) -> tuple[dict, list[Row], dict]:
  """Returns ``(summary, rows, plain_counts)`` for a checkpoint directory (headers only)."""
  path = os.fspath(path)
  files, config, plan = read_plan(path)
  dims = model_dims(config)
  groups = group_experts(plan, dims)
  in_experts = {s.module for ex in groups.values() for e in ex.values() for s in e.values()}
  rows = []
  for module, spec in sorted(plan.specs.items()):
    if module in in_experts:
      continue
    rows.append(Row(module, spec.format, spec.logical_shape, spec.activation_format,
                    backend_for(spec.format, spec.activation_format, False)))
  for prefix, experts in sorted(groups.items()):
    num = len(experts)
    e0 = experts[0]
    fmt, act = e0["down"].format, e0["down"].activation_format
    inter, hidden = e0["gate"].logical_shape
    backend = backend_for(fmt, act, True)
    rows.append(Row(prefix + ".w13", fmt, (num, 2 * inter, hidden), act, backend,
                    f"{num} experts, rows [gate; up]"))
    rows.append(Row(prefix + ".w2", fmt, (num, *e0["down"].logical_shape), act, backend,
                    f"{num} experts"))
  plain_counts: dict[str, int] = {}
  for name in sorted(plan.plain):
    info = files.tensors[name]
    module, suffix = split_name(name)
    if suffix == "weight" and len(info.shape) == 2:
      fmt = _PLAIN_FORMATS.get(info.dtype, info.dtype.lower())
      backend = backend_for(fmt, None, False) if fmt in _PLAIN_FORMATS.values() else "plain JAX"
      rows.append(Row(module, fmt, info.shape, None, backend, "unquantized"))
    else:
      plain_counts[info.dtype] = plain_counts.get(info.dtype, 0) + 1
  summary = dict(path=path, producer=plan.producer, quant_algo=plan.quant_algo,
                 files=len(files.files), tensors=len(files.tensors),
                 total_bytes=files.total_bytes, model_type=dims["model_type"])
  return summary, rows, plain_counts


def format_report(summary: dict, rows: list[Row], plain_counts: dict) -> str:
  lines = [f"{summary['path']}: {summary['producer']} {summary['quant_algo']}"
           f" ({summary['model_type'] or 'unknown model type'}), {summary['tensors']} tensors in "
           f"{summary['files']} file(s), {summary['total_bytes'] / 2**20:.2f} MiB"]
  table = [("module", "format", "shape", "activations", "backend", "note")]
  for r in rows:
    act = {None: "bf16/fp16", "nvfp4": "nvfp4 scales (dropped: W4A16)",
           "fp8": "fp8 scales (dropped)"}.get(r.activation, r.activation)
    if r.format not in ("nvfp4", "fp8"):
      act = "-"
    table.append((r.module, r.format, _fmt_shape(r.shape), act, r.backend, r.note))
  widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
  for row in table:
    lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
  if plain_counts:
    lines.append("other tensors: " + ", ".join(f"{n} {d}" for d, n in sorted(plain_counts.items())))
  return "\n".join(lines)


def main(path) -> int:
  """Prints the report; returns 0, or 1 with the error on stderr for a bad checkpoint."""
  try:
    print(format_report(*inspect_checkpoint(path)))
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0

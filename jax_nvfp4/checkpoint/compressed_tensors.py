"""compressed-tensors ``nvfp4-pack-quantized`` checkpoints (llm-compressor's NVFP4 / NVFP4A16).

Config: ``config.json["quantization_config"]`` with ``quant_method: "compressed-tensors"``,
``format``, ``config_groups: {name: {targets, weights, input_activations, format?}}`` and
``ignore`` (module names, or ``re:`` regexes matched from the start of the name).
``weights`` must be ``{num_bits: 4, type: float, strategy: tensor_group, group_size: 16}``;
``input_activations`` is null for NVFP4A16 (weight-only) and FP4 for NVFP4 (W4A4).

Tensors per quantized Linear ``<m>``: ``<m>.weight_packed`` U8 ``[N, K/2]``, ``<m>.weight_scale``
F8_E4M3 ``[N, K/16]``, ``<m>.weight_global_scale`` F32 ``[1]``, and for W4A4
``<m>.input_global_scale`` F32 ``[1]``.

Dequantization, as the tool's decompressor computes it: ``W = bf16(e2m1 * (float32(scale) /
weight_global_scale))``, a *division* in float32. ``weight_global_scale`` (= 448 * 6 / amax,
computed in bf16) has no exact float32 reciprocal, so ``NVFP4Weight``'s multiplying
``global_scale`` is chosen by ``reciprocal_global_scale``: among the float32 values nearest
``1 / weight_global_scale`` it takes one whose products with every block scale of the tensor
reproduce the tool's quotients bit for bit in the model dtype (see that function), and the loader
records whether it found one (``ModuleRecord.exact``) together with the divisor itself.
"""

from __future__ import annotations

import re
from typing import Any

import ml_dtypes
import numpy as np

from jax_nvfp4.checkpoint.hf import CheckpointError, CheckpointFiles
from jax_nvfp4.checkpoint.plan import KV_SUFFIXES, QUANT_SUFFIXES, Plan, QuantSpec, split_name

FORMAT = "nvfp4-pack-quantized"
_SUFFIX_ROLE = {"weight_packed": "packed", "weight_scale": "scales",
                "weight_global_scale": "global_scale", "input_global_scale": "input_scale",
                "bias": "bias", "weight_shape": "weight_shape"}
_MARKERS = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")


def is_compressed_tensors(config: dict) -> bool:
  qc = config.get("quantization_config")
  return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _matches(module: str, target: str) -> bool:
  if target.startswith("re:"):
    return re.match(target[3:], module) is not None
  return module == target


def _is_class_target(target: str) -> bool:
  # "Linear", "Qwen3MoeSparseMoeBlock": class names, no dots, not a regex.
  return not target.startswith("re:") and "." not in target


def _check_group(name: str, group: dict, default_format: str | None) -> str | None:
  """Validates one config group; returns its activation format (None, "nvfp4" or "fp8")."""
  where = f"config.json quantization_config.config_groups[{name!r}]"
  fmt = group.get("format") or default_format
  if fmt != FORMAT:
    raise CheckpointError(f"{where}: unsupported compressed-tensors format {fmt!r}; jax_nvfp4 "
                          f"loads {FORMAT!r}")
  w = group.get("weights")
  if not isinstance(w, dict):
    raise CheckpointError(f"{where}: needs a 'weights' object")
  want = {"num_bits": 4, "type": "float", "group_size": 16, "strategy": "tensor_group"}
  for key, value in want.items():
    if w.get(key) != value:
      raise CheckpointError(f"{where}.weights.{key} must be {value!r} for NVFP4, got "
                            f"{w.get(key)!r}")
  if w.get("symmetric", True) is not True:
    raise CheckpointError(f"{where}.weights.symmetric must be true for NVFP4")
  act = group.get("input_activations")
  if act is None:
    return None
  if not isinstance(act, dict):
    raise CheckpointError(f"{where}.input_activations must be null or an object, got {act!r}")
  if act.get("type") == "float" and act.get("num_bits") == 4:
    return "nvfp4"
  if act.get("type") == "float" and act.get("num_bits") == 8:
    return "fp8"
  raise CheckpointError(f"{where}.input_activations: unsupported activation scheme "
                        f"{act.get('type')!r} {act.get('num_bits')!r}-bit")


def _check_no_transforms(qc: dict) -> None:
  """Online/offline rotations (llm-compressor QuIP, SpinQuant: ``transform_config``) change
  what the stored weights mean; loading them as plain NVFP4 would compute wrong outputs."""
  transforms = qc.get("transform_config")
  if not transforms:
    return
  groups = transforms.get("config_groups") if isinstance(transforms, dict) else None
  if isinstance(groups, dict) and groups:
    kinds = ", ".join(f"{name!r} ({g.get('type') if isinstance(g, dict) else g!r})"
                      for name, g in groups.items())
  else:
    kinds = repr(transforms)
  raise CheckpointError(f"config.json quantization_config.transform_config: unsupported "
                        f"transform {kinds}; jax_nvfp4 loads NVFP4 weights without rotations "
                        f"(QuIP / SpinQuant / Hadamard transforms are not applied)")


def read_quant_config(config: dict) -> dict[str, Any]:
  qc = config.get("quantization_config")
  _check_no_transforms(qc)
  groups = qc.get("config_groups")
  if not isinstance(groups, dict) or not groups:
    raise CheckpointError("config.json quantization_config: needs a non-empty config_groups "
                          "object")
  acts = {}
  for name, group in groups.items():
    if not isinstance(group, dict):
      raise CheckpointError(f"config.json quantization_config.config_groups[{name!r}] must be "
                            f"an object")
    targets = group.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
      raise CheckpointError(f"config.json quantization_config.config_groups[{name!r}].targets "
                            f"must be a list of strings")
    acts[name] = _check_group(name, group, qc.get("format"))
  ignore = qc.get("ignore") or []
  if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
    raise CheckpointError(f"config.json quantization_config.ignore must be a list of strings, "
                          f"got {ignore!r}")
  return dict(groups=groups, activation=acts, ignore=ignore,
              kv_cache_scheme=qc.get("kv_cache_scheme"), format=qc.get("format"),
              version=qc.get("version"), quant_algo=FORMAT)


def group_of(module: str, qcfg: dict) -> str:
  """The config group that quantizes ``module``: a name/regex target first, else a class one."""
  class_groups = []
  for name, group in qcfg["groups"].items():
    targets = group["targets"]
    if any(_matches(module, t) for t in targets if not _is_class_target(t)):
      return name
    if any(_is_class_target(t) for t in targets):
      class_groups.append(name)
  if len(class_groups) == 1:
    return class_groups[0]
  if not class_groups:
    raise CheckpointError(f"module {module!r} is quantized but no config group targets it")
  acts = {qcfg["activation"][g] for g in class_groups}
  if len(acts) == 1:
    return class_groups[0]  # all NVFP4 with the same activation scheme: equivalent
  raise CheckpointError(f"module {module!r}: config groups {class_groups} target it by class "
                        f"with different activation schemes; cannot tell which applies")


def plan(files: CheckpointFiles, config: dict, qcfg: dict) -> Plan:
  names = files.tensors
  by_module: dict[str, dict[str, str]] = {}
  for name in names:
    module, suffix = split_name(name)
    by_module.setdefault(module, {})[suffix] = name
  kv = qcfg["kv_cache_scheme"] is not None
  specs: dict[str, QuantSpec] = {}
  used: set[str] = set()
  for module, suffixes in sorted(by_module.items()):
    if not any(m in suffixes for m in _MARKERS):
      continue
    present = sorted(s for s in suffixes if s in _MARKERS)
    if any(_matches(module, p) for p in qcfg["ignore"]):
      raise CheckpointError(f"module {module!r} has quantization tensors ({', '.join(present)}) "
                            f"but quantization_config.ignore lists it")
    group = group_of(module, qcfg)
    act = qcfg["activation"][group]
    for suffix in ("weight_packed", "weight_scale", "weight_global_scale"):
      if suffix not in suffixes:
        raise CheckpointError(f"missing tensor {module + '.' + suffix!r} (nvfp4-pack-quantized "
                              f"module {module!r} has {', '.join(present)})")
    tensors = {}
    for suffix, name in suffixes.items():
      if suffix in _SUFFIX_ROLE:
        if suffix == "input_global_scale" and act is None:
          raise CheckpointError(f"extra tensor {name!r}: config group {group!r} is weight-only "
                                "(input_activations is null)")
        tensors[_SUFFIX_ROLE[suffix]] = names[name]
      elif kv and suffix in KV_SUFFIXES:
        continue
      else:
        raise CheckpointError(f"extra tensor {name!r}: not part of an {FORMAT} module (expected "
                              f"{', '.join(sorted(_SUFFIX_ROLE))})")
      used.add(name)
    if "weight" in suffixes:
      raise CheckpointError(f"extra tensor {suffixes['weight']!r}: module {module!r} is packed "
                            f"(weight_packed), it cannot also have a dense weight")
    specs[module] = QuantSpec(module, "nvfp4", tensors, divide=True, quant_algo=FORMAT,
                              activation_format=act, main_suffix="weight_packed")
  plain = []
  for name in names:
    if name in used:
      continue
    _, suffix = split_name(name)
    if suffix in QUANT_SUFFIXES or (suffix in KV_SUFFIXES and not kv):
      raise CheckpointError(f"extra tensor {name!r}: {suffix!r} is not a tensor of the {FORMAT} "
                            "format")
    plain.append(name)
  return Plan("compressed-tensors", FORMAT, specs, plain, qcfg)


# --------------------------------------------------------------------------- exact reciprocal

_E2M1_MAGNITUDES = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def _bits(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a, order="C")
  return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The distinct ``(a, b)`` float32 bit pairs, as two float32 arrays (sorted by a, then b)."""
  key = (_bits(a.astype(np.float32)).ravel().astype(np.uint64) << np.uint64(32)) | \
      _bits(b.astype(np.float32)).ravel().astype(np.uint64)
  key = np.unique(key)  # one 1-D sort: far cheaper than np.unique(axis=0) over row pairs
  return ((key >> np.uint64(32)).astype(np.uint32).view(np.float32),
          (key & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32))


def matches_tool(scale_values: np.ndarray, ref_factor: np.ndarray, g: np.float32,
                 dtype) -> tuple[bool, bool]:
  """Does ``e2m1 * (scale * g)`` reproduce ``e2m1 * ref_factor`` for every block?

  ``scale_values``/``ref_factor`` are float32 arrays of the same shape: each block's scale as our
  dequant reads it and the producer's float32 per-block factor. Returns ``(factor_exact,
  dtype_exact)``: the float32 factors are identical (then every dequant is identical), or at
  least every ``dtype(float32(e2m1 * factor))`` is, for all 7 nonzero E2M1 magnitudes (signs and
  zeros follow).
  """
  s, ref = _unique_pairs(scale_values, ref_factor)
  ours = s * np.float32(g)  # float32 x float32, rounded once: what dequantize computes
  if np.array_equal(_bits(ours), _bits(ref)):
    return True, True
  a = (_E2M1_MAGNITUDES[None, :] * ours[:, None]).astype(dtype)
  b = (_E2M1_MAGNITUDES[None, :] * ref[:, None]).astype(dtype)
  return False, bool(np.array_equal(_bits(a), _bits(b)))


def tool_factor(scales: np.ndarray, divisor: np.float32) -> np.ndarray:
  """compressed-tensors' per-block factor: ``float32(scale) / weight_global_scale`` in float32."""
  return scales.astype(np.float32) / np.float32(divisor)


def distinct_scales(scales: np.ndarray) -> np.ndarray:
  """The distinct values of ``scales`` as float32 (bitwise distinct). An E4M3 block scale is one
  byte, so there are at most 256: a histogram of the bytes finds them in one pass."""
  a = np.asarray(scales)
  if a.dtype == ml_dtypes.float8_e4m3fn:
    present = np.flatnonzero(np.bincount(a.view(np.uint8).ravel(), minlength=256))
    return present.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
  return np.unique(_bits(a.astype(np.float32)).ravel()).view(np.float32)


def _candidates(g0: np.float32, max_ulps: int) -> list[np.float32]:
  """``g0`` and its float32 neighbours up to ``max_ulps`` away, nearest first."""
  out, up, down = [g0], g0, g0
  for _ in range(max_ulps):
    up = np.nextafter(up, np.float32(np.inf))
    down = np.nextafter(down, np.float32(0))
    out += [up, down]
  return out


def reciprocal_global_scale(scales: np.ndarray, divisor, dtype,
                            max_ulps: int = 4) -> tuple[np.float32, bool, str]:
  """A multiplying global scale for blocks that the producer *divides* by ``divisor``.

  Tries ``float32(1 / divisor)`` and its float32 neighbours up to ``max_ulps`` away, nearest
  first, and returns the first whose per-block factors equal the tool's float32 quotients (exact
  for every output dtype), else the first that reproduces the dequantized values bit for bit in
  ``dtype``, else ``float32(1 / divisor)`` with ``exact=False``.

  Why this works for real checkpoints: ``divisor`` is a bfloat16 value (8 significant bits) and
  block scales are E4M3 (4 significant bits), so the exact quotient ``e2m1 * scale / divisor`` is
  never within a relative 2^-17 of a bfloat16 (or 2^-20 of a float16) rounding midpoint, while
  the float32 factors differ by an ulp (2^-23): the final rounding cannot tell them apart.

  Every block's factor depends on its scale value only, so the candidates are tested on the
  distinct scale values (at most 256 E4M3 values), not on every block.

  Returns ``(global_scale, exact, note)``.
  """
  d = np.float32(divisor)
  if not (np.isfinite(d) and d > 0):
    raise CheckpointError(f"weight_global_scale must be finite and > 0, got {divisor!r}")
  s = distinct_scales(scales)
  ref = tool_factor(s, d)
  g0 = np.float32(1) / d
  candidates = _candidates(g0, max_ulps)
  dtype_exact_first = None
  for g in candidates:
    factor_exact, dtype_exact = matches_tool(s, ref, g, dtype)
    if factor_exact:
      return g, True, "global_scale reproduces every scale / weight_global_scale exactly"
    if dtype_exact and dtype_exact_first is None:
      dtype_exact_first = g
  if dtype_exact_first is not None:
    return dtype_exact_first, True, (
        f"global_scale reproduces the {np.dtype(dtype).name} dequantization bit for bit (the "
        "float32 factors differ by an ulp)")
  return g0, False, (f"no float32 global_scale within {max_ulps} ulps of 1/weight_global_scale "
                     f"reproduces the {np.dtype(dtype).name} dequantization bit for bit")

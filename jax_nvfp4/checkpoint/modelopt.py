"""NVIDIA ModelOpt checkpoints (``hf_quant_config.json`` / ``quant_method: "modelopt"``).

Config: ``hf_quant_config.json`` = ``{producer: {name, version}, quantization: {quant_algo,
kv_cache_quant_algo, group_size, exclude_modules}}`` (``MIXED_PRECISION`` replaces
``exclude_modules`` by ``quantized_layers: {module: {quant_algo, group_size}}``; MoE experts are
listed as their parent module). The same fields appear in ``config.json["quantization_config"]``
with ``quant_method: "modelopt"`` (and ``ignore`` for ``exclude_modules``, ``kv_cache_scheme`` for
``kv_cache_quant_algo``: ModelOpt's ``convert_hf_quant_config_format`` renames them so, writing the
KV scheme as a string, or for FP8 as ``{num_bits: 8, type: float, ...}`` in newer versions).

Tensors per quantized Linear ``<m>``:

* NVFP4 / W4A16_NVFP4: ``<m>.weight`` U8 ``[N, K/2]``, ``<m>.weight_scale`` F8_E4M3
  ``[N, K/16]``, ``<m>.weight_scale_2`` F32 ``[]``; NVFP4 (W4A4) adds ``<m>.input_scale``
  F32 ``[]``, W4A16_NVFP4 has none. ``W = e2m1 * (float32(weight_scale) * weight_scale_2)``:
  ``weight_scale_2`` is exactly ``NVFP4Weight.global_scale``.
* FP8: ``<m>.weight`` F8_E4M3 ``[N, K]``, ``<m>.weight_scale`` F32 ``[]``, optional
  ``<m>.input_scale``. ``W = float32(weight) * weight_scale``.

Exclusion patterns are fnmatch wildcards; a pattern naming a parent module excludes its children.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

from jax_nvfp4.checkpoint.hf import CheckpointError, CheckpointFiles, load_json
from jax_nvfp4.checkpoint.plan import KV_SUFFIXES, QUANT_SUFFIXES, Plan, QuantSpec, split_name

HF_QUANT_CONFIG = "hf_quant_config.json"
SUPPORTED_ALGOS = ("NVFP4", "W4A16_NVFP4", "FP8", "MIXED_PRECISION")
LAYER_ALGOS = ("NVFP4", "W4A16_NVFP4", "FP8")
_SUFFIX_ROLE = {
    "nvfp4": {"weight": "packed", "weight_scale": "scales", "weight_scale_2": "global_scale",
              "input_scale": "input_scale", "bias": "bias"},
    "fp8": {"weight": "weight", "weight_scale": "scale", "input_scale": "input_scale",
            "bias": "bias"},
}
_MARKERS = ("weight_scale", "weight_scale_2", "input_scale")


def is_modelopt(path: str, config: dict) -> bool:
  qc = config.get("quantization_config")
  return (os.path.exists(os.path.join(path, HF_QUANT_CONFIG)) or
          (isinstance(qc, dict) and qc.get("quant_method") == "modelopt"))


def read_quant_config(path: str, config: dict) -> dict[str, Any]:
  """The normalized quantization fields: quant_algo, exclude_modules, quantized_layers,
  kv_cache_quant_algo, group_size, producer, source (the file they came from)."""
  file = os.path.join(path, HF_QUANT_CONFIG)
  qc = config.get("quantization_config")
  if os.path.exists(file):
    data = load_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("quantization"), dict):
      raise CheckpointError(f"{HF_QUANT_CONFIG}: needs a 'quantization' object")
    q = dict(data["quantization"])
    producer = data.get("producer") or {}
    source = HF_QUANT_CONFIG
  elif isinstance(qc, dict):
    q = dict(qc)
    if "exclude_modules" not in q and "ignore" in q:
      q["exclude_modules"] = q["ignore"]
    if q.get("kv_cache_quant_algo") is None and q.get("kv_cache_scheme") is not None:
      q["kv_cache_quant_algo"] = kv_algo_from_scheme(q["kv_cache_scheme"])
    producer = q.get("producer") or {}
    source = "config.json quantization_config"
  else:
    raise CheckpointError(f"{path}: no {HF_QUANT_CONFIG} and no modelopt quantization_config")
  algo = q.get("quant_algo")
  if not isinstance(algo, str):
    raise CheckpointError(f"{source}: quant_algo must be a string, got {algo!r}")
  algo = algo.upper()
  if algo not in SUPPORTED_ALGOS:
    raise CheckpointError(f"{source}: unsupported ModelOpt quant_algo {q.get('quant_algo')!r}; "
                          f"jax_nvfp4 loads {', '.join(SUPPORTED_ALGOS)}")
  if isinstance(qc, dict) and qc.get("quant_algo") and source == HF_QUANT_CONFIG:
    if str(qc["quant_algo"]).upper() != algo:
      raise CheckpointError(f"{HF_QUANT_CONFIG} says quant_algo {algo!r} but config.json's "
                            f"quantization_config says {qc['quant_algo']!r}")
  group_size = q.get("group_size")
  if algo in ("NVFP4", "W4A16_NVFP4") and group_size not in (None, 16):
    raise CheckpointError(f"{source}: NVFP4 needs group_size 16, got {group_size!r}")
  exclude = q.get("exclude_modules") or []
  if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
    raise CheckpointError(f"{source}: exclude_modules must be a list of strings, got {exclude!r}")
  layers = None
  if algo == "MIXED_PRECISION":
    layers = q.get("quantized_layers")
    if not isinstance(layers, dict):
      raise CheckpointError(f"{source}: MIXED_PRECISION needs a quantized_layers object")
    norm = {}
    for mod, entry in layers.items():
      la = entry.get("quant_algo") if isinstance(entry, dict) else None
      if not isinstance(la, str) or la.upper() not in LAYER_ALGOS:
        raise CheckpointError(f"{source}: quantized_layers[{mod!r}] has unsupported quant_algo "
                              f"{la!r}; jax_nvfp4 loads {', '.join(LAYER_ALGOS)} layers")
      gs = entry.get("group_size")
      if la.upper() != "FP8" and gs not in (None, 16):
        raise CheckpointError(f"{source}: quantized_layers[{mod!r}] needs group_size 16, "
                              f"got {gs!r}")
      norm[mod] = la.upper()
    layers = norm
  return dict(quant_algo=algo, exclude_modules=list(exclude), quantized_layers=layers,
              kv_cache_quant_algo=q.get("kv_cache_quant_algo"), group_size=group_size,
              producer=producer, source=source)


def kv_algo_from_scheme(scheme) -> str:
  """The ``kv_cache_quant_algo`` name for a ``kv_cache_scheme`` (a string, or a
  compressed-tensors style ``{num_bits, type, ...}`` object; 8-bit float is ``"FP8"``)."""
  if isinstance(scheme, str):
    return scheme.upper()
  if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
    return "FP8"
  raise CheckpointError(f"config.json quantization_config: unsupported kv_cache_scheme "
                        f"{scheme!r} (jax_nvfp4 knows a string or an 8-bit float scheme)")


def excluded(module: str, patterns: list[str]) -> bool:
  return any(fnmatch.fnmatchcase(module, p) or module.startswith(p + ".") for p in patterns)


def layer_algo(module: str, qcfg: dict) -> str | None:
  """The quant_algo the config assigns to ``module``, None for an unquantized module."""
  layers = qcfg["quantized_layers"]
  if layers is not None:
    best = None
    for key, algo in layers.items():
      if module == key or module.startswith(key + ".") or fnmatch.fnmatchcase(module, key):
        if best is None or len(key) > len(best[0]):
          best = (key, algo)
    return None if best is None else best[1]
  if excluded(module, qcfg["exclude_modules"]):
    return None
  return qcfg["quant_algo"]


def plan(files: CheckpointFiles, config: dict, qcfg: dict) -> Plan:
  """Groups the checkpoint's tensors into quantized modules and plain tensors."""
  names = files.tensors
  by_module: dict[str, dict[str, str]] = {}
  for name in names:
    module, suffix = split_name(name)
    by_module.setdefault(module, {})[suffix] = name
  kv = qcfg["kv_cache_quant_algo"] is not None
  specs: dict[str, QuantSpec] = {}
  used: set[str] = set()
  where = qcfg["source"]
  for module, suffixes in sorted(by_module.items()):
    if not any(m in suffixes for m in _MARKERS):
      weight = suffixes.get("weight")
      if weight is not None and names[weight].dtype in ("U8", "F8_E4M3"):
        raise CheckpointError(f"missing tensor {module + '.weight_scale'!r}: {weight!r} is "
                              f"{names[weight].dtype} (a quantized weight) but has no scale")
      continue
    algo = layer_algo(module, qcfg)
    present = sorted(s for s in suffixes if s in _MARKERS)
    if algo is None:
      raise CheckpointError(f"module {module!r} has quantization tensors ({', '.join(present)}) "
                            f"but {where} marks it unquantized (exclude_modules / "
                            f"quantized_layers)")
    fmt = "fp8" if algo == "FP8" else "nvfp4"
    if "weight" not in suffixes:
      raise CheckpointError(f"missing tensor {module + '.weight'!r} (module {module!r} has "
                            f"{', '.join(present)})")
    wdtype = names[suffixes["weight"]].dtype
    want = "U8" if fmt == "nvfp4" else "F8_E4M3"
    if wdtype != want:
      raise CheckpointError(f"tensor {module + '.weight'!r} is {wdtype} but {where} says "
                            f"{module!r} is {algo} (weight must be {want})")
    required = ["weight", "weight_scale"] + (["weight_scale_2"] if fmt == "nvfp4" else [])
    if algo == "NVFP4":
      required.append("input_scale")
    for suffix in required:
      if suffix not in suffixes:
        raise CheckpointError(f"missing tensor {module + '.' + suffix!r} ({algo} module "
                              f"{module!r})")
    roles = _SUFFIX_ROLE[fmt]
    tensors = {}
    for suffix, name in suffixes.items():
      if suffix in roles:
        if suffix == "input_scale" and algo == "W4A16_NVFP4":
          raise CheckpointError(f"extra tensor {name!r}: a W4A16_NVFP4 (weight-only) module "
                                "has no activation scale")
        tensors[roles[suffix]] = names[name]
      elif kv and suffix in KV_SUFFIXES:
        continue  # KV-cache scales stay plain tensors
      else:
        raise CheckpointError(f"extra tensor {name!r}: not part of a ModelOpt {algo} module "
                              f"(expected {', '.join(sorted(roles))})")
      used.add(name)
    act = None
    if "input_scale" in tensors:
      act = "fp8" if fmt == "fp8" else "nvfp4"
    specs[module] = QuantSpec(module, fmt, tensors, divide=False, quant_algo=algo,
                              activation_format=act, main_suffix="weight")
  plain = []
  for name in names:
    if name in used:
      continue
    _, suffix = split_name(name)
    if suffix in QUANT_SUFFIXES or (suffix in KV_SUFFIXES and not kv):
      raise CheckpointError(f"extra tensor {name!r}: {suffix!r} is not a tensor of the ModelOpt "
                            f"{qcfg['quant_algo']} format")
    plain.append(name)
  return Plan("modelopt", qcfg["quant_algo"], specs, plain, qcfg)

"""Writes jax_nvfp4 NVFP4 weights as a ModelOpt ``W4A16_NVFP4`` checkpoint.

The layout follows what ModelOpt's ``export_hf_checkpoint`` writes (checked against our
fixtures, ModelOpt 0.47.0):

* per quantized Linear ``<m>``: ``<m>.weight`` U8 ``[N, K/2]``, ``<m>.weight_scale`` F8_E4M3
  ``[N, K/16]``, ``<m>.weight_scale_2`` F32 ``[]`` (= ``NVFP4Weight.global_scale``), optional
  ``<m>.bias``; no ``input_scale`` (weight-only);
* stacked experts are written per expert, ``<prefix>.<e>.gate_proj/up_proj/down_proj`` (or
  ``w1/w3/w2``), gate and up with the same ``weight_scale_2``;
* plain tensors under their own names and dtypes;
* ``hf_quant_config.json``: ``{producer: {name, version}, quantization: {quant_algo:
  "W4A16_NVFP4", kv_cache_quant_algo: null, group_size: 16, exclude_modules: [...]}}``, where
  ``exclude_modules`` lists every module with an unquantized 2-D ``weight`` (embeddings,
  ``lm_head``, routers...);
* ``config.json``: the model config with ``quantization_config = {config_groups: {group_0:
  {weights: {dynamic, num_bits: 4, type: float, group_size: 16}, targets: [Linear]}}, ignore,
  quant_algo, producer, quant_method: "modelopt"}``.

``producer.name`` is ``"modelopt"`` because serving engines refuse a ModelOpt-format
checkpoint with any other producer name (vLLM checks it); ``producer.version`` says
``jax_nvfp4-<version>`` and every safetensors file's metadata names jax_nvfp4 as the writer.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jax_nvfp4.checkpoint.fp8 import FP8Weight
from jax_nvfp4.checkpoint.hf import INDEX_FILE, SINGLE_FILE, write_safetensors
from jax_nvfp4.checkpoint.loader import Checkpoint, ModuleRecord, MoEExperts
from jax_nvfp4.format import NVFP4Weight, check_weight

QUANT_ALGO = "W4A16_NVFP4"
_EXPERT_NAMES = {"gate_proj": ("gate_proj", "up_proj", "down_proj"), "w1": ("w1", "w3", "w2")}


def _version() -> str:
  from jax_nvfp4 import __version__
  return __version__


def producer() -> dict[str, str]:
  return {"name": "modelopt", "version": f"jax_nvfp4-{_version()}"}


def _host(a) -> np.ndarray:
  return np.asarray(a)


def _nvfp4_tensors(module: str, w: NVFP4Weight, bias=None) -> dict[str, np.ndarray]:
  if not isinstance(w, NVFP4Weight):
    kind = "an FP8Weight" if isinstance(w, FP8Weight) else type(w).__name__
    raise TypeError(f"export_modelopt: module {module!r} is {kind}; a {QUANT_ALGO} checkpoint "
                    "holds NVFP4 weights and plain (unquantized) tensors only")
  check_weight(w.packed, w.scales, w.global_scale, name=module)
  if len(w.packed.shape) != 2:
    raise ValueError(f"export_modelopt: module {module!r} must be one [N, K] weight, got "
                     f"{w.shape} (pass stacked experts as MoEExperts or (w13, w2))")
  gs = np.float32(_host(w.global_scale))
  if not (np.isfinite(gs) and gs > 0):
    raise ValueError(f"export_modelopt: module {module!r} has global_scale {gs}; it must be "
                     "finite and > 0")
  out = {module + ".weight": _host(w.packed), module + ".weight_scale": _host(w.scales),
         module + ".weight_scale_2": np.asarray(gs, np.float32)}
  if bias is not None:
    out[module + ".bias"] = _host(bias)
  return out


def _unstack(w: NVFP4Weight, e: int, rows: slice | None = None) -> NVFP4Weight:
  packed, scales = w.packed[e], w.scales[e]
  if rows is not None:
    packed, scales = packed[rows], scales[rows]
  return NVFP4Weight(packed, scales, w.global_scale[e], dtype=w.dtype)


def _expert_tensors(prefix: str, experts, names: tuple[str, str, str]) -> dict[str, np.ndarray]:
  """Per-expert ModelOpt tensors from MoEExperts or a ``(w13, w2)`` pair of stacked weights."""
  gate_n, up_n, down_n = names
  if isinstance(experts, MoEExperts):
    if any(r.bias is not None for r in experts.records()):
      raise NotImplementedError(f"export_modelopt: experts {prefix!r} have biases, which this "
                                "exporter does not write")
    w13 = experts.w13.weight if experts.w13 is not None else None
    w1 = experts.w1.weight if experts.w1 is not None else None
    w3 = experts.w3.weight if experts.w3 is not None else None
    w2 = experts.w2.weight
  else:
    if not (isinstance(experts, tuple) and len(experts) == 2):
      raise TypeError(f"export_modelopt: experts {prefix!r} must be MoEExperts or a (w13, w2) "
                      f"tuple, got {type(experts).__name__}")
    (w13, w2), w1, w3 = experts, None, None
  for label, w in (("w13", w13), ("w1", w1), ("w3", w3), ("w2", w2)):
    if w is not None and (not isinstance(w, NVFP4Weight) or len(w.packed.shape) != 3):
      raise TypeError(f"export_modelopt: {prefix}.{label} must be a stacked NVFP4Weight "
                      f"[E, N, K], got {type(w).__name__} {getattr(w, 'shape', None)}")
  e_count, hidden, inter = w2.shape
  out: dict[str, np.ndarray] = {}
  for e in range(e_count):
    p = f"{prefix}.{e}."
    if w13 is not None:
      if w13.shape != (e_count, 2 * inter, hidden):
        raise ValueError(f"export_modelopt: {prefix}.w13 must be [E, 2I, H] = "
                         f"{[e_count, 2 * inter, hidden]} for w2 {list(w2.shape)}, got "
                         f"{list(w13.shape)}")
      out.update(_nvfp4_tensors(p + gate_n, _unstack(w13, e, slice(0, inter))))
      out.update(_nvfp4_tensors(p + up_n, _unstack(w13, e, slice(inter, 2 * inter))))
    else:
      out.update(_nvfp4_tensors(p + gate_n, _unstack(w1, e)))
      out.update(_nvfp4_tensors(p + up_n, _unstack(w3, e)))
    out.update(_nvfp4_tensors(p + down_n, _unstack(w2, e)))
  return out


def _names_for(experts) -> tuple[str, str, str]:
  if isinstance(experts, MoEExperts):
    module = experts.w2.sources[0].rsplit(".", 1)[0]
    return _EXPERT_NAMES["w1" if module.endswith(".w2") else "gate_proj"]
  return _EXPERT_NAMES["gate_proj"]


def _shards(tensors: dict[str, np.ndarray], max_shard_size: int | None) -> list[list[str]]:
  names = sorted(tensors)
  if not max_shard_size:
    return [names]
  shards, current, size = [], [], 0
  for name in names:
    nbytes = tensors[name].nbytes
    if current and size + nbytes > max_shard_size:
      shards.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes
  return shards + [current] if current else shards


def export_modelopt(path, modules: Checkpoint | Mapping[str, Any], params: Mapping | None = None,
                    *, config: dict | None = None, max_shard_size: int | None = None,
                    overwrite: bool = False) -> list[str]:
  """Writes a ModelOpt ``W4A16_NVFP4`` checkpoint directory.

  Args:
    path: the directory to create (it must not exist or be empty, unless ``overwrite``).
    modules: a loaded ``Checkpoint`` (its NVFP4 modules, experts, plain params and config), or
      a mapping module name -> ``NVFP4Weight`` ``[N, K]`` (or ``ModuleRecord``), where an
      expert prefix (``model.layers.0.mlp.experts``) maps to ``MoEExperts`` or a
      ``(w13 [E, 2I, H], w2 [E, H, I])`` tuple, written per expert.
    params: tensor name -> array for the unquantized tensors (default: the Checkpoint's).
    config: the model's ``config.json`` content (default: the Checkpoint's; its
      ``quantization_config`` is replaced).
    max_shard_size: bytes per shard; when given (and exceeded), writes
      ``model-0000i-of-0000n.safetensors`` files and ``model.safetensors.index.json``.
    overwrite: replace the checkpoint files of an existing directory.

  Returns the names of the files written. FP8 modules raise TypeError (no FP8 in W4A16_NVFP4).
  """
  path = os.fspath(path)
  if isinstance(modules, Checkpoint):
    ck = modules
    fp8 = [n for n, r in ck.modules.items() if r.format != "nvfp4"]
    if fp8:
      raise TypeError(f"export_modelopt: module {fp8[0]!r} is FP8; a {QUANT_ALGO} checkpoint "
                      "holds NVFP4 weights and plain (unquantized) tensors only")
    in_moe = {r.name for ex in ck.moe.values() for r in ex.records()}
    modules = {n: r for n, r in ck.modules.items() if n not in in_moe}
    modules.update(ck.moe)
    params = ck.params if params is None else params
    config = ck.config if config is None else config
  params = dict(params or {})

  tensors: dict[str, np.ndarray] = {}
  quantized: set[str] = set()
  for name, value in modules.items():
    if isinstance(value, MoEExperts) or isinstance(value, tuple):
      new = _expert_tensors(name, value, _names_for(value))
    elif isinstance(value, ModuleRecord):
      new = _nvfp4_tensors(name, value.weight, value.bias)
    else:
      new = _nvfp4_tensors(name, value)
    quantized |= {k.rsplit(".", 1)[0] for k in new}
    tensors.update(new)
  exclude = []
  for name, value in sorted(params.items()):
    if name in tensors:
      raise ValueError(f"export_modelopt: param {name!r} collides with a quantized module's "
                       "tensor")
    module, _, suffix = name.rpartition(".")
    if module in quantized and suffix != "bias":
      raise ValueError(f"export_modelopt: param {name!r} belongs to quantized module {module!r}")
    arr = _host(value)
    if suffix == "weight" and arr.ndim == 2:
      exclude.append(module)
    tensors[name] = arr

  os.makedirs(path, exist_ok=True)
  existing = [f for f in os.listdir(path)]
  if existing and not overwrite:
    raise FileExistsError(f"export_modelopt: {path!r} is not empty; pass overwrite=True")
  for f in existing:
    if f.startswith("model") and (f.endswith(".safetensors") or f == INDEX_FILE):
      os.remove(os.path.join(path, f))

  meta = {"format": "pt", "writer": f"jax_nvfp4 {_version()}"}
  shards = _shards(tensors, max_shard_size)
  written = []
  if len(shards) == 1:
    write_safetensors(os.path.join(path, SINGLE_FILE), tensors, meta)
    written.append(SINGLE_FILE)
  else:
    weight_map = {}
    for i, names in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(os.path.join(path, fname), {n: tensors[n] for n in names}, meta)
      weight_map.update({n: fname for n in names})
      written.append(fname)
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
    written.append(INDEX_FILE)

  exclude = sorted(set(exclude))
  hf_quant = {"producer": producer(),
              "quantization": {"quant_algo": QUANT_ALGO, "kv_cache_quant_algo": None,
                               "group_size": 16, "exclude_modules": exclude}}
  with open(os.path.join(path, "hf_quant_config.json"), "w") as f:
    json.dump(hf_quant, f, indent=4)
  cfg = copy.deepcopy(dict(config or {}))
  cfg["quantization_config"] = {
      "config_groups": {"group_0": {
          "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
          "targets": ["Linear"]}},
      "ignore": exclude, "quant_algo": QUANT_ALGO, "producer": producer(),
      "quant_method": "modelopt"}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  return written + ["hf_quant_config.json", "config.json"]

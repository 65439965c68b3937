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
  "W4A16_NVFP4", kv_cache_quant_algo, group_size: 16, exclude_modules: [...]}}``, where
  ``exclude_modules`` lists every module with an unquantized 2-D ``weight`` (embeddings,
  ``lm_head``, routers...) and ``kv_cache_quant_algo`` is null unless KV-cache scales
  (``k_scale``/``v_scale``) are written (then the source's, e.g. ``"FP8"``);
* ``config.json``: the model config with ``quantization_config = {config_groups: {group_0:
  {weights: {dynamic, num_bits: 4, type: float, group_size: 16}, targets: [Linear]}}, ignore,
  quant_algo, producer, quant_method: "modelopt"}``, plus ``kv_cache_scheme`` with KV scales.

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
from jax_nvfp4.checkpoint.loader import Checkpoint, ModuleRecord, MoEExperts, model_dims
from jax_nvfp4.checkpoint.modelopt import kv_algo_from_scheme
from jax_nvfp4.checkpoint.plan import KV_SUFFIXES
from jax_nvfp4.format import NVFP4Weight, check_weight

QUANT_ALGO = "W4A16_NVFP4"
_EXPERT_NAMES = {"gate_proj": ("gate_proj", "up_proj", "down_proj"), "w1": ("w1", "w3", "w2")}
# Hugging Face model types whose experts are named w1 (gate) / w3 (up) / w2 (down).
_W1_MODEL_TYPES = ("mixtral",)


def _version() -> str:
  from jax_nvfp4 import __version__
  return __version__


def producer() -> dict[str, str]:
  return {"name": "modelopt", "version": f"jax_nvfp4-{_version()}"}


class _Pending:
  """A tensor to write: shape and dtype now, its data pulled to the host only when its shard is
  written, so the host holds one shard at a time rather than the whole model."""

  def __init__(self, array, index: tuple = ()):
    if not (hasattr(array, "shape") and hasattr(array, "dtype")):
      array = np.asarray(array)
    self.array, self.index = array, index
    # the shape of array[index] without slicing the data (a zero-size broadcast view)
    self.shape = np.broadcast_to(np.empty((), bool), tuple(array.shape))[index].shape
    self.dtype = np.dtype(array.dtype)
    self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

  def pull(self) -> np.ndarray:
    return np.asarray(self.array[self.index] if self.index else self.array)


def _global_scales(module: str, w: NVFP4Weight) -> np.ndarray:
  """The float32 global scale(s) on the host, checked finite and > 0 before anything is written."""
  gs = np.asarray(w.global_scale, np.float32)
  for i, g in np.ndenumerate(gs):
    if not (np.isfinite(g) and g > 0):
      where = module if not i else f"{module}[{i[0]}]"
      raise ValueError(f"export_modelopt: module {where!r} has global_scale {g}; it must be "
                       "finite and > 0")
  return gs


def _nvfp4_tensors(module: str, w: NVFP4Weight, bias=None) -> dict[str, _Pending | np.ndarray]:
  if not isinstance(w, NVFP4Weight):
    kind = "an FP8Weight" if isinstance(w, FP8Weight) else type(w).__name__
    raise TypeError(f"export_modelopt: module {module!r} is {kind}; a {QUANT_ALGO} checkpoint "
                    "holds NVFP4 weights and plain (unquantized) tensors only")
  check_weight(w.packed, w.scales, w.global_scale, name=module)
  if len(w.packed.shape) != 2:
    raise ValueError(f"export_modelopt: module {module!r} must be one [N, K] weight, got "
                     f"{w.shape} (pass stacked experts as MoEExperts or (w13, w2))")
  gs = _global_scales(module, w)
  out = {module + ".weight": _Pending(w.packed), module + ".weight_scale": _Pending(w.scales),
         module + ".weight_scale_2": np.asarray(gs, np.float32)}
  if bias is not None:
    out[module + ".bias"] = _Pending(bias)
  return out


def _expert_linear(module: str, w: NVFP4Weight, gs: np.ndarray, e: int,
                   rows: slice = slice(None)) -> dict[str, _Pending | np.ndarray]:
  """Expert ``e``'s Linear (rows ``rows`` of its stacked weight), sliced when written."""
  return {module + ".weight": _Pending(w.packed, (e, rows)),
          module + ".weight_scale": _Pending(w.scales, (e, rows)),
          module + ".weight_scale_2": np.asarray(gs[e], np.float32)}


def _expert_tensors(prefix: str, experts,
                    names: tuple[str, str, str]) -> dict[str, _Pending | np.ndarray]:
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
  if w13 is not None and w13.shape != (e_count, 2 * inter, hidden):
    raise ValueError(f"export_modelopt: {prefix}.w13 must be [E, 2I, H] = "
                     f"{[e_count, 2 * inter, hidden]} for w2 {list(w2.shape)}, got "
                     f"{list(w13.shape)}")
  gs = {}
  for label, w in (("w13", w13), ("w1", w1), ("w3", w3), ("w2", w2)):
    if w is not None:
      check_weight(w.packed, w.scales, w.global_scale, name=f"{prefix}.{label}")
      gs[label] = _global_scales(f"{prefix}.{label}", w)
  out: dict[str, _Pending | np.ndarray] = {}
  for e in range(e_count):
    p = f"{prefix}.{e}."
    if w13 is not None:
      out.update(_expert_linear(p + gate_n, w13, gs["w13"], e, slice(0, inter)))
      out.update(_expert_linear(p + up_n, w13, gs["w13"], e, slice(inter, 2 * inter)))
    else:
      out.update(_expert_linear(p + gate_n, w1, gs["w1"], e))
      out.update(_expert_linear(p + up_n, w3, gs["w3"], e))
    out.update(_expert_linear(p + down_n, w2, gs["w2"], e))
  return out


def _names_for(experts, config: dict | None, expert_names: str | None) -> tuple[str, str, str]:
  """Expert projection names: explicit, else MoEExperts' own sources, else the model type's."""
  if expert_names is not None:
    return _EXPERT_NAMES[expert_names]
  if isinstance(experts, MoEExperts):
    module = experts.w2.sources[0].rsplit(".", 1)[0]
    return _EXPERT_NAMES["w1" if module.endswith(".w2") else "gate_proj"]
  # A (w13, w2) tuple carries no names: the checkpoint must use the model's own, or it does
  # not reload into that architecture.
  model_type = model_dims(dict(config or {}))["model_type"]
  return _EXPERT_NAMES["w1" if model_type in _W1_MODEL_TYPES else "gate_proj"]


def _is_kv_scale(name: str) -> bool:
  return name.rpartition(".")[2] in KV_SUFFIXES


def _source_kv_algo(ck: Checkpoint) -> str | None:
  """The KV-cache scheme of a loaded checkpoint, as a ModelOpt ``kv_cache_quant_algo``."""
  q = ck.quant_config or {}
  if q.get("kv_cache_quant_algo") is not None:
    return str(q["kv_cache_quant_algo"])
  if q.get("kv_cache_scheme") is not None:  # compressed-tensors
    return kv_algo_from_scheme(q["kv_cache_scheme"])
  return None


def _kv_cache_scheme(algo: str):
  """``config.json``'s ``kv_cache_scheme`` for a ``kv_cache_quant_algo`` (ModelOpt writes FP8
  as an 8-bit float scheme object and other algorithms by name)."""
  if algo.upper() == "FP8":
    return {"dynamic": False, "num_bits": 8, "type": "float"}
  return algo


def _pull(tensors: dict, names: list[str]) -> dict[str, np.ndarray]:
  return {n: tensors[n].pull() if isinstance(tensors[n], _Pending) else tensors[n]
          for n in names}


def _shards(tensors: dict[str, Any], max_shard_size: int | None) -> list[list[str]]:
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
                    overwrite: bool = False, expert_names: str | None = None,
                    kv_cache_quant_algo: str | None = None) -> list[str]:
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
    expert_names: ``"gate_proj"`` (``gate_proj``/``up_proj``/``down_proj``) or ``"w1"``
      (``w1``/``w3``/``w2``, Mixtral) for experts given as a ``(w13, w2)`` tuple; default:
      ``"w1"`` when ``config``'s ``model_type`` is ``mixtral``, else ``"gate_proj"``.
      ``MoEExperts`` keep the names they were loaded with unless this is given.
    kv_cache_quant_algo: the ``kv_cache_quant_algo`` (e.g. ``"FP8"``) of the KV-cache scales
      (``k_scale``/``v_scale`` params) being written; default: the loaded Checkpoint's. KV
      scales without a known algorithm raise ValueError (the result would not reload); without
      KV scales it is written as null.

  Returns the names of the files written. FP8 modules raise TypeError (no FP8 in W4A16_NVFP4).
  """
  if expert_names is not None and expert_names not in _EXPERT_NAMES:
    raise ValueError(f"export_modelopt: expert_names must be one of {sorted(_EXPERT_NAMES)}, "
                     f"got {expert_names!r}")
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
    if kv_cache_quant_algo is None:
      kv_cache_quant_algo = _source_kv_algo(ck)
  params = dict(params or {})
  kv_names = sorted(n for n in params if _is_kv_scale(n))
  if not kv_names:
    kv_cache_quant_algo = None  # nothing to describe: the written checkpoint has no KV scales
  elif kv_cache_quant_algo is None:
    raise ValueError(f"export_modelopt: param {kv_names[0]!r} is a KV-cache scale but the "
                     "KV-cache scheme is unknown; pass kv_cache_quant_algo (e.g. 'FP8') or drop "
                     "the k_scale/v_scale params")

  # Every tensor's name, shape and dtype first (all checks done); data is pulled per shard.
  tensors: dict[str, _Pending | np.ndarray] = {}
  quantized: set[str] = set()
  for name, value in modules.items():
    if isinstance(value, MoEExperts) or isinstance(value, tuple):
      new = _expert_tensors(name, value, _names_for(value, config, expert_names))
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
    # A quantized module owns its weight tensors; its bias and the KV-cache scales that
    # ModelOpt attaches to k_proj / v_proj stay plain tensors.
    if module in quantized and suffix != "bias" and suffix not in KV_SUFFIXES:
      raise ValueError(f"export_modelopt: param {name!r} belongs to quantized module {module!r}")
    arr = _Pending(value)
    if suffix == "weight" and len(arr.shape) == 2:
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
    write_safetensors(os.path.join(path, SINGLE_FILE), _pull(tensors, shards[0]), meta)
    written.append(SINGLE_FILE)
  else:
    weight_map = {}
    for i, names in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(os.path.join(path, fname), _pull(tensors, names), meta)
      weight_map.update({n: fname for n in names})
      written.append(fname)
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
    written.append(INDEX_FILE)

  exclude = sorted(set(exclude))
  hf_quant = {"producer": producer(),
              "quantization": {"quant_algo": QUANT_ALGO,
                               "kv_cache_quant_algo": kv_cache_quant_algo,
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
  if kv_cache_quant_algo is not None:
    cfg["quantization_config"]["kv_cache_scheme"] = _kv_cache_scheme(kv_cache_quant_algo)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  return written + ["hf_quant_config.json", "config.json"]

"""``load_checkpoint``: a ModelOpt or compressed-tensors NVFP4 checkpoint -> jax_nvfp4 weights.

Pipeline: configs + safetensors headers -> the producer's ``Plan`` -> checks (every tensor's
dtype and shape, internal consistency, ``config.json`` dimensions, the module set of known
architectures, MoE expert sets, scalar scales) -> only then tensor data is read (memory-mapped),
converted and placed on a device or sharding.

Results per quantized Linear (``ModuleRecord``): an ``NVFP4Weight`` or an ``FP8Weight``; MoE
experts stored per expert (``<prefix>.<e>.{gate,up,down}_proj`` or ``w1/w3/w2``) are stacked
into ``MoEExperts``: ``w13 [E, 2I, H]`` (rows ``0..I-1`` gate, ``I..2I-1`` up, as
``jax_nvfp4.ops.moe.fused_moe`` expects) and ``w2 [E, H, I]``. Everything else (embeddings, norms,
routers, unquantized Linears) is a plain array in ``Checkpoint.params`` under its tensor name.

Gate and up of one expert need one global scale to share a row-stacked ``w13``. ModelOpt writes
them equal. When they differ, the ratio is folded into the E4M3 block scales of one half only if
that reproduces the producer's dequantized values bit for bit; otherwise the layer keeps gate and
up as separate stacks (``MoEExperts.w1``/``w3``, ``w13 = None``) and says so in ``note``. One
global scale is never silently picked for both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_nvfp4.checkpoint import compressed_tensors, modelopt
from jax_nvfp4.checkpoint.fp8 import FP8Weight
from jax_nvfp4.checkpoint.hf import (CheckpointError, CheckpointFiles, Progress, TensorInfo,
                                     load_json)
from jax_nvfp4.checkpoint.plan import Plan, QuantSpec, require_scalar, split_name
from jax_nvfp4.format import BLOCK_SIZE, NVFP4Weight

logger = logging.getLogger("jax_nvfp4")

_FLOAT_DTYPES = ("BF16", "F16", "F32")
_DTYPE_NAMES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32,
                "bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
_EXPERT_RE = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\."
                        r"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)$")
_GATE, _UP, _DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")
_PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar by default from 1 GiB on


# ----------------------------------------------------------------------------- results

@dataclasses.dataclass
class ModuleRecord:
  """One quantized weight (a Linear, or a stack of expert Linears) and what is known of it.

  Attributes:
    name: module path (``model.layers.0.mlp.down_proj``; ``<prefix>.w13``/``.w2``/``.w1``/
      ``.w3`` for stacked experts).
    format: ``"nvfp4"`` or ``"fp8"``.
    weight: ``NVFP4Weight`` or ``FP8Weight`` ``[..., N, K]``.
    bias: ``[..., N]`` array or None.
    producer: ``"modelopt"`` or ``"compressed-tensors"``.
    quant_algo: the producer's scheme (``NVFP4``, ``W4A16_NVFP4``, ``FP8``,
      ``nvfp4-pack-quantized``).
    activation_format: ``"nvfp4"`` (W4A4) or ``"fp8"`` when the checkpoint quantizes the
      module's input, None for weight-only. jax_nvfp4 runs weight-only: the scales are recorded
      in ``activation_scales`` and never used.
    activation_scales: checkpoint tensor name -> the raw activation scale (``input_scale``:
      ModelOpt, multiplies; ``input_global_scale``: compressed-tensors, divides).
    sources: the checkpoint tensors this record was built from.
    global_scale_divisor: compressed-tensors only: the raw ``weight_global_scale`` (``[...]``),
      which the producer divides by; ``weight.global_scale`` is the multiplier chosen for it.
    exact: True when ``dequantize(weight)`` (in ``weight.dtype``) equals the producer's own
      dequantization bit for bit.
    note: how the global scale was obtained, or why it is not exact.
  """

  name: str
  format: str
  weight: Any
  bias: Any
  producer: str
  quant_algo: str
  activation_format: str | None
  activation_scales: dict[str, np.ndarray]
  sources: tuple[str, ...]
  global_scale_divisor: np.ndarray | None = None
  exact: bool = True
  note: str = ""

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.weight.shape)


@dataclasses.dataclass
class MoEExperts:
  """The experts of one MoE layer, stacked.

  ``w13 [E, 2I, H]`` rows ``[gate; up]`` and ``w2 [E, H, I]``; when gate and up could not share
  a global scale exactly, ``w13`` is None and ``w1`` (gate) / ``w3`` (up), ``[E, I, H]`` each,
  hold them apart (``note`` says why).
  """

  prefix: str
  num_experts: int
  w2: ModuleRecord
  w13: ModuleRecord | None = None
  w1: ModuleRecord | None = None
  w3: ModuleRecord | None = None
  note: str = ""

  @property
  def fused(self) -> bool:
    return self.w13 is not None

  def records(self) -> list[ModuleRecord]:
    return [r for r in (self.w13, self.w1, self.w3, self.w2) if r is not None]


@dataclasses.dataclass
class Checkpoint:
  """A loaded checkpoint.

  Attributes:
    path: the directory.
    producer: ``"modelopt"`` or ``"compressed-tensors"``.
    quant_algo: checkpoint-wide scheme (``NVFP4``, ``W4A16_NVFP4``, ``FP8``,
      ``MIXED_PRECISION``, ``nvfp4-pack-quantized``).
    config: ``config.json`` (``{}`` if absent); quant_config: the producer's quantization config.
    modules: module name -> ``ModuleRecord`` for every quantized Linear that is not an expert,
      plus ``<prefix>.w13``/``.w2`` (or ``.w1``/``.w3``) for stacked experts.
    moe: expert prefix (``model.layers.0.mlp.experts``) -> ``MoEExperts``.
    params: tensor name -> array for every unquantized tensor.
    dtype: the compute dtype the weights dequantize to.
  """

  path: str
  producer: str
  quant_algo: str
  config: dict
  quant_config: dict
  modules: dict[str, ModuleRecord]
  moe: dict[str, MoEExperts]
  params: dict[str, jax.Array]
  dtype: Any

  def weight(self, module: str):
    """The weight of ``module``: an NVFP4Weight/FP8Weight, or the plain ``<module>.weight``."""
    if module in self.modules:
      return self.modules[module].weight
    if module + ".weight" in self.params:
      return self.params[module + ".weight"]
    raise KeyError(f"no module {module!r} in {self.path}")

  @property
  def activation_format(self) -> str | None:
    formats = {r.activation_format for r in self.modules.values()} - {None}
    return formats.pop() if len(formats) == 1 else (None if not formats else "mixed")


# ----------------------------------------------------------------------------- reading a plan

def read_config(path: str) -> dict:
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    return {}
  config = load_json(file)
  if not isinstance(config, dict):
    raise CheckpointError("config.json must hold a JSON object")
  return config


def read_plan(path: str, stack_experts: bool = True) -> tuple[CheckpointFiles, dict, Plan]:
  """Configs + headers -> a checked ``Plan`` (reads no tensor data). ``stack_experts``: check
  that the experts can be stacked (as ``load_checkpoint(stack_experts=)``)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path!r} is not a checkpoint directory")
  config = read_config(path)
  if modelopt.is_modelopt(path, config):
    qcfg = modelopt.read_quant_config(path, config)
    files = CheckpointFiles(path)
    plan = modelopt.plan(files, config, qcfg)
  elif compressed_tensors.is_compressed_tensors(config):
    qcfg = compressed_tensors.read_quant_config(config)
    files = CheckpointFiles(path)
    plan = compressed_tensors.plan(files, config, qcfg)
  else:
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
      raise CheckpointError(f"{path}: unsupported quant_method {qc.get('quant_method')!r} in "
                            "config.json; jax_nvfp4 loads 'modelopt' and 'compressed-tensors'")
    raise CheckpointError(f"{path}: not a quantized checkpoint (no {modelopt.HF_QUANT_CONFIG} "
                          "and no quantization_config in config.json)")
  _check_specs(plan)
  dims = model_dims(config)
  _check_dims(plan, files, dims)
  _check_architecture(plan, files, dims)
  group_experts(plan, dims, stack_experts)
  return files, config, plan


# ----------------------------------------------------------------------------- checks

def _check_specs(plan: Plan) -> None:
  """Dtypes and shapes of each quantized module's tensors, and their agreement."""
  for spec in plan.specs.values():
    t = spec.tensors
    if spec.format == "nvfp4":
      packed, scales = t["packed"], t["scales"]
      if packed.dtype != "U8" or len(packed.shape) != 2:
        raise CheckpointError(f"tensor {packed.name!r} (packed FP4) must be U8 [N, K/2], got "
                              f"{packed.describe()}")
      n, k = packed.shape[0], 2 * packed.shape[1]
      if k % BLOCK_SIZE:
        raise CheckpointError(f"tensor {packed.name!r}: K = {k} is not a multiple of "
                              f"{BLOCK_SIZE} (U8 [N, K/2] = {list(packed.shape)})")
      want = (n, k // BLOCK_SIZE)
      if scales.dtype != "F8_E4M3" or scales.shape != want:
        raise CheckpointError(f"tensor {scales.name!r} (block scales) must be F8_E4M3 "
                              f"{list(want)} for {packed.name!r} {list(packed.shape)}, got "
                              f"{scales.describe()}")
      require_scalar(t["global_scale"], "global scale")
      shape = (n, k)
      if "weight_shape" in t:
        ws = t["weight_shape"]
        if ws.dtype not in ("I64", "I32") or ws.shape != (2,):
          raise CheckpointError(f"tensor {ws.name!r} must be I64 [2], got {ws.describe()}")
    else:
      w = t["weight"]
      if w.dtype != "F8_E4M3" or len(w.shape) != 2:
        raise CheckpointError(f"tensor {w.name!r} (FP8 weight) must be F8_E4M3 [N, K], got "
                              f"{w.describe()}")
      require_scalar(t["scale"], "per-tensor weight scale")
      shape = tuple(w.shape)
    if "input_scale" in t:
      require_scalar(t["input_scale"], "activation scale")
    if "bias" in t:
      b = t["bias"]
      if b.dtype not in _FLOAT_DTYPES or b.shape != (shape[0],):
        raise CheckpointError(f"tensor {b.name!r} (bias) must be a float [{shape[0]}], got "
                              f"{b.describe()}")


def _cfg_int(c: dict, *keys) -> int | None:
  for key in keys:
    v = c.get(key)
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
      return v
  return None


def model_dims(config: dict) -> dict[str, Any]:
  """The dimensions ``config.json`` states (None where it does not)."""
  c = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
  hidden = _cfg_int(c, "hidden_size")
  heads = _cfg_int(c, "num_attention_heads")
  head_dim = _cfg_int(c, "head_dim") or (hidden // heads if hidden and heads else None)
  kv_heads = _cfg_int(c, "num_key_value_heads") or heads
  mlp_only = c.get("mlp_only_layers") or []
  return dict(
      model_type=c.get("model_type") or config.get("model_type"), hidden=hidden,
      intermediate=_cfg_int(c, "intermediate_size"),
      moe_intermediate=_cfg_int(c, "moe_intermediate_size"),
      num_experts=_cfg_int(c, "num_experts", "num_local_experts", "n_routed_experts"),
      heads=heads, kv_heads=kv_heads, head_dim=head_dim,
      layers=_cfg_int(c, "num_hidden_layers"), vocab=_cfg_int(c, "vocab_size"),
      # DeepSeek-V3/R1 and GLM-4.5 store their multi-token-prediction layers after the
      # decoder's, as model.layers.<num_hidden_layers + i>.
      nextn=_cfg_int(c, "num_nextn_predict_layers") or 0,
      tie=bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
      sparse_step=_cfg_int(c, "decoder_sparse_step") or 1,
      mlp_only=set(mlp_only) if isinstance(mlp_only, list) else set())


_DECODER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")


def expected_shape(module: str, dims: dict) -> tuple[int | None, int | None] | None:
  """``(N, K)`` that ``config.json`` implies for a Linear (None entries where unknown).

  Only for the decoder layers of a causal LM (``model.layers.<i>.``): a vision tower's MLP or
  attention has other sizes than the text config's.
  """
  if not _DECODER_RE.match(module):
    return None
  h, inter = dims["hidden"], dims["intermediate"]
  expert_inter = dims["moe_intermediate"] or inter
  if _EXPERT_RE.match(module):
    proj = module.rsplit(".", 1)[1]
    return (h, expert_inter) if proj in _DOWN else (expert_inter, h)
  if re.search(r"\.mlp\.(gate_proj|up_proj)$", module):
    return (inter, h)
  if re.search(r"\.mlp\.down_proj$", module):
    return (h, inter)
  if dims["model_type"] in _LLAMA_LIKE and dims["head_dim"]:
    q, kv = (dims["heads"] or 0) * dims["head_dim"], (dims["kv_heads"] or 0) * dims["head_dim"]
    for proj, shape in (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)),
                        ("o_proj", (h, q))):
      if module.endswith(".self_attn." + proj):
        return shape
  return None


def _check_dims(plan: Plan, files: CheckpointFiles, dims: dict) -> None:
  layers = dims["layers"]
  for spec in plan.specs.values():
    main = spec.main
    n, k = spec.logical_shape
    want = expected_shape(spec.module, dims)
    if want is not None:
      for got, exp, what in ((n, want[0], "N (out features)"), (k, want[1], "K (in features)")):
        if exp is not None and got != exp:
          raise CheckpointError(
              f"tensor {main.name!r} {main.describe()}: {what} = {got}, but config.json implies "
              f"[N, K] = {list(want)} for {spec.module!r}")
  for name in list(plan.specs) + plan.plain:
    m = _DECODER_RE.match(name)
    if m and layers is not None and int(m.group(1)) >= layers + dims["nextn"]:
      mtp = f" + num_nextn_predict_layers = {dims['nextn']}" if dims["nextn"] else ""
      raise CheckpointError(f"extra tensor or module {name!r}: layer {m.group(1)} but "
                            f"config.json has num_hidden_layers = {layers}{mtp}")
  h, vocab = dims["hidden"], dims["vocab"]
  for name in plan.plain:
    info = files.tensors[name]
    module, suffix = split_name(name)
    if suffix == "weight" and (module.endswith("embed_tokens") or module == "lm_head"):
      if h and vocab and (len(info.shape) != 2 or info.shape[1] != h or info.shape[0] < vocab):
        raise CheckpointError(f"tensor {name!r} {info.describe()}: config.json implies "
                              f"[vocab_size = {vocab}, hidden_size = {h}]")
    elif suffix == "weight" and len(info.shape) == 2:
      want = expected_shape(module, dims)
      if want is not None and any(e is not None and g != e for g, e in zip(info.shape, want)):
        raise CheckpointError(f"tensor {name!r} {info.describe()}: config.json implies "
                              f"{list(want)}")


def _expected_modules(dims: dict) -> tuple[set[str], set[str]] | None:
  """(required, optional) module names of a known architecture, None if unknown."""
  mt, layers = dims["model_type"], dims["layers"]
  if mt not in _LLAMA_LIKE or layers is None:
    return None
  required = {"model.embed_tokens", "model.norm"}
  optional = set()
  (optional if dims["tie"] else required).add("lm_head")
  experts = dims["num_experts"]
  for i in range(layers):
    p = f"model.layers.{i}."
    required |= {p + "input_layernorm", p + "post_attention_layernorm"}
    required |= {p + f"self_attn.{x}_proj" for x in "qkvo"}
    # rotary buffers and KV-cache scales (k_scale / v_scale) some exporters attach here
    optional |= {p + "self_attn.rotary_emb", p + "self_attn", p + "self_attn.attn"}
    if mt in ("qwen3", "qwen3_moe"):
      required |= {p + "self_attn.q_norm", p + "self_attn.k_norm"}
    sparse = (mt == "qwen3_moe" and experts and i not in dims["mlp_only"] and
              (i + 1) % dims["sparse_step"] == 0)
    if mt == "mixtral":
      if experts is None:
        return None
      required.add(p + "block_sparse_moe.gate")
      required |= {p + f"block_sparse_moe.experts.{e}.{w}" for e in range(experts)
                   for w in ("w1", "w2", "w3")}
    elif sparse:
      required.add(p + "mlp.gate")
      required |= {p + f"mlp.experts.{e}.{x}_proj" for e in range(experts)
                   for x in ("gate", "up", "down")}
    else:
      required |= {p + f"mlp.{x}_proj" for x in ("gate", "up", "down")}
  return required, optional


def _check_architecture(plan: Plan, files: CheckpointFiles, dims: dict) -> None:
  """For known architectures: every module present, no tensor of an unknown module."""
  expected = _expected_modules(dims)
  if expected is None:
    return
  required, optional = expected
  present: dict[str, str] = {}
  for name in plan.plain:
    present.setdefault(split_name(name)[0], name)
  for module, spec in plan.specs.items():
    present.setdefault(module, spec.main.name)
  for module in sorted(required - set(present)):
    raise CheckpointError(f"missing tensor {module + '.weight'!r}: config.json "
                          f"({dims['model_type']}, {dims['layers']} layers) needs module "
                          f"{module!r}, which the checkpoint lacks")
  for module, name in sorted(present.items()):
    if module not in required and module not in optional:
      raise CheckpointError(f"extra tensor {name!r}: {dims['model_type']} has no module "
                            f"{module!r}")


def group_experts(plan: Plan, dims: dict,
                  stack: bool = True) -> dict[str, dict[int, dict[str, QuantSpec]]]:
  """prefix -> expert -> {"gate"/"up"/"down": spec}; checks completeness and formats.

  With ``stack=False`` (experts loaded one record per Linear) an expert projection left
  unquantized (a plain ``<...>.weight``) counts as present and the stacking checks (one format,
  one shape per projection) are skipped.
  """
  plain = set(plan.plain)
  groups: dict[str, dict[int, dict[str, QuantSpec]]] = {}
  for module, spec in plan.specs.items():
    m = _EXPERT_RE.match(module)
    if m:
      proj = m.group("proj")
      role = "gate" if proj in _GATE else "up" if proj in _UP else "down"
      groups.setdefault(m.group("prefix"), {}).setdefault(int(m.group("e")), {})[role] = spec
  for prefix, experts in groups.items():
    specs = [s for e in experts.values() for s in e.values()]
    num = dims["num_experts"] or max(experts) + 1
    proto = specs[0]
    names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    if _EXPERT_RE.match(proto.module).group("proj") in ("w1", "w2", "w3"):
      names = {"gate": "w1", "up": "w3", "down": "w2"}
    for e in range(num):
      for role in ("gate", "up", "down"):
        if role not in experts.get(e, {}):
          _missing_expert(prefix, e, num, names[role], proto, plain, stack)
    for e in sorted(experts):
      if e >= num:
        spec = next(iter(experts[e].values()))
        raise CheckpointError(f"extra tensor {spec.main.name!r}: expert {e} but config.json "
                              f"has {num} experts")
    if not stack:
      continue
    for spec in specs:
      if spec.format != proto.format:
        raise CheckpointError(f"{prefix!r}: expert module {spec.module!r} is {spec.format} but "
                              f"{proto.module!r} is {proto.format}; cannot stack them")
    for role in ("gate", "up", "down"):
      shapes = {experts[e][role].logical_shape for e in range(num)}
      if len(shapes) != 1:
        raise CheckpointError(f"{prefix!r}: the {names[role]} weights of the experts have "
                              f"different shapes {sorted(shapes)}")
  return groups


def _missing_expert(prefix: str, e: int, num: int, proj: str, proto: QuantSpec, plain: set,
                    stack: bool) -> None:
  """An expert projection with no quantized module: unquantized (a plain weight) or missing."""
  module = f"{prefix}.{e}.{proj}"
  if module + ".weight" not in plain:
    raise CheckpointError(f"missing tensor {module + '.' + proto.main_suffix!r} (expert {e} of "
                          f"{num} in {prefix!r})")
  if stack:
    raise CheckpointError(
        f"expert projection {module!r} is unquantized ({module + '.weight'!r} is a plain "
        f"tensor) while {proto.module!r} is {proto.format}: mixed quantized/unquantized experts "
        f"cannot be stacked into MoEExperts; load with stack_experts=False to get one record "
        f"per quantized expert Linear and the unquantized ones as params")


# ----------------------------------------------------------------------------- building

def _scalar(files: CheckpointFiles, info: TensorInfo) -> np.float32:
  v = np.float32(np.asarray(files.read(info.name)).reshape(()))
  if not (np.isfinite(v) and v > 0):
    raise CheckpointError(f"tensor {info.name!r} must be finite and > 0, got {v}")
  return v


def _resolve_dtype(dtype, config: dict):
  if dtype is not None:
    return jnp.dtype(dtype).type if not isinstance(dtype, type) else dtype
  c = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
  name = c.get("dtype") or c.get("torch_dtype") or config.get("torch_dtype") or "bfloat16"
  return _DTYPE_NAMES.get(str(name).replace("torch.", ""), jnp.bfloat16)


class _Placer:
  """Puts arrays on the requested device or sharding (the default device otherwise)."""

  def __init__(self, device=None, sharding=None):
    if device is not None and sharding is not None:
      raise ValueError("load_checkpoint: give device= or sharding=, not both")
    self.device, self.sharding = device, sharding

  def __call__(self, name: str, array: np.ndarray) -> jax.Array:
    target = self.device
    if self.sharding is not None:
      target = (self.sharding(name, tuple(array.shape), np.dtype(array.dtype))
                if callable(self.sharding) else self.sharding)
    if target is None:
      return jnp.asarray(array)
    return jax.device_put(np.asarray(array), target)


def _check_scales(info: TensorInfo, scales: np.ndarray) -> None:
  if np.isnan(scales.astype(np.float32)).any():
    raise CheckpointError(f"tensor {info.name!r} (block scales) holds NaN")
  if (scales.astype(np.float32) < 0).any():
    raise CheckpointError(f"tensor {info.name!r} (block scales) holds negative values")


@dataclasses.dataclass
class _Half:
  """One NVFP4 Linear read from the checkpoint, before stacking."""

  spec: QuantSpec
  packed: np.ndarray
  scales: np.ndarray
  raw_gs: np.float32  # weight_scale_2 (multiplies) or weight_global_scale (divides)

  def ref_factor(self) -> np.ndarray:
    """The producer's float32 per-block factor."""
    s = self.scales.astype(np.float32)
    if self.spec.divide:
      return compressed_tensors.tool_factor(s, self.raw_gs)
    return s * self.raw_gs


def _read_nvfp4(files: CheckpointFiles, spec: QuantSpec, scalars: dict) -> _Half:
  scales = np.asarray(files.read(spec.tensor_name("scales")))
  _check_scales(spec.tensors["scales"], scales)
  return _Half(spec, np.asarray(files.read(spec.tensor_name("packed"))), scales,
               scalars[spec.tensor_name("global_scale")])


def _global_for(halves: list[_Half], dtype) -> tuple[np.float32, bool, str]:
  """One multiplying global scale for halves that share their raw global scale."""
  h0 = halves[0]
  if not h0.spec.divide:
    return h0.raw_gs, True, ""
  scales = np.concatenate([h.scales.ravel() for h in halves])
  return compressed_tensors.reciprocal_global_scale(scales, h0.raw_gs, dtype)


def _fold(gate: _Half, up: _Half, dtype) -> tuple[np.float32, np.ndarray, np.ndarray, str] | None:
  """Gate/up with different global scales: one global scale + refolded E4M3 block scales that
  reproduce both halves' dequantization bit for bit in ``dtype``; None when impossible."""
  candidates = []
  for h in (gate, up):
    g, exact, _ = _global_for([h], dtype)
    if exact:
      candidates.append(g)
  for g in candidates:
    out = []
    for h in (gate, up):
      ref = h.ref_factor()
      with np.errstate(over="ignore", invalid="ignore"):
        s_new = (ref.astype(np.float64) / np.float64(g)).astype(ml_dtypes.float8_e4m3fn)
      s32 = s_new.astype(np.float32)
      if not np.isfinite(s32).all():
        break
      _, dtype_exact = compressed_tensors.matches_tool(s32, ref, g, dtype)
      if not dtype_exact:
        break
      out.append(s_new)
    else:
      return g, out[0], out[1], (f"gate/up global scales differ; refolded into the block scales "
                                 f"exactly with global_scale {float(g)!r}")
  return None


class _Builder:
  def __init__(self, files: CheckpointFiles, plan: Plan, dtype, put: _Placer, progress: Progress):
    self.files, self.plan, self.dtype, self.put, self.progress = files, plan, dtype, put, progress
    self.scalars: dict[str, np.float32] = {}

  def read_scalars(self) -> None:
    """Every scalar scale, checked finite and positive before any weight is read."""
    for spec in self.plan.specs.values():
      for role in ("global_scale", "scale", "input_scale"):
        if role in spec.tensors:
          info = spec.tensors[role]
          self.scalars[info.name] = _scalar(self.files, info)
      if "weight_shape" in spec.tensors:
        info = spec.tensors["weight_shape"]
        packed = spec.tensors["packed"].shape
        got = [int(v) for v in np.asarray(self.files.read(info.name))]
        if got != [packed[0], 2 * packed[1]]:
          raise CheckpointError(f"tensor {info.name!r} says {got} but the packed weight is "
                                f"[{packed[0]}, {2 * packed[1]}]")

  def _act(self, specs: list[QuantSpec]) -> tuple[str | None, dict[str, np.ndarray]]:
    acts = {s.activation_format for s in specs}
    scales = {s.tensor_name("input_scale"): np.asarray(self.scalars[s.tensor_name("input_scale")])
              for s in specs if "input_scale" in s.tensors}
    return (acts.pop() if len(acts) == 1 else "mixed"), scales

  def _bias(self, name: str, rows: list[list[QuantSpec]], stacked: bool):
    specs = [s for row in rows for s in row]
    have = ["bias" in s.tensors for s in specs]
    if not any(have):
      return None
    if not all(have):
      missing = next(s for s in specs if "bias" not in s.tensors)
      raise CheckpointError(f"missing tensor {missing.module + '.bias'!r}: the modules stacked "
                            f"with it have a bias")
    b = [np.concatenate([np.asarray(self.files.read(s.tensor_name("bias"))) for s in row])
         for row in rows]
    return self.put(name + ".bias", np.stack(b) if stacked else b[0])

  def _nbytes(self, specs) -> int:
    return sum(t.nbytes for s in specs for t in s.tensors.values())

  def nvfp4(self, name: str, halves: list[list[_Half]], stacked: bool,
            note: str = "") -> ModuleRecord:
    """Builds a record from ``halves[i]`` = the Linears stacked along N for leading index i
    (one Linear -> ``[[h]]``; experts -> ``[[gate_e, up_e], ...]`` or ``[[down_e], ...]``)."""
    packed, scales, gs, divisors, exact, notes = [], [], [], [], True, []
    for row in halves:
      raw = {float(h.raw_gs) for h in row}
      if len(raw) == 1:
        g, ok, why = _global_for(row, self.dtype)
        row_scales = [h.scales for h in row]
      else:
        folded = _fold(row[0], row[1], self.dtype)
        assert folded is not None, "caller checks foldability"
        g, s0, s1, why = folded
        ok, row_scales = True, [s0, s1]
      packed.append(np.concatenate([h.packed for h in row], axis=0))
      scales.append(np.concatenate(row_scales, axis=0))
      gs.append(g)
      divisors.append(row[0].raw_gs)
      exact &= ok
      if why and why not in notes:
        notes.append(why)
    pk = np.stack(packed) if stacked else packed[0]
    sc = np.stack(scales) if stacked else scales[0]
    g = np.asarray(gs, np.float32) if stacked else np.float32(gs[0])
    specs = [h.spec for row in halves for h in row]
    weight = NVFP4Weight(self.put(name + ".packed", pk), self.put(name + ".scales", sc),
                         self.put(name + ".global_scale", np.asarray(g, np.float32)),
                         dtype=self.dtype)
    act, act_scales = self._act(specs)
    divide = specs[0].divide
    rows = [[h.spec for h in row] for row in halves]
    rec = ModuleRecord(
        name=name, format="nvfp4", weight=weight, bias=self._bias(name, rows, stacked),
        producer=self.plan.producer, quant_algo=specs[0].quant_algo, activation_format=act,
        activation_scales=act_scales,
        sources=tuple(t.name for s in specs for t in s.tensors.values()),
        global_scale_divisor=(np.asarray(divisors, np.float32) if stacked
                              else np.float32(divisors[0])) if divide else None,
        exact=exact, note="; ".join(x for x in [note] + notes if x))
    if not exact:
      logger.warning("jax_nvfp4: %s: %s", name, rec.note)
    self.progress.update(self._nbytes(specs))
    return rec

  def fp8(self, name: str, rows: list[list[QuantSpec]], stacked: bool,
          note: str = "") -> ModuleRecord:
    weights, scales = [], []
    for row in rows:
      vals = {float(self.scalars[s.tensor_name("scale")]) for s in row}
      if len(vals) != 1:
        raise AssertionError("caller checks that stacked FP8 halves share a scale")
      weights.append(np.concatenate([np.asarray(self.files.read(s.tensor_name("weight")))
                                     for s in row], axis=0))
      scales.append(self.scalars[row[0].tensor_name("scale")])
    w = np.stack(weights) if stacked else weights[0]
    sc = np.asarray(scales, np.float32) if stacked else np.float32(scales[0])
    specs = [s for row in rows for s in row]
    weight = FP8Weight(self.put(name + ".weight", w),
                       self.put(name + ".scale", np.asarray(sc, np.float32)), dtype=self.dtype)
    act, act_scales = self._act(specs)
    self.progress.update(self._nbytes(specs))
    return ModuleRecord(name=name, format="fp8", weight=weight,
                        bias=self._bias(name, rows, stacked),
                        producer=self.plan.producer, quant_algo=specs[0].quant_algo,
                        activation_format=act, activation_scales=act_scales,
                        sources=tuple(t.name for s in specs for t in s.tensors.values()),
                        note=note)

  def single(self, spec: QuantSpec) -> ModuleRecord:
    if spec.format == "fp8":
      return self.fp8(spec.module, [[spec]], stacked=False)
    return self.nvfp4(spec.module, [[_read_nvfp4(self.files, spec, self.scalars)]],
                      stacked=False)

  def experts(self, prefix: str, experts: dict[int, dict[str, QuantSpec]]) -> MoEExperts:
    num = len(experts)
    order = range(num)
    fmt = experts[0]["down"].format
    if fmt == "fp8":
      shared = all(self.scalars[experts[e]["gate"].tensor_name("scale")] ==
                   self.scalars[experts[e]["up"].tensor_name("scale")] for e in order)
      w2 = self.fp8(prefix + ".w2", [[experts[e]["down"]] for e in order], True)
      if shared:
        w13 = self.fp8(prefix + ".w13", [[experts[e]["gate"], experts[e]["up"]] for e in order],
                       True)
        return MoEExperts(prefix, num, w2=w2, w13=w13)
      note = "gate/up FP8 scales differ: kept as separate w1 (gate) / w3 (up) stacks"
      logger.warning("jax_nvfp4: %s: %s", prefix, note)
      return MoEExperts(prefix, num, w2=w2, note=note,
                        w1=self.fp8(prefix + ".w1", [[experts[e]["gate"]] for e in order], True,
                                    note),
                        w3=self.fp8(prefix + ".w3", [[experts[e]["up"]] for e in order], True,
                                    note))
    read = lambda s: _read_nvfp4(self.files, s, self.scalars)  # noqa: E731
    w2 = self.nvfp4(prefix + ".w2", [[read(experts[e]["down"])] for e in order], True)
    pairs = [(read(experts[e]["gate"]), read(experts[e]["up"])) for e in order]
    differ = [e for e, (g, u) in enumerate(pairs) if g.raw_gs != u.raw_gs]
    if not differ or all(_fold(*pairs[e], self.dtype) is not None for e in differ):
      return MoEExperts(prefix, num, w2=w2,
                        w13=self.nvfp4(prefix + ".w13", [list(p) for p in pairs], True))
    e = differ[0]
    g, u = pairs[e]
    note = (f"gate/up global scales of expert {e} differ ({float(g.raw_gs)!r} vs "
            f"{float(u.raw_gs)!r}) and no exact refold exists: kept as separate w1 (gate) / "
            f"w3 (up) stacks")
    logger.warning("jax_nvfp4: %s: %s", prefix, note)
    return MoEExperts(prefix, num, w2=w2, note=note,
                      w1=self.nvfp4(prefix + ".w1", [[p[0]] for p in pairs], True, note),
                      w3=self.nvfp4(prefix + ".w3", [[p[1]] for p in pairs], True, note))


def load_checkpoint(path, *, dtype=None, device=None,
                    sharding: Any | Callable[[str, tuple, np.dtype], Any] = None,
                    progress: bool | None = None, stack_experts: bool = True) -> Checkpoint:
  """Loads a ModelOpt or compressed-tensors NVFP4 checkpoint directory.

  Args:
    path: a directory with ``config.json`` and ``model.safetensors`` or
      ``model.safetensors.index.json`` + shards (ModelOpt: also ``hf_quant_config.json``).
    dtype: the dtype weights dequantize to (``NVFP4Weight.dtype``); default: ``config.json``'s
      ``dtype``/``torch_dtype``, else bfloat16.
    device: a ``jax.Device`` to put every array on.
    sharding: a ``jax.sharding.Sharding`` for every array, or a callable ``(name, shape,
      dtype) -> Sharding | Device | None`` called per array. Names: plain tensors by their
      checkpoint name; quantized arrays as ``<module>.packed``/``.scales``/``.global_scale``
      (NVFP4), ``<module>.weight``/``.scale`` (FP8), ``<module>.bias``, with
      ``<prefix>.w13``/``.w2`` modules for stacked experts.
    progress: show a progress bar (tqdm if installed, else stderr); default: for checkpoints
      of 1 GiB or more.
    stack_experts: stack per-expert MoE Linears into ``MoEExperts`` (default); False keeps one
      record per expert Linear.

  Returns a ``Checkpoint``. Raises ``CheckpointError`` (a ValueError) naming the file/tensor for
  anything missing, extra or inconsistent. Structure, dtypes, shapes and the config are checked
  from the headers before any tensor data is read, and the scalar scales (global, per-tensor,
  activation) before any weight data; block scales (NaN or negative E4M3 values) can only be
  checked once each module's scales are read, so that error may come after other modules
  were loaded.
  """
  path = os.fspath(path)
  files, config, plan = read_plan(path, stack_experts)
  dims = model_dims(config)
  expert_groups = group_experts(plan, dims) if stack_experts else {}
  dtype = _resolve_dtype(dtype, config)
  put = _Placer(device, sharding)
  enabled = files.total_bytes >= _PROGRESS_MIN_BYTES if progress is None else bool(progress)
  bar = Progress(files.total_bytes, f"loading {os.path.basename(os.path.abspath(path))}", enabled)
  try:
    builder = _Builder(files, plan, dtype, put, bar)
    builder.read_scalars()
    in_experts = {s.module for ex in expert_groups.values() for e in ex.values()
                  for s in e.values()}
    modules: dict[str, ModuleRecord] = {}
    for module, spec in plan.specs.items():
      if module not in in_experts:
        modules[module] = builder.single(spec)
    moe = {}
    for prefix, experts in sorted(expert_groups.items()):
      moe[prefix] = builder.experts(prefix, experts)
      for rec in moe[prefix].records():
        modules[rec.name] = rec
    params = {}
    for name in plan.plain:
      params[name] = put(name, np.asarray(files.read(name)))
      bar.update(files.tensors[name].nbytes)
  finally:
    bar.close()
  return Checkpoint(path=path, producer=plan.producer, quant_algo=plan.quant_algo,
                    config=config, quant_config=plan.quant_config, modules=modules, moe=moe,
                    params=params, dtype=dtype)

"""Makes the NVFP4 checkpoint fixtures under tests/data/checkpoints/ with the real tools.

Not run in CI: it needs torch and the quantization tools, which the project does not depend on.
Run it with a separate virtual environment (Python 3.11 here):

  python3 -m venv /work/fixtures-venv
  /work/fixtures-venv/bin/pip install torch==2.13.0     # first: a CPU wheel, no CUDA download
  /work/fixtures-venv/bin/pip install nvidia-modelopt llmcompressor
  /work/fixtures-venv/bin/python scripts/make_fixtures.py [--out tests/data/checkpoints]

Versions these fixtures were made with (pinned; other versions may write other bytes):
  torch==2.13.0+cpu, transformers==5.17.0, nvidia-modelopt==0.47.0, llmcompressor==0.14.0.1,
  compressed-tensors==0.19.0, tokenizers==0.23.3, datasets==5.2.0, safetensors==0.8.0.

Every fixture directory holds what the tool wrote (config.json, hf_quant_config.json for ModelOpt,
model.safetensors or shards + model.safetensors.index.json, ...) plus ``reference.safetensors``,
written by this script from the tools' own code, never from jax_nvfp4:

* ``<module>.original``: the unquantized bf16 weight of each quantized Linear ([N, K]), read from
  the tiny model before quantization (per expert for MoE experts).
* ``<module>.fake_quant``: the tool's dequantization of the checkpoint's tensors, bf16 [N, K]:
  ModelOpt NVFP4 -> ``NVFP4QTensor.dequantize(dtype=bfloat16)`` (fp4 * (f32 scale * ws2) in f32,
  then bf16); ModelOpt FP8 -> ``FP8QTensor.dequantize(dtype=float32)`` cast to bf16 (the tool's
  bf16 path would round the f32 scale to bf16 first; engines apply the f32 scale); the FP8
  weight quantizer's own fake-quant (it runs on CPU) is compared and the difference printed.
  compressed-tensors -> ``NVFP4PackedCompressor.decompress`` (fp4 * (scale / weight_global_scale)
  in f32, then bf16).

ModelOpt's NVFP4 fake-quant forward is CUDA-only, but calibration and export run on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile

import torch

SEED = 1234
VOCAB = 128


def _llama(num_layers: int):
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(SEED)
  # intermediate 176 = 11 * 16: a multiple of 16 but not of 64.
  cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176,
                    num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, max_position_embeddings=64, tie_word_embeddings=False)
  cfg.architectures = ["LlamaForCausalLM"]
  return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _qwen3_moe():
  from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
  torch.manual_seed(SEED + 1)
  # moe_intermediate 48 = 3 * 16: not a multiple of 64.
  cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       moe_intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                       norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False)
  cfg.architectures = ["Qwen3MoeForCausalLM"]
  model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
  with torch.no_grad():  # make the router non-trivial whatever the initializer did
    for layer in model.model.layers:
      g = torch.Generator().manual_seed(SEED + 2)
      layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=g) * 0.1)
  return model


def _save_base(model, path: str) -> dict[str, torch.Tensor]:
  """Saves the unquantized model with a tiny local tokenizer; returns its checkpoint tensors."""
  from safetensors.torch import load_file
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  model.save_pretrained(path)
  vocab = {f"<{i}>": i for i in range(VOCAB)}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", pad_token="<1>",
                                 eos_token="<2>", bos_token="<3>")
  fast.save_pretrained(path)
  tensors = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      tensors.update(load_file(os.path.join(path, f)))
  return tensors


def _calib_ids(n: int = 4, length: int = 16) -> torch.Tensor:
  g = torch.Generator().manual_seed(SEED + 3)
  return torch.randint(4, VOCAB, (n, length), generator=g)


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
  from safetensors.torch import load_file
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors") and f != "reference.safetensors":
      out.update(load_file(os.path.join(path, f)))
  return out


def _copy_tool_output(src: str, dst: str) -> None:
  if os.path.exists(dst):
    shutil.rmtree(dst)
  os.makedirs(dst)
  for f in sorted(os.listdir(src)):
    if f.startswith("tokenizer") or f in ("special_tokens_map.json", "chat_template.jinja"):
      continue  # the tokenizer is ours, not the tool's
    shutil.copy(os.path.join(src, f), os.path.join(dst, f))


def _write_reference(dst: str, ref: dict[str, torch.Tensor], note: str) -> None:
  from safetensors.torch import save_file
  ref = {k: v.contiguous() for k, v in sorted(ref.items())}
  save_file(ref, os.path.join(dst, "reference.safetensors"), metadata={"note": note})


# --------------------------------------------------------------------------------------------
# NVIDIA ModelOpt
# --------------------------------------------------------------------------------------------

def _modelopt_reference(ckpt: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                        model=None) -> dict[str, torch.Tensor]:
  """The tool's dequantization of each quantized module of an exported ModelOpt checkpoint."""
  from modelopt.torch.quantization.qtensor import FP8QTensor, NVFP4QTensor
  ref = {}
  for name, w in ckpt.items():
    if not name.endswith(".weight") or name + "_scale" not in ckpt:
      continue
    mod = name[:-len(".weight")]
    scale = ckpt[mod + ".weight_scale"]
    if w.dtype == torch.uint8:  # NVFP4
      n, half_k = w.shape
      q = NVFP4QTensor(torch.Size((n, 2 * half_k)), torch.bfloat16, w)
      deq = q.dequantize(dtype=torch.bfloat16, scale=scale,
                         double_scale=ckpt[mod + ".weight_scale_2"], block_sizes={-1: 16})
    elif w.dtype == torch.float8_e4m3fn:  # FP8 per tensor
      q = FP8QTensor(w.shape, torch.bfloat16, w)
      deq = q.dequantize(dtype=torch.float32, scale=scale).to(torch.bfloat16)
      if model is not None:
        _check_fp8_quantizer(model, mod, base[name], deq)
    else:
      raise SystemExit(f"unexpected quantized weight dtype {w.dtype} for {name}")
    ref[mod + ".fake_quant"] = deq
    ref[mod + ".original"] = base[name]
  return ref


def _check_fp8_quantizer(model, mod: str, original: torch.Tensor, deq: torch.Tensor) -> None:
  """Compares FP8QTensor's dequant with the module's own FP8 fake-quant (which runs on CPU).

  Informational: the fake-quant multiplies by 448/amax and back by 1/(448/amax), while the
  export stores weight_scale = amax/448, so the two can differ in the last bits; the checkpoint's
  meaning is ``fp8 * weight_scale``.
  """
  module = model.get_submodule(mod)
  try:
    with torch.no_grad():
      fq = module.weight_quantizer(original.float()).to(torch.bfloat16)
  except Exception as e:  # noqa: BLE001 - informational only
    print(f"  note: FP8 weight fake-quant of {mod} did not run on CPU: {e!r}")
    return
  diff = (fq.float() - deq.float()).abs()
  rel = float((diff / deq.float().abs().clamp_min(1e-30)).max())
  print(f"  FP8 fake-quant vs exported dequant of {mod}: {int((diff > 0).sum())}/{diff.numel()} "
        f"elements differ, max rel diff {rel:.2e}")


def _modelopt(name: str, out: str, model, cfg, base: dict, *, max_shard_size=None) -> None:
  import modelopt.torch.quantization as mtq
  from modelopt.torch.export import export_hf_checkpoint
  ids = _calib_ids()

  def forward_loop(m):
    with torch.no_grad():
      m(ids)

  model = mtq.quantize(model, cfg, forward_loop)
  with tempfile.TemporaryDirectory() as tmp:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=tmp, **kwargs)
    dst = os.path.join(out, name)
    _copy_tool_output(tmp, dst)
  ckpt = _read_checkpoint(dst)
  ref = _modelopt_reference(ckpt, base, model)
  _write_reference(dst, ref, "ModelOpt NVFP4QTensor/FP8QTensor dequant of the exported tensors")
  print(f"{name}: {len(ref) // 2} quantized modules")


def make_modelopt(out: str, work: str) -> None:
  import modelopt.torch.quantization as mtq

  m = _llama(1)
  base = _save_base(m, os.path.join(work, "llama1"))
  _modelopt("modelopt_nvfp4_dense", out, m, mtq.NVFP4_DEFAULT_CFG, base)

  # Two layers, small shards: the sharded fixture (model.safetensors.index.json).
  m = _llama(2)
  base = _save_base(m, os.path.join(work, "llama2"))
  _modelopt("modelopt_w4a16_sharded", out, m, mtq.W4A16_NVFP4_CFG, base, max_shard_size="48KB")

  # MIXED_PRECISION: FP8 attention, NVFP4 MLP experts (W4A4 config, as released checkpoints are).
  m = _qwen3_moe()
  base = _save_base(m, os.path.join(work, "moe_mo"))
  cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
  fp8 = {"num_bits": (4, 3), "axis": None}
  cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [
      {"quantizer_name": "*self_attn*weight_quantizer", "cfg": fp8},
      {"quantizer_name": "*self_attn*input_quantizer", "cfg": fp8},
  ]
  _modelopt("modelopt_mixed_moe", out, m, cfg, base)


# --------------------------------------------------------------------------------------------
# llm-compressor / compressed-tensors
# --------------------------------------------------------------------------------------------

def _ct_reference(dst: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
  from compressed_tensors.quantization import QuantizationConfig
  with open(os.path.join(dst, "config.json")) as f:
    qcfg = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
  schemes = list(qcfg.config_groups.values())
  if len(schemes) != 1:
    raise SystemExit(f"expected one config group, got {len(schemes)}")
  scheme = schemes[0]
  ckpt = _read_checkpoint(dst)
  ref = {}
  for name in ckpt:
    if not name.endswith(".weight_packed"):
      continue
    mod = name[:-len(".weight_packed")]
    keys = ("weight_packed", "weight_scale", "weight_global_scale")
    state = {k: ckpt[f"{mod}.{k}"] for k in keys}
    deq = NVFP4PackedCompressor.decompress(state, scheme)["weight"]
    if deq.dtype != torch.bfloat16:
      raise SystemExit(f"decompress returned {deq.dtype} for {mod}")
    ref[mod + ".fake_quant"] = deq
    ref[mod + ".original"] = base[mod + ".weight"]
  return ref


def _llmcompressor(name: str, out: str, base_dir: str, base: dict, scheme: str,
                   ignore: list[str], calibrate: bool) -> None:
  from llmcompressor import oneshot
  from llmcompressor.modifiers.quantization import QuantizationModifier
  recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore)
  kwargs = {}
  if calibrate:
    from datasets import Dataset
    ids = _calib_ids()
    kwargs = dict(dataset=Dataset.from_dict({"input_ids": ids.tolist()}),
                  num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
  model = oneshot(model=base_dir, recipe=recipe, **kwargs)
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp, save_compressed=True)
    dst = os.path.join(out, name)
    _copy_tool_output(tmp, dst)
  ref = _ct_reference(dst, base)
  _write_reference(dst, ref, "compressed-tensors NVFP4PackedCompressor.decompress of the tensors")
  print(f"{name}: {len(ref) // 2} quantized modules")


def make_compressed_tensors(out: str, work: str) -> None:
  d = os.path.join(work, "ct_llama")
  base = _save_base(_llama(1), d)
  _llmcompressor("ct_nvfp4a16_dense", out, d, base, "NVFP4A16", ["lm_head"], calibrate=False)
  _llmcompressor("ct_nvfp4_dense", out, d, base, "NVFP4", ["lm_head"], calibrate=True)
  d = os.path.join(work, "ct_moe")
  base = _save_base(_qwen3_moe(), d)
  _llmcompressor("ct_nvfp4a16_moe", out, d, base, "NVFP4A16", ["lm_head", "re:.*mlp.gate$"],
                 calibrate=False)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  here = os.path.dirname(os.path.abspath(__file__))
  parser.add_argument("--out", default=os.path.join(here, "..", "tests", "data", "checkpoints"))
  parser.add_argument("--only", choices=["modelopt", "compressed-tensors"], default=None)
  args = parser.parse_args(argv)
  torch.use_deterministic_algorithms(True)
  os.makedirs(args.out, exist_ok=True)
  with tempfile.TemporaryDirectory() as work:
    if args.only in (None, "modelopt"):
      make_modelopt(args.out, work)
    if args.only in (None, "compressed-tensors"):
      make_compressed_tensors(args.out, work)
  return 0


if __name__ == "__main__":
  sys.exit(main())

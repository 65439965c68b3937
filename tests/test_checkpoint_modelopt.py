"""ModelOpt checkpoints written by nvidia-modelopt 0.47.0 (scripts/make_fixtures.py): the loaded
weights against the tool's own dequantization, jax_nvfp4's quantize() against the tool's bytes,
small forwards, and gate/up global scales that differ (synthetic)."""

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.checkpoint import FP8Weight, dequantize_fp8, fp8_matmul, load_checkpoint
from tests import checkpoint_fixtures as fx
from tests import numpy_reference as npref


def _dequant(rec):
  if rec.format == "nvfp4":
    return nf.dequantize(rec.weight, jnp.bfloat16)
  return dequantize_fp8(rec.weight, jnp.bfloat16)


def _expert_views(ck):
  """module name of each per-expert Linear -> its dequantized bf16 weight, from the stacks."""
  out = {}
  for prefix, ex in ck.moe.items():
    w13 = np.asarray(_dequant(ex.w13))
    w2 = np.asarray(_dequant(ex.w2))
    inter = w2.shape[2]
    for e in range(ex.num_experts):
      out[f"{prefix}.{e}.gate_proj"] = w13[e, :inter]
      out[f"{prefix}.{e}.up_proj"] = w13[e, inter:]
      out[f"{prefix}.{e}.down_proj"] = w2[e]
  return out


@pytest.mark.parametrize("name", fx.MODELOPT)
def test_dequantized_weights_equal_modelopt_dequantization(name):
  ck = load_checkpoint(fx.fixture(name))
  ref = fx.reference(name)
  experts = _expert_views(ck)
  modules = fx.ref_modules(ref)
  assert len(modules) >= 7
  for module in modules:
    got = experts[module] if module in experts else _dequant(ck.modules[module])
    # ModelOpt's NVFP4QTensor.dequantize maps code 8 (-0) to +0.0; ours keeps -0.0. Every
    # other bit is identical.
    fx.assert_same_bits(got, ref[module + ".fake_quant"], zero_sign=False, what=module)
  assert all(r.exact and r.producer == "modelopt" for r in ck.modules.values())
  non_expert = {m for m in modules if m not in experts}
  assert non_expert == {m for m in ck.modules if ".experts.w" not in m}


def test_records_formats_and_activation_scales():
  ck = load_checkpoint(fx.fixture("modelopt_nvfp4_dense"))
  raw = fx.read_dir(fx.fixture("modelopt_nvfp4_dense"))
  assert ck.quant_algo == "NVFP4" and ck.activation_format == "nvfp4"
  rec = ck.modules["model.layers.0.mlp.down_proj"]
  assert rec.format == "nvfp4" and rec.quant_algo == "NVFP4" and rec.activation_format == "nvfp4"
  name = "model.layers.0.mlp.down_proj.input_scale"
  assert rec.activation_scales[name] == raw[name]  # recorded as stored, never used
  np.testing.assert_array_equal(np.asarray(rec.weight.packed),
                                raw["model.layers.0.mlp.down_proj.weight"])
  assert np.asarray(rec.weight.global_scale) == raw["model.layers.0.mlp.down_proj.weight_scale_2"]
  assert rec.weight.dtype == jnp.bfloat16 and rec.shape == (64, 176)
  assert set(ck.params) == {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
                            "model.layers.0.input_layernorm.weight",
                            "model.layers.0.post_attention_layernorm.weight"}
  fx.assert_same_bits(ck.params["lm_head.weight"], raw["lm_head.weight"])

  w4a16 = load_checkpoint(fx.fixture("modelopt_w4a16_sharded"))
  assert w4a16.quant_algo == "W4A16_NVFP4" and w4a16.activation_format is None
  assert all(not r.activation_scales for r in w4a16.modules.values())
  assert len(w4a16.modules) == 14  # 2 layers from 2 shards

  mixed = load_checkpoint(fx.fixture("modelopt_mixed_moe"))
  assert mixed.quant_algo == "MIXED_PRECISION"
  q = mixed.modules["model.layers.0.self_attn.q_proj"]
  assert isinstance(q.weight, FP8Weight) and q.quant_algo == "FP8" and q.activation_format == "fp8"
  ex = mixed.moe["model.layers.0.mlp.experts"]
  assert ex.fused and ex.num_experts == 4 and ex.w13.quant_algo == "NVFP4"
  assert ex.w13.shape == (4, 96, 64) and ex.w2.shape == (4, 64, 48)
  assert "model.layers.0.mlp.gate.weight" in mixed.params  # the router stays bf16


def _sibling_key(module: str) -> str:
  m = re.match(r"(.*)\.(q_proj|k_proj|v_proj)$", module)
  if m:
    return m.group(1) + ".qkv"
  m = re.match(r"(.*)\.(gate_proj|up_proj)$", module)
  return m.group(1) + ".gate_up" if m else module


@pytest.mark.parametrize("name", ["modelopt_nvfp4_dense", "modelopt_w4a16_sharded",
                                  "modelopt_mixed_moe"])
def test_quantize_reproduces_modelopt_bytes(name):
  # On the CPU, whose float32 division is IEEE-exact like the tool's (a GPU's may be an ulp off).
  with jax.default_device(jax.devices("cpu")[0]):
    _quantize_reproduces(name)


def _quantize_reproduces(name):
  raw = fx.read_dir(fx.fixture(name))
  ref = fx.reference(name)
  groups = {}
  for module in fx.ref_modules(ref):
    if raw[module + ".weight"].dtype == np.uint8:  # NVFP4 (FP8 layers are not ours to quantize)
      groups.setdefault(_sibling_key(module), []).append(module)
  assert len(groups) >= 4
  for members in groups.values():
    originals = [ref[m + ".original"].astype(np.float32) for m in members]
    # Siblings that read one input share one global amax (q/k/v, gate/up).
    amax = np.float32(max(np.abs(o).max() for o in originals))
    gs = amax / np.float32(6 * 448)
    for m, w in zip(members, originals):
      assert raw[m + ".weight_scale_2"] == gs, (m, raw[m + ".weight_scale_2"], gs)
      q = nf.quantize(jnp.asarray(ref[m + ".original"]), global_scale=jnp.float32(gs))
      np.testing.assert_array_equal(np.asarray(q.packed), raw[m + ".weight"], err_msg=m)
      fx.assert_same_bits(np.asarray(q.scales), raw[m + ".weight_scale"], what=m)
      # The independent float64/ml_dtypes oracle agrees on the codes too.
      codes, _, _ = npref.quantize(w, gs)
      np.testing.assert_array_equal(npref.codes_from_packed(raw[m + ".weight"]), codes,
                                    err_msg=m)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _silu(x):
  return x / (1 + np.exp(-x))


def test_mlp_forward_matches_tool_weights(rng):
  name = "modelopt_nvfp4_dense"
  ck = load_checkpoint(fx.fixture(name))
  ref = fx.reference(name)
  p = "model.layers.0.mlp."
  x = jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16)

  @jax.jit
  def mlp(x, gate, up, down):
    g = nf.nvfp4_matmul(x, gate)
    u = nf.nvfp4_matmul(x, up)
    return nf.nvfp4_matmul((jax.nn.silu(g.astype(jnp.float32)) * u).astype(x.dtype), down)

  ours = mlp(x, ck.weight(p + "gate_proj"), ck.weight(p + "up_proj"), ck.weight(p + "down_proj"))
  x64 = np.asarray(x, np.float64)
  w = {k: ref[p + k + ".fake_quant"].astype(np.float64) for k in ("gate_proj", "up_proj",
                                                                   "down_proj")}
  want = (_silu(x64 @ w["gate_proj"].T) * (x64 @ w["up_proj"].T)) @ w["down_proj"].T
  assert ours.shape == (5, 64) and ours.dtype == jnp.bfloat16
  assert _rel(ours, want) < 1e-2
  # Prepared (kernel-layout) weights give the same layer.
  prepared = mlp(x, *(nf.prepare(ck.weight(p + k)) for k in ("gate_proj", "up_proj",
                                                              "down_proj")))
  assert _rel(prepared, want) < 1e-2


def test_fp8_attention_projection_matches_tool_weights(rng):
  name = "modelopt_mixed_moe"
  ck = load_checkpoint(fx.fixture(name))
  ref = fx.reference(name)
  x = jnp.asarray(rng.standard_normal((6, 64)), jnp.bfloat16)
  for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
    m = f"model.layers.0.self_attn.{proj}"
    y = jax.jit(fp8_matmul)(x, ck.weight(m))
    want = np.asarray(x, np.float64) @ ref[m + ".fake_quant"].astype(np.float64).T
    assert _rel(y, want) < 1e-2, proj


def test_fp8_matmul_semantics(rng):
  w = rng.standard_normal((24, 32)).astype(ml_dtypes.float8_e4m3fn)
  scale = np.float32(0.0123)
  fw = FP8Weight(jnp.asarray(w), jnp.float32(scale))
  bias = rng.standard_normal(24).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((2, 3, 32)), jnp.float16)
  y = fp8_matmul(x, fw, jnp.asarray(bias))
  want = np.asarray(x, np.float64) @ (w.astype(np.float64) * np.float64(scale)).T + bias
  assert y.shape == (2, 3, 24) and y.dtype == jnp.float16
  assert _rel(y, want) < 2e-3
  fx.assert_same_bits(dequantize_fp8(fw, jnp.float32),
                      (w.astype(np.float32) * scale).astype(np.float32))
  with pytest.raises(ValueError, match="K = 32"):
    fp8_matmul(x[..., :16], fw)
  with pytest.raises(TypeError, match="bfloat16 or float16"):
    fp8_matmul(x.astype(jnp.float32), fw)
  with pytest.raises(TypeError, match="float8_e4m3fn"):
    fp8_matmul(x, FP8Weight(jnp.asarray(w, jnp.float32), jnp.float32(scale)))


def _numpy_moe(x, router, weights, top_k):
  """float64 Qwen3-MoE block: softmax -> top-k -> renormalize -> SwiGLU experts."""
  logits = x @ router.T
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ids = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    w = probs[t, ids[t]] / probs[t, ids[t]].sum()
    for j, e in enumerate(ids[t]):
      g, u, d = weights[e]
      out[t] += w[j] * ((_silu(x[t] @ g.T) * (x[t] @ u.T)) @ d.T)
  return out


def moe_check(name, rng):
  """The loaded MoE block (fused_moe, or NumPy when it is absent) vs the tool's weights."""
  ck = load_checkpoint(fx.fixture(name))
  ref = fx.reference(name)
  prefix = "model.layers.0.mlp.experts"
  ex = ck.moe[prefix]
  router = np.asarray(ck.params["model.layers.0.mlp.gate.weight"], np.float64)
  x = jnp.asarray(rng.standard_normal((9, 64)), jnp.bfloat16)
  x64 = np.asarray(x, np.float64)
  tool = [tuple(ref[f"{prefix}.{e}.{k}.fake_quant"].astype(np.float64)
                for k in ("gate_proj", "up_proj", "down_proj")) for e in range(ex.num_experts)]
  want = _numpy_moe(x64, router, tool, top_k=2)
  w13 = np.asarray(_dequant(ex.w13), np.float64)
  w2 = np.asarray(_dequant(ex.w2), np.float64)
  inter = w2.shape[2]
  loaded = [(w13[e, :inter], w13[e, inter:], w2[e]) for e in range(ex.num_experts)]
  np.testing.assert_array_equal(_numpy_moe(x64, router, loaded, top_k=2), want)
  try:
    from jax_nvfp4.ops.moe import fused_moe
  except ImportError:
    return
  logits = jnp.asarray(x64 @ router.T, jnp.float32)
  y = jax.jit(lambda x, a, b, lg: fused_moe(x, a, b, router_logits=lg, top_k=2))(
      x, ex.w13.weight, ex.w2.weight, logits)
  assert y.shape == x.shape and y.dtype == jnp.bfloat16
  assert _rel(y, want) < 2e-2


def test_moe_block_matches_tool_weights(rng):
  moe_check("modelopt_mixed_moe", rng)


# ----------------------------------------------------------------------------- gate/up scales

def _synthetic_moe(path, rng, up_ratio):
  """A ModelOpt NVFP4 MoE checkpoint (2 experts) whose up_proj global scale is gate's x ratio."""
  os.makedirs(path)
  hidden, inter, num = 32, 16, 2
  tensors, truth = {}, {}
  for e in range(num):
    gs_gate = np.float32(rng.uniform(1e-4, 3e-4))
    for proj, (n, k), gs in (("gate_proj", (inter, hidden), gs_gate),
                             ("up_proj", (inter, hidden), np.float32(gs_gate * up_ratio)),
                             ("down_proj", (hidden, inter), np.float32(2e-4))):
      m = f"model.layers.0.mlp.experts.{e}.{proj}"
      codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
      scales = rng.uniform(8, 200, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
      tensors[m + ".weight"] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
      tensors[m + ".weight_scale"] = scales
      tensors[m + ".weight_scale_2"] = np.asarray(gs, np.float32)
      # ModelOpt's dequantization: e2m1 * (float32(scale) * weight_scale_2) in f32, then bf16.
      factor = scales.astype(np.float32) * gs
      vals = npref.E2M1[codes].astype(np.float32) * np.repeat(factor, 16, axis=1)
      truth[m] = vals.astype(np.float32).astype(ml_dtypes.bfloat16)
  fx.write_file(os.path.join(path, "model.safetensors"), tensors)
  with open(os.path.join(path, "hf_quant_config.json"), "w") as f:
    json.dump({"producer": {"name": "modelopt", "version": "test"},
               "quantization": {"quant_algo": "W4A16_NVFP4", "group_size": 16,
                                "kv_cache_quant_algo": None, "exclude_modules": []}}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"hidden_size": hidden, "moe_intermediate_size": inter, "num_experts": num}, f)
  return truth


def test_gate_up_scales_differing_by_a_power_of_two_fold_exactly(tmp_path, rng):
  truth = _synthetic_moe(str(tmp_path / "ck"), rng, up_ratio=2.0)
  ck = load_checkpoint(str(tmp_path / "ck"))
  ex = ck.moe["model.layers.0.mlp.experts"]
  assert ex.fused and "refolded" in ex.w13.note and ex.w13.exact
  views = _expert_views(ck)
  for m, want in truth.items():
    fx.assert_same_bits(views[m], want, what=m)


def test_gate_up_scales_that_cannot_fold_stay_separate(tmp_path, rng, caplog):
  truth = _synthetic_moe(str(tmp_path / "ck"), rng, up_ratio=1.37)
  with caplog.at_level(logging.WARNING, logger="jax_nvfp4"):
    ck = load_checkpoint(str(tmp_path / "ck"))
  ex = ck.moe["model.layers.0.mlp.experts"]
  assert not ex.fused and ex.w13 is None and "separate" in ex.note
  assert "separate" in caplog.text
  assert ex.w1.shape == ex.w3.shape == (2, 16, 32)
  gate, up, down = (np.asarray(nf.dequantize(r.weight, jnp.bfloat16)) for r in (ex.w1, ex.w3,
                                                                                ex.w2))
  for e in range(2):
    p = f"model.layers.0.mlp.experts.{e}."
    fx.assert_same_bits(gate[e], truth[p + "gate_proj"], what="gate")
    fx.assert_same_bits(up[e], truth[p + "up_proj"], what="up")
    fx.assert_same_bits(down[e], truth[p + "down_proj"], what="down")
    # each keeps its own global scale: never one picked for both
    assert np.asarray(ex.w1.weight.global_scale)[e] != np.asarray(ex.w3.weight.global_scale)[e]


def _edit_copy(path, tensors_fn=None, config_fn=None):
  """A writable copy of modelopt_nvfp4_dense at ``path`` with its tensors / config.json edited."""
  fx.copy("modelopt_nvfp4_dense", path)
  if tensors_fn is not None:
    tensors = dict(fx.read_file(os.path.join(path, "model.safetensors")))
    tensors_fn(tensors)
    fx.write_file(os.path.join(path, "model.safetensors"), tensors)
  if config_fn is not None:
    with open(os.path.join(path, "config.json")) as f:
      config = json.load(f)
    config_fn(config)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config, f)
  return path


# ModelOpt's convert_hf_quant_config_format names the KV algorithm kv_cache_scheme in
# config.json: the algorithm's name, or (newer versions, FP8) an 8-bit float scheme object.
@pytest.mark.parametrize("scheme", ["FP8", {"dynamic": False, "num_bits": 8, "type": "float"}])
def test_config_json_kv_cache_scheme(tmp_path, scheme):
  kv = {"model.layers.0.self_attn.k_proj.k_scale": np.float32(0.5),
        "model.layers.0.self_attn.v_proj.v_scale": np.float32(0.25)}
  path = _edit_copy(str(tmp_path / "ck"), lambda t: t.update(kv),
                    lambda c: c["quantization_config"].update(kv_cache_scheme=scheme))
  os.remove(os.path.join(path, "hf_quant_config.json"))  # config.json describes it alone
  ck = load_checkpoint(path)
  assert ck.quant_config["kv_cache_quant_algo"] == "FP8"
  assert ck.quant_config["source"] == "config.json quantization_config"
  for name, value in kv.items():
    assert np.asarray(ck.params[name]) == value  # KV scales stay plain tensors
  assert set(ck.modules) == set(load_checkpoint(fx.fixture("modelopt_nvfp4_dense")).modules)


def test_mtp_layers_after_the_decoder_layers_load(tmp_path):
  """DeepSeek-V3/R1 and GLM-4.5 store their multi-token-prediction layer as
  model.layers.<num_hidden_layers> (config.json num_nextn_predict_layers = 1)."""
  def add_layer_1(t):
    # Layer 1 differs from layer 0 in every array of its Linears, so reading layer 0's tensors
    # for it would show.
    for k, v in list(t.items()):
      if not k.startswith("model.layers.0."):
        continue
      v = np.array(v)
      if k.endswith(".weight") and v.dtype == np.uint8:        # packed codes
        v = v ^ np.uint8(0x11)
      elif k.endswith(".weight_scale_2"):                      # the global scale
        v = v * np.float32(2)
      elif k.endswith(".weight_scale"):                        # E4M3 block scales, halved
        v = (v.astype(np.float32) / 2).astype(v.dtype)
      t[k.replace("model.layers.0.", "model.layers.1.")] = v

  path = _edit_copy(str(tmp_path / "ck"), add_layer_1, lambda c: c.update(
      model_type="deepseek_v3", num_hidden_layers=1, num_nextn_predict_layers=1))
  ck = load_checkpoint(path)
  raw = fx.read_dir(path)
  mtp = ck.modules["model.layers.1.mlp.down_proj"]
  layer0 = ck.modules["model.layers.0.mlp.down_proj"]
  np.testing.assert_array_equal(np.asarray(mtp.weight.packed),
                                raw["model.layers.1.mlp.down_proj.weight"])
  np.testing.assert_array_equal(np.asarray(mtp.weight.scales).view(np.uint8),
                                raw["model.layers.1.mlp.down_proj.weight_scale"].view(np.uint8))
  assert float(mtp.weight.global_scale) == 2 * float(layer0.weight.global_scale)
  assert not np.array_equal(np.asarray(mtp.weight.packed), np.asarray(layer0.weight.packed))
  assert "model.layers.1.input_layernorm.weight" in ck.params

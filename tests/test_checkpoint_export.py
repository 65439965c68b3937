"""export_modelopt: jax_nvfp4 weights -> a ModelOpt W4A16_NVFP4 checkpoint that reloads with the
same bytes and follows what the real tool writes."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.checkpoint import export_modelopt, load_checkpoint
from tests import checkpoint_fixtures as fx


def _same_weights(a, b):
  for leaf in ("packed", "scales", "global_scale"):
    fx.assert_same_bits(np.asarray(getattr(a, leaf)), np.asarray(getattr(b, leaf)), what=leaf)


def test_exporting_the_tools_w4a16_checkpoint_reproduces_its_tensors(tmp_path):
  src = fx.fixture("modelopt_w4a16_sharded")
  out = str(tmp_path / "out")
  export_modelopt(out, load_checkpoint(src), max_shard_size=48 * 1024)
  want, got = fx.read_dir(src), fx.read_dir(out)
  assert sorted(got) == sorted(want)  # the same names: the tool's conventions
  for name in want:
    fx.assert_same_bits(got[name], want[name], what=name)
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert sorted(index["weight_map"]) == sorted(want) and len(set(index["weight_map"].values())) > 1


def test_json_follows_the_tool(tmp_path):
  src = fx.fixture("modelopt_w4a16_sharded")
  out = str(tmp_path / "out")
  export_modelopt(out, load_checkpoint(src))
  tool_hf = json.load(open(os.path.join(src, "hf_quant_config.json")))
  ours_hf = json.load(open(os.path.join(out, "hf_quant_config.json")))
  assert set(ours_hf) == set(tool_hf) and set(ours_hf["quantization"]) == set(
      tool_hf["quantization"])
  assert ours_hf["producer"]["name"] == "modelopt"
  assert ours_hf["quantization"]["quant_algo"] == "W4A16_NVFP4"
  assert ours_hf["quantization"]["group_size"] == 16
  assert ours_hf["quantization"]["kv_cache_quant_algo"] is None
  assert set(tool_hf["quantization"]["exclude_modules"]) <= set(
      ours_hf["quantization"]["exclude_modules"])
  tool_cfg = json.load(open(os.path.join(src, "config.json")))
  ours_cfg = json.load(open(os.path.join(out, "config.json")))
  tq, oq = tool_cfg.pop("quantization_config"), ours_cfg.pop("quantization_config")
  assert ours_cfg == tool_cfg  # the model config is carried over unchanged
  assert set(oq) == set(tq) and oq["quant_method"] == "modelopt"
  assert oq["config_groups"] == tq["config_groups"]
  assert oq["quant_algo"] == tq["quant_algo"] == "W4A16_NVFP4"


def test_w4a4_checkpoint_exports_weight_only_with_the_same_weights(tmp_path):
  src = load_checkpoint(fx.fixture("modelopt_nvfp4_dense"))
  out = str(tmp_path / "out")
  export_modelopt(out, src)
  raw = fx.read_dir(out)
  assert not [n for n in raw if n.endswith("input_scale")]  # weight-only: no activation scales
  back = load_checkpoint(out)
  assert back.quant_algo == "W4A16_NVFP4" and back.activation_format is None
  assert set(back.modules) == set(src.modules)
  for name, rec in src.modules.items():
    _same_weights(back.modules[name].weight, rec.weight)
  for name, value in src.params.items():
    fx.assert_same_bits(back.params[name], value, what=name)


def test_compressed_tensors_moe_exports_to_modelopt_and_stays_exact(tmp_path):
  name = "ct_nvfp4a16_moe"
  src = load_checkpoint(fx.fixture(name))
  out = str(tmp_path / "out")
  export_modelopt(out, src)
  raw = fx.read_dir(out)
  p = "model.layers.0.mlp.experts.3."
  assert raw[p + "gate_proj.weight"].shape == (48, 32)
  assert raw[p + "gate_proj.weight_scale_2"] == raw[p + "up_proj.weight_scale_2"]  # shared
  back = load_checkpoint(out)
  ex, ex0 = back.moe["model.layers.0.mlp.experts"], src.moe["model.layers.0.mlp.experts"]
  _same_weights(ex.w13.weight, ex0.w13.weight)
  _same_weights(ex.w2.weight, ex0.w2.weight)
  ref = fx.reference(name)
  w13 = np.asarray(nf.dequantize(ex.w13.weight, jnp.bfloat16))
  fx.assert_same_bits(w13[3, 48:], ref[p + "up_proj.fake_quant"], what="up after export")


def test_quantized_weights_round_trip(tmp_path, rng):
  modules = {
      "model.layers.0.mlp.down_proj": nf.quantize(jnp.asarray(
          rng.standard_normal((64, 176)) * 0.05, jnp.bfloat16)),
      "model.layers.0.mlp.up_proj": nf.quantize(jnp.asarray(
          rng.standard_normal((176, 64)), jnp.bfloat16)),
      "model.layers.0.mlp.experts": (
          nf.quantize(jnp.asarray(rng.standard_normal((3, 32, 64)), jnp.bfloat16)),
          nf.quantize(jnp.asarray(rng.standard_normal((3, 64, 16)), jnp.bfloat16))),
  }
  params = {"model.embed_tokens.weight": jnp.asarray(rng.standard_normal((10, 64)), jnp.bfloat16),
            "model.norm.weight": jnp.ones((64,), jnp.bfloat16)}
  for shard in (None, 4096):
    out = str(tmp_path / f"out{shard}")
    export_modelopt(out, modules, params, config={"hidden_size": 64}, max_shard_size=shard)
    back = load_checkpoint(out)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"):
      _same_weights(back.modules[name].weight, modules[name])
    ex = back.moe["model.layers.0.mlp.experts"]
    _same_weights(ex.w13.weight, modules["model.layers.0.mlp.experts"][0])
    _same_weights(ex.w2.weight, modules["model.layers.0.mlp.experts"][1])
    for name, value in params.items():
      fx.assert_same_bits(back.params[name], value, what=name)
    hf = json.load(open(os.path.join(out, "hf_quant_config.json")))
    assert hf["quantization"]["exclude_modules"] == ["model.embed_tokens"]
    assert (len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1) == bool(shard)


def test_written_files_are_valid_safetensors(tmp_path, rng):
  safetensors = pytest.importorskip("safetensors")
  out = str(tmp_path / "out")
  w = nf.quantize(jnp.asarray(rng.standard_normal((32, 64)), jnp.float32))
  export_modelopt(out, {"a.proj": w}, {"a.norm.weight": np.ones(64, np.float32)})
  with safetensors.safe_open(os.path.join(out, "model.safetensors"), framework="np") as f:
    assert sorted(f.keys()) == ["a.norm.weight", "a.proj.weight", "a.proj.weight_scale",
                                "a.proj.weight_scale_2"]
    assert f.get_slice("a.proj.weight_scale").get_dtype() == "F8_E4M3"
    assert f.get_slice("a.proj.weight_scale").get_shape() == [32, 4]
    assert f.get_slice("a.proj.weight_scale_2").get_shape() == []
    np.testing.assert_array_equal(f.get_tensor("a.proj.weight"), np.asarray(w.packed))
    assert f.get_tensor("a.proj.weight_scale_2") == np.asarray(w.global_scale)
    assert f.metadata()["format"] == "pt"


def test_export_refuses_what_it_cannot_write(tmp_path, rng):
  with pytest.raises(TypeError, match="FP8"):
    export_modelopt(str(tmp_path / "a"), load_checkpoint(fx.fixture("modelopt_mixed_moe")))
  w = nf.quantize(jnp.asarray(rng.standard_normal((32, 64)), jnp.float32))
  export_modelopt(str(tmp_path / "b"), {"m": w})
  with pytest.raises(FileExistsError):
    export_modelopt(str(tmp_path / "b"), {"m": w})
  export_modelopt(str(tmp_path / "b"), {"m": w}, overwrite=True)
  with pytest.raises(ValueError, match="one \\[N, K\\] weight"):
    export_modelopt(str(tmp_path / "c"), {"m": nf.quantize(jnp.ones((2, 32, 64)))})
  with pytest.raises(ValueError, match="collides|belongs"):
    export_modelopt(str(tmp_path / "d"), {"m": w}, {"m.weight": np.ones((2, 2), np.float32)})


def _with_kv_scales(tmp_path, kv):
  """modelopt_nvfp4_dense with FP8 KV-cache scales added, as ModelOpt writes them."""
  path = fx.copy("modelopt_nvfp4_dense", str(tmp_path / "src"))
  tensors = dict(fx.read_file(os.path.join(path, "model.safetensors")))
  tensors.update(kv)
  fx.write_file(os.path.join(path, "model.safetensors"), tensors)
  with open(os.path.join(path, "hf_quant_config.json")) as f:
    hf = json.load(f)
  hf["quantization"]["kv_cache_quant_algo"] = "FP8"
  with open(os.path.join(path, "hf_quant_config.json"), "w") as f:
    json.dump(hf, f)
  return path


# KV scales on the projections (ModelOpt) or on the attention module (also in use).
@pytest.mark.parametrize("kv", [
    {"model.layers.0.self_attn.k_proj.k_scale": np.float32(0.5),
     "model.layers.0.self_attn.v_proj.v_scale": np.float32(0.25)},
    {"model.layers.0.self_attn.k_scale": np.float32(0.75),
     "model.layers.0.self_attn.v_scale": np.float32(0.125)}], ids=["on_proj", "on_attn"])
def test_kv_cache_scales_round_trip(tmp_path, kv):
  src = load_checkpoint(_with_kv_scales(tmp_path, kv))
  out = str(tmp_path / "out")
  export_modelopt(out, src)
  hf = json.load(open(os.path.join(out, "hf_quant_config.json")))
  assert hf["quantization"]["kv_cache_quant_algo"] == "FP8"
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["quantization_config"]["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8,
                                                           "type": "float"}
  back = load_checkpoint(out)
  for name, value in kv.items():
    fx.assert_same_bits(np.asarray(back.params[name]), np.asarray(value), what=name)
  for name, rec in src.modules.items():
    _same_weights(back.modules[name].weight, rec.weight)
  # the config.json alone (as convert_hf_quant_config_format writes it) also reloads
  os.remove(os.path.join(out, "hf_quant_config.json"))
  assert load_checkpoint(out).quant_config["kv_cache_quant_algo"] == "FP8"


def test_kv_cache_scales_need_a_known_scheme(tmp_path, rng):
  w = nf.quantize(jnp.asarray(rng.standard_normal((32, 64)), jnp.float32))
  modules = {"model.layers.0.self_attn.k_proj": w}
  params = {"model.layers.0.self_attn.k_proj.k_scale": np.float32(0.5)}
  with pytest.raises(ValueError, match="KV-cache scale.*kv_cache_quant_algo"):
    export_modelopt(str(tmp_path / "a"), modules, params)
  export_modelopt(str(tmp_path / "b"), modules, params, kv_cache_quant_algo="FP8")
  back = load_checkpoint(str(tmp_path / "b"))
  assert back.params["model.layers.0.self_attn.k_proj.k_scale"] == np.float32(0.5)
  # a source with a KV scheme but no KV scales written: null, as before
  export_modelopt(str(tmp_path / "c"), modules, kv_cache_quant_algo="FP8")
  hf = json.load(open(str(tmp_path / "c" / "hf_quant_config.json")))
  assert hf["quantization"]["kv_cache_quant_algo"] is None


def _stacked_experts(rng, e=2, h=32, i=32):
  return (nf.quantize(jnp.asarray(rng.standard_normal((e, 2 * i, h)), jnp.bfloat16)),
          nf.quantize(jnp.asarray(rng.standard_normal((e, h, i)), jnp.bfloat16)))


def test_tuple_experts_take_the_model_types_names(tmp_path, rng):
  w13, w2 = _stacked_experts(rng)
  prefix = "model.layers.0.block_sparse_moe.experts"
  mixtral = {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 32,
             "num_local_experts": 2}
  export_modelopt(str(tmp_path / "m"), {prefix: (w13, w2)}, config=mixtral)
  names = {n.rsplit(".", 2)[1] for n in fx.read_dir(str(tmp_path / "m"))}
  assert names == {"w1", "w2", "w3"}
  back = load_checkpoint(str(tmp_path / "m")).moe[prefix]
  _same_weights(back.w13.weight, w13)
  _same_weights(back.w2.weight, w2)
  # other model types (and no config) keep gate_proj/up_proj/down_proj; expert_names overrides
  for cfg, names_arg, want in (({"model_type": "qwen3_moe"}, None, "gate_proj"),
                               (None, None, "gate_proj"), (mixtral, "gate_proj", "gate_proj"),
                               ({"model_type": "qwen3_moe"}, "w1", "w1")):
    out = str(tmp_path / f"o{want}{names_arg}{bool(cfg)}")
    export_modelopt(out, {prefix: (w13, w2)}, config=cfg, expert_names=names_arg)
    assert f"{prefix}.0.{want}.weight" in fx.read_dir(out)
  with pytest.raises(ValueError, match="expert_names must be one of"):
    export_modelopt(str(tmp_path / "bad"), {prefix: (w13, w2)}, expert_names="w13")


class _Counted:
  """An array-like that records when its data is taken (np.asarray)."""

  def __init__(self, name, value, pulled):
    self.name, self.value, self.pulled = name, value, pulled
    self.shape, self.dtype = value.shape, value.dtype

  def __array__(self, dtype=None, copy=None):
    self.pulled.append(self.name)
    return self.value


def test_export_pulls_and_writes_one_shard_at_a_time(tmp_path, monkeypatch, rng):
  from jax_nvfp4.checkpoint import export as export_mod
  from jax_nvfp4.checkpoint.hf import write_safetensors
  pulled, seen_at_write = [], []
  values = {f"model.layers.{i}.input_layernorm.weight":
            rng.standard_normal(256).astype(np.float32) for i in range(6)}
  params = {n: _Counted(n, v, pulled) for n, v in values.items()}

  def spy(path, tensors, metadata=None):
    seen_at_write.append((os.path.basename(path), set(pulled), set(tensors)))
    return write_safetensors(path, tensors, metadata)

  monkeypatch.setattr(export_mod, "write_safetensors", spy)
  out = str(tmp_path / "out")
  w = nf.quantize(jnp.asarray(rng.standard_normal((32, 64)), jnp.float32))
  export_modelopt(out, {"model.layers.0.mlp.down_proj": w}, params, max_shard_size=2048)
  assert len(seen_at_write) > 2
  written = set()
  for fname, pulled_then, shard in seen_at_write:
    written |= shard
    assert pulled_then <= written, f"{fname}: data of later shards pulled before it was written"
  # each file holds exactly its tensors' bytes, as one write of that shard would
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
  meta = {"format": "pt", "writer": f"jax_nvfp4 {nf.__version__}"}
  source = dict(values)
  source.update({"model.layers.0.mlp.down_proj.weight": np.asarray(w.packed),
                 "model.layers.0.mlp.down_proj.weight_scale": np.asarray(w.scales),
                 "model.layers.0.mlp.down_proj.weight_scale_2": np.asarray(w.global_scale)})
  for fname in sorted(set(index.values())):
    ref = str(tmp_path / "ref.safetensors")
    write_safetensors(ref, {n: source[n] for n, f in index.items() if f == fname}, meta)
    assert open(os.path.join(out, fname), "rb").read() == open(ref, "rb").read(), fname

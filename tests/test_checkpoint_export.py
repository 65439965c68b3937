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

"""Malformed checkpoints (broken copies of the fixtures): clear errors naming the tensor or file,
raised before any weight data is read; plus placement, progress and the inspect command."""

import json
import os
import struct

import jax
import ml_dtypes
import numpy as np
import pytest

from jax_nvfp4 import __main__ as cli
from jax_nvfp4.checkpoint import CheckpointError, inspect_checkpoint, load_checkpoint
from jax_nvfp4.checkpoint.hf import CheckpointFiles
from tests import checkpoint_fixtures as fx

DOWN = "model.layers.0.mlp.down_proj"


def _copy(tmp_path, name="modelopt_nvfp4_dense"):
  return fx.copy(name, str(tmp_path / "ck"))


def _edit(path, fn, file="model.safetensors"):
  tensors = dict(fx.read_file(os.path.join(path, file)))
  fn(tensors)
  fx.write_file(os.path.join(path, file), tensors)


def _edit_json(path, file, fn):
  with open(os.path.join(path, file)) as f:
    data = json.load(f)
  fn(data)
  with open(os.path.join(path, file), "w") as f:
    json.dump(data, f)


@pytest.fixture
def reads(monkeypatch):
  """Records every tensor the loader reads (to show errors come before the data)."""
  seen = []
  original = CheckpointFiles.read

  def spy(self, name):
    seen.append(name)
    return original(self, name)

  monkeypatch.setattr(CheckpointFiles, "read", spy)
  return seen


def _fails(path, pattern, reads=None):
  with pytest.raises(CheckpointError, match=pattern):
    load_checkpoint(path)
  if reads is not None:
    assert reads == [], f"tensor data read before the error: {reads[:5]}"


def test_missing_tensor(tmp_path, reads):
  path = _copy(tmp_path)
  _edit(path, lambda t: t.pop(DOWN + ".weight_scale_2"))
  _fails(path, f"missing tensor '{DOWN}.weight_scale_2'", reads)


def test_missing_packed_weight_and_missing_module(tmp_path, reads):
  path = _copy(tmp_path)
  _edit(path, lambda t: t.pop(DOWN + ".weight"))
  _fails(path, f"missing tensor '{DOWN}.weight'", reads)
  path = fx.copy("ct_nvfp4a16_dense", str(tmp_path / "ct"))
  _edit(path, lambda t: [t.pop(k) for k in list(t) if k.startswith(DOWN + ".")])
  _fails(path, f"missing tensor '{DOWN}.weight'.*needs module", reads)


def test_missing_expert(tmp_path, reads):
  path = fx.copy("ct_nvfp4a16_moe", str(tmp_path / "ck"))
  p = "model.layers.0.mlp.experts.2.up_proj."
  _edit(path, lambda t: [t.pop(p + s) for s in ("weight_packed", "weight_scale",
                                                "weight_global_scale")])
  _fails(path, "missing tensor 'model.layers.0.mlp.experts.2.up_proj.weight", reads)


def test_wrong_dtype(tmp_path, reads):
  path = _copy(tmp_path)
  _edit(path, lambda t: t.update({DOWN + ".weight_scale":
                                  t[DOWN + ".weight_scale"].astype(np.float32)}))
  _fails(path, f"'{DOWN}.weight_scale'.*F8_E4M3.*got F32", reads)
  path = fx.copy("modelopt_w4a16_sharded", str(tmp_path / "sh"))
  shard = "model-00001-of-00002.safetensors"
  _edit(path, lambda t: t.update({DOWN + ".weight_scale_2": np.float16(1e-4)}), shard)
  _fails(path, f"'{DOWN}.weight_scale_2'.*must be F32", reads)


def test_wrong_shape(tmp_path, reads):
  path = _copy(tmp_path)
  _edit(path, lambda t: t.update({DOWN + ".weight_scale": t[DOWN + ".weight_scale"][:, :-1]}))
  _fails(path, f"'{DOWN}.weight_scale'.*\\[64, 11\\].*got F8_E4M3 \\[64, 10\\]", reads)


def test_shape_disagrees_with_config(tmp_path, reads):
  path = _copy(tmp_path)
  _edit_json(path, "config.json", lambda c: c.update(intermediate_size=192))
  _fails(path, "config.json implies", reads)
  path = fx.copy("ct_nvfp4a16_moe", str(tmp_path / "moe"))
  _edit_json(path, "config.json", lambda c: c.update(num_experts=3, num_local_experts=3))
  _fails(path, "expert 3 but config.json has 3 experts|has no module", reads)


def test_extra_tensor(tmp_path, reads):
  path = _copy(tmp_path)
  _edit(path, lambda t: t.update({DOWN + ".weight_zero_point": np.zeros((64, 11), np.uint8)}))
  _fails(path, f"extra tensor '{DOWN}.weight_zero_point'", reads)
  path = _copy(tmp_path / "b")
  _edit(path, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight":
                                  np.ones((4, 64), ml_dtypes.bfloat16)}))
  _fails(path, "extra tensor 'model.layers.0.mlp.extra_proj.weight'", reads)
  path = _copy(tmp_path / "c")
  _edit(path, lambda t: t.update({"model.layers.7.input_layernorm.weight":
                                  np.ones((64,), ml_dtypes.bfloat16)}))
  _fails(path, "model.layers.7.input_layernorm.weight.*num_hidden_layers = 1", reads)


def test_w4a16_checkpoint_with_activation_scale(tmp_path, reads):
  path = fx.copy("modelopt_w4a16_sharded", str(tmp_path / "ck"))
  shard = "model-00001-of-00002.safetensors"
  _edit(path, lambda t: t.update({DOWN + ".input_scale": np.float32(1.0)}), shard)
  _edit_json(path, "model.safetensors.index.json",
             lambda i: i["weight_map"].update({DOWN + ".input_scale": shard}))
  _fails(path, f"extra tensor '{DOWN}.input_scale'.*weight-only", reads)


def test_sharded_index_inconsistent(tmp_path, reads):
  path = fx.copy("modelopt_w4a16_sharded", str(tmp_path / "a"))
  _edit_json(path, "model.safetensors.index.json",
             lambda i: i["weight_map"].update({"model.layers.0.mlp.ghost.weight":
                                               "model-00001-of-00002.safetensors"}))
  _fails(path, "missing tensor 'model.layers.0.mlp.ghost.weight'", reads)
  path = fx.copy("modelopt_w4a16_sharded", str(tmp_path / "b"))
  _edit_json(path, "model.safetensors.index.json",
             lambda i: i["weight_map"].pop("model.norm.weight"))
  _fails(path, "extra tensor 'model.norm.weight'.*not in model.safetensors.index.json", reads)
  path = fx.copy("modelopt_w4a16_sharded", str(tmp_path / "c"))
  os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
  _fails(path, "model-00002-of-00002.safetensors.*missing", reads)


@pytest.mark.parametrize("file", ["config.json", "hf_quant_config.json",
                                  "model.safetensors.index.json"])
def test_bad_json(tmp_path, file, reads):
  path = fx.copy("modelopt_w4a16_sharded", str(tmp_path / "ck"))
  with open(os.path.join(path, file), "a") as f:
    f.write("\n{oops")
  _fails(path, f"{file} is not valid JSON: .* line", reads)


def test_bad_safetensors_header(tmp_path, reads):
  path = _copy(tmp_path)
  file = os.path.join(path, "model.safetensors")
  with open(file, "r+b") as f:
    f.seek(12)
    f.write(b"\xff\xfe")
  _fails(path, "model.safetensors: the safetensors header is not valid JSON", reads)
  with open(file, "wb") as f:
    f.write(b"\x01\x02")
  _fails(path, "model.safetensors: not a safetensors file", reads)


def test_overlapping_tensors(tmp_path, reads):
  path = _copy(tmp_path)
  file = os.path.join(path, "model.safetensors")
  with open(file, "rb") as f:
    raw = f.read()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  # make the norm weight alias the first 128 bytes of lm_head
  begin = header["lm_head.weight"]["data_offsets"][0]
  header["model.norm.weight"]["data_offsets"] = [begin, begin + 128]
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + raw[8 + n:])
  _fails(path, "model.safetensors: tensors .* overlap", reads)


def test_truncated_file(tmp_path, reads):
  path = _copy(tmp_path)
  file = os.path.join(path, "model.safetensors")
  size = os.path.getsize(file)
  with open(file, "r+b") as f:
    f.truncate(size - 100)
  _fails(path, "model.safetensors: tensor '.*': data_offsets", reads)


def test_unknown_quant_algo(tmp_path, reads):
  path = _copy(tmp_path)
  _edit_json(path, "hf_quant_config.json",
             lambda c: c["quantization"].update(quant_algo="INT4_AWQ"))
  _fails(path, "unsupported ModelOpt quant_algo 'INT4_AWQ'", reads)
  path = fx.copy("ct_nvfp4a16_dense", str(tmp_path / "ct"))
  _edit_json(path, "config.json",
             lambda c: c["quantization_config"].update(format="float-quantized") or
             c["quantization_config"]["config_groups"]["group_0"].update(format="float-quantized"))
  _fails(path, "unsupported compressed-tensors format 'float-quantized'", reads)
  path = fx.copy("ct_nvfp4a16_dense", str(tmp_path / "gptq"))
  _edit_json(path, "config.json", lambda c: c["quantization_config"].update(quant_method="gptq"))
  _fails(path, "unsupported quant_method 'gptq'", reads)


def test_config_marks_quantized_module_unquantized(tmp_path, reads):
  path = fx.copy("ct_nvfp4a16_dense", str(tmp_path / "ct"))
  _edit_json(path, "config.json", lambda c: c["quantization_config"]["ignore"].append(DOWN))
  _fails(path, f"module '{DOWN}' has quantization tensors.*ignore", reads)
  path = _copy(tmp_path / "mo")
  _edit_json(path, "hf_quant_config.json",
             lambda c: c["quantization"]["exclude_modules"].append("*.mlp.*"))
  _fails(path, "module 'model.layers.0.mlp.down_proj' has quantization tensors", reads)


def test_pickle_only_checkpoint(tmp_path):
  path = str(tmp_path / "ck")
  os.makedirs(path)
  with open(os.path.join(fx.fixture("modelopt_nvfp4_dense"), "config.json")) as f:
    config = f.read()
  for name, text in (("config.json", config), ("hf_quant_config.json",
                                                open(os.path.join(
                                                    fx.fixture("modelopt_nvfp4_dense"),
                                                    "hf_quant_config.json")).read())):
    with open(os.path.join(path, name), "w") as f:
      f.write(text)
  bin_file = os.path.join(path, "pytorch_model.bin")
  with open(bin_file, "wb") as f:
    f.write(b"\x80\x04 not to be unpickled")
  os.chmod(bin_file, 0)  # proof that it is never opened (as root, only the message proves it)
  _fails(path, "only pickle-based weights \\(pytorch_model.bin\\).*safetensors only")


def test_invalid_scale_values_found_before_weight_data(tmp_path, reads):
  path = _copy(tmp_path)
  _edit(path, lambda t: t.update({DOWN + ".weight_scale_2": np.float32(np.nan)}))
  _fails(path, f"'{DOWN}.weight_scale_2' must be finite and > 0")
  assert all(n.endswith(("weight_scale_2", "input_scale")) for n in reads), reads
  path = fx.copy("ct_nvfp4a16_dense", str(tmp_path / "ct"))
  _edit(path, lambda t: t.update({DOWN + ".weight_global_scale": np.array([0.0], np.float32)}))
  _fails(path, f"'{DOWN}.weight_global_scale' must be finite and > 0")


def test_nan_block_scale(tmp_path):
  path = _copy(tmp_path)

  def poison(t):
    s = t[DOWN + ".weight_scale"].copy()
    s.view(np.uint8)[3, 2] = 0x7F  # E4M3 NaN
    t[DOWN + ".weight_scale"] = s

  _edit(path, poison)
  _fails(path, f"'{DOWN}.weight_scale' \\(block scales\\) holds NaN")


def test_device_and_sharding_placement():
  dev = jax.devices()[0]
  ck = load_checkpoint(fx.fixture("ct_nvfp4a16_moe"), device=dev)
  assert ck.moe["model.layers.0.mlp.experts"].w13.weight.packed.devices() == {dev}
  asked = []

  def sharding(name, shape, dtype):
    asked.append((name, shape, str(dtype)))
    return jax.sharding.SingleDeviceSharding(dev)

  ck = load_checkpoint(fx.fixture("ct_nvfp4a16_moe"), sharding=sharding)
  names = {a[0] for a in asked}
  assert ("model.layers.0.mlp.experts.w13.packed", (4, 96, 32), "uint8") in asked
  assert "model.layers.0.mlp.experts.w2.global_scale" in names
  assert "model.embed_tokens.weight" in names and "model.layers.0.self_attn.q_proj.scales" in names
  assert ck.params["model.norm.weight"].sharding == jax.sharding.SingleDeviceSharding(dev)
  with pytest.raises(ValueError, match="not both"):
    load_checkpoint(fx.fixture("ct_nvfp4a16_moe"), device=dev, sharding=sharding)


def test_progress_counter(capsys):
  load_checkpoint(fx.fixture("modelopt_nvfp4_dense"), progress=True)
  err = capsys.readouterr().err
  assert "100%" in err or "it/s" in err or "B/s" in err
  load_checkpoint(fx.fixture("modelopt_nvfp4_dense"))
  assert capsys.readouterr().err == ""  # small checkpoint: quiet by default


def test_inspect_lists_modules_without_reading_weights(reads, capsys):
  summary, rows, counts = inspect_checkpoint(fx.fixture("modelopt_mixed_moe"))
  assert reads == []
  assert summary["quant_algo"] == "MIXED_PRECISION" and summary["producer"] == "modelopt"
  by = {r.module: r for r in rows}
  assert by["model.layers.0.self_attn.q_proj"].format == "fp8"
  w13 = by["model.layers.0.mlp.experts.w13"]
  assert w13.format == "nvfp4" and w13.shape == (4, 96, 64) and w13.activation == "nvfp4"
  assert w13.backend in ("cuda", "reference")
  assert by["model.layers.0.mlp.gate"].format == "bf16"
  assert cli.main(["inspect", fx.fixture("ct_nvfp4a16_moe")]) == 0
  out = capsys.readouterr().out
  assert "compressed-tensors" in out and "model.layers.0.mlp.experts.w2" in out
  assert "[4, 64, 48]" in out
  assert cli.main(["inspect", fx.DATA]) == 1
  assert "not a quantized checkpoint" in capsys.readouterr().err


def test_compressed_tensors_transform_config_is_refused(tmp_path, reads):
  # llm-compressor's QuIP / SpinQuant rotate the weights; loading them unrotated is wrong.
  path = fx.copy("ct_nvfp4a16_dense", str(tmp_path / "ct"))
  hadamard = {"type": "hadamard", "apply": [{"targets": ["Linear"], "location": "weight_input",
                                             "inverse": True}]}
  _edit_json(path, "config.json", lambda c: c["quantization_config"].update(
      transform_config={"config_groups": {"v": hadamard}}))
  _fails(path, "transform_config: unsupported transform 'v' \\('hadamard'\\)", reads)
  path = fx.copy("ct_nvfp4a16_dense", str(tmp_path / "empty"))
  _edit_json(path, "config.json", lambda c: c["quantization_config"].update(transform_config={}))
  load_checkpoint(path)  # an empty transform_config changes nothing


def _unquantize_expert_down_projs(path):
  """A MoE whose expert down_proj stay bf16 (ignored by the quantization recipe)."""
  def edit(t):
    for name in [k for k in t if ".experts." in k and ".down_proj." in k]:
      if name.endswith("weight_packed"):
        n, half = t[name].shape
        t[name.rsplit(".", 1)[0] + ".weight"] = np.full((n, 2 * half), 0.5, ml_dtypes.bfloat16)
      del t[name]

  _edit(path, edit)
  _edit_json(path, "config.json",
             lambda c: c["quantization_config"]["ignore"].append("re:.*experts.*down_proj$"))


def test_unquantized_expert_projection_is_named_not_missing(tmp_path, reads):
  path = fx.copy("ct_nvfp4a16_moe", str(tmp_path / "ck"))
  _unquantize_expert_down_projs(path)
  down = "model.layers.0.mlp.experts.0.down_proj"
  _fails(path, f"expert projection '{down}' is unquantized \\('{down}.weight' is a plain "
               f"tensor\\).*mixed quantized/unquantized experts cannot be stacked.*"
               f"stack_experts=False", reads)


def test_unquantized_expert_projection_loads_without_stacking(tmp_path):
  path = fx.copy("ct_nvfp4a16_moe", str(tmp_path / "ck"))
  _unquantize_expert_down_projs(path)
  ck = load_checkpoint(path, stack_experts=False)
  assert ck.moe == {}
  src = fx.read_dir(fx.fixture("ct_nvfp4a16_moe"))
  for e in range(4):
    p = f"model.layers.0.mlp.experts.{e}."
    assert p + "down_proj" not in ck.modules
    fx.assert_same_bits(np.asarray(ck.params[p + "down_proj.weight"]),
                        np.full((64, 48), 0.5, ml_dtypes.bfloat16), what="bf16 down_proj")
    for proj in ("gate_proj", "up_proj"):
      w = ck.modules[p + proj].weight
      fx.assert_same_bits(np.asarray(w.packed), src[p + proj + ".weight_packed"], what=proj)
      fx.assert_same_bits(np.asarray(w.scales), src[p + proj + ".weight_scale"], what=proj)


def test_layers_past_the_mtp_layers_are_still_extra(tmp_path, reads):
  path = _copy(tmp_path)
  _edit_json(path, "config.json", lambda c: c.update(num_nextn_predict_layers=1))
  _edit(path, lambda t: t.update({"model.layers.2.input_layernorm.weight":
                                  np.ones((64,), ml_dtypes.bfloat16)}))
  _fails(path, "model.layers.2.input_layernorm.weight.*num_hidden_layers = 1 \\+ "
               "num_nextn_predict_layers = 1", reads)

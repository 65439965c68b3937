"""compressed-tensors nvfp4-pack-quantized checkpoints written by llm-compressor 0.14.0.1 /
compressed-tensors 0.19.0 (scripts/make_fixtures.py): bit-exact dequantization against the tool's
decompressor despite its dividing global scale, activation scales, MoE stacking and forwards."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.checkpoint import load_checkpoint
from jax_nvfp4.checkpoint.compressed_tensors import reciprocal_global_scale
from tests import checkpoint_fixtures as fx
from tests import numpy_reference as npref
from tests.test_checkpoint_modelopt import _expert_views, _rel, _silu, moe_check

E4M3_POSITIVE = np.arange(1, 127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)  # all finite > 0
MAGS = np.array([0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


@pytest.mark.parametrize("name", fx.COMPRESSED)
def test_dequantized_weights_equal_decompress_bit_for_bit(name):
  ck = load_checkpoint(fx.fixture(name))
  raw = fx.read_dir(fx.fixture(name))
  ref = fx.reference(name)
  experts = _expert_views(ck)
  modules = fx.ref_modules(ref)
  assert len(modules) >= 7
  for module in modules:
    got = experts[module] if module in experts else nf.dequantize(ck.modules[module].weight,
                                                                   jnp.bfloat16)
    # compressed-tensors keeps -0.0 for code 8, as we do: every bit matches.
    fx.assert_same_bits(got, ref[module + ".fake_quant"], what=module)
  for rec in ck.modules.values():
    assert rec.exact and rec.producer == "compressed-tensors", (rec.name, rec.note)
  for module in modules:
    if module in experts:
      continue
    rec = ck.modules[module]
    assert rec.global_scale_divisor == raw[module + ".weight_global_scale"][0]
    np.testing.assert_array_equal(np.asarray(rec.weight.packed), raw[module + ".weight_packed"])


def test_a_plain_reciprocal_is_not_exact_but_the_chosen_scale_is():
  """Why the loader searches: float32(1 / weight_global_scale) times a block scale is not the
  tool's quotient for some blocks of these very checkpoints."""
  raw = fx.read_dir(fx.fixture("ct_nvfp4a16_dense"))
  inexact = 0
  for name, wgs in raw.items():
    if not name.endswith(".weight_global_scale"):
      continue
    s = raw[name.replace("weight_global_scale", "weight_scale")].astype(np.float32)
    naive = s * (np.float32(1) / wgs[0])
    inexact += int((fx.bits(naive) != fx.bits(s / wgs[0])).any())
  assert inexact >= 3


def _check_exactness_claim(divisor, g, exact, dtype):
  """Independent brute force over every positive E4M3 scale and E2M1 magnitude."""
  s = E4M3_POSITIVE.astype(np.float32)
  theirs = (MAGS[None, :] * (s / np.float32(divisor))[:, None]).astype(dtype)
  ours = (MAGS[None, :] * (s * np.float32(g))[:, None]).astype(dtype)
  return np.array_equal(fx.bits(theirs), fx.bits(ours))


def test_reciprocal_global_scale_is_exact_for_bf16_divisors(rng):
  # The tool computes weight_global_scale in bf16; for such divisors a bf16-exact multiplier
  # always exists (see reciprocal_global_scale's docstring): checked over all block scales.
  divisors = (rng.uniform(1e3, 1e6, 300).astype(ml_dtypes.bfloat16).astype(np.float32))
  for d in divisors:
    for dtype in (ml_dtypes.bfloat16, np.float16):
      g, exact, _ = reciprocal_global_scale(E4M3_POSITIVE, d, dtype)
      assert exact, (d, dtype)
      assert _check_exactness_claim(d, g, exact, dtype), (d, dtype)


def test_reciprocal_global_scale_reports_when_no_multiplier_is_exact(rng):
  # float32 output keeps every bit of the factor: generic float32 divisors have no exact
  # multiplier; the function must say so rather than claim exactness.
  seen_inexact = 0
  for d in rng.uniform(1e3, 1e6, 40).astype(np.float32):
    g, exact, note = reciprocal_global_scale(E4M3_POSITIVE, d, np.float32)
    assert exact == _check_exactness_claim(d, g, exact, np.float32), d
    if not exact:
      seen_inexact += 1
      assert "no float32 global_scale" in note and g == np.float32(1) / d
  assert seen_inexact > 0


def _slow_reciprocal_global_scale(scales, divisor, dtype, max_ulps):
  """The definition, evaluated the slow way: every candidate on every block, eagerly."""
  s = np.asarray(scales).astype(np.float32).ravel()
  ref = s / np.float32(divisor)
  g0 = np.float32(1) / np.float32(divisor)
  candidates, up, down = [g0], g0, g0
  for _ in range(max_ulps):
    up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
    candidates += [up, down]
  factor_exact = [np.array_equal(fx.bits(s * g), fx.bits(ref)) for g in candidates]
  dtype_exact = [np.array_equal(fx.bits((MAGS[None, :] * (s * g)[:, None]).astype(dtype)),
                                fx.bits((MAGS[None, :] * ref[:, None]).astype(dtype)))
                 for g in candidates]
  for g, ok in zip(candidates, factor_exact):
    if ok:
      return g, True, "factor"
  for g, ok in zip(candidates, dtype_exact):
    if ok:
      return g, True, "dtype"
  return g0, False, "none"


def test_reciprocal_global_scale_equals_its_slow_definition(rng):
  """The fast search (distinct scale values only, stopping early) returns what evaluating
  every candidate on every block returns, including answers that are not the first candidate,
  dtype-only matches and no match."""
  outcomes = set()
  for _ in range(600):
    d = np.float32(rng.uniform(1, 1000))
    values = rng.choice(E4M3_POSITIVE, int(rng.integers(1, 6)))
    scales = rng.choice(values, (32, 8))  # repeated values, as in a real tensor
    dtype = [ml_dtypes.bfloat16, np.float16, np.float32][int(rng.integers(3))]
    max_ulps = int(rng.integers(0, 5))
    want_g, want_exact, kind = _slow_reciprocal_global_scale(scales, d, dtype, max_ulps)
    g, exact, note = reciprocal_global_scale(scales, d, dtype, max_ulps=max_ulps)
    assert (fx.bits(g), exact) == (fx.bits(want_g), want_exact), (d, values, dtype, max_ulps)
    assert ("exactly" in note) == (kind == "factor"), note
    outcomes.add((kind, bool(g != np.float32(1) / d)))
  # the cases exercised: several candidates tried, dtype-only matches, no match
  assert {("factor", True), ("dtype", False), ("none", False)} <= outcomes, outcomes


def test_reciprocal_global_scale_tests_each_distinct_scale_once(monkeypatch, rng):
  """A [14336, 4096] Linear has 3.7M block scales but at most 256 distinct E4M3 values: the
  candidates are tested on those only (the whole tensor took 26 s per module)."""
  from jax_nvfp4.checkpoint import compressed_tensors as ct
  sizes = []
  original = ct.matches_tool

  def spy(s, ref, g, dtype):
    sizes.append(np.asarray(s).size)
    return original(s, ref, g, dtype)

  monkeypatch.setattr(ct, "matches_tool", spy)
  scales = rng.choice(E4M3_POSITIVE, (512, 64))
  d = np.float32(ml_dtypes.bfloat16(448 * 6 / 0.37))
  g, exact, _ = ct.reciprocal_global_scale(scales, d, ml_dtypes.bfloat16)
  assert exact and sizes and max(sizes) == len(np.unique(scales.view(np.uint8)))
  assert _check_exactness_claim(d, g, exact, ml_dtypes.bfloat16)


def test_records_and_activation_scales():
  a16 = load_checkpoint(fx.fixture("ct_nvfp4a16_dense"))
  assert a16.producer == "compressed-tensors" and a16.quant_algo == "nvfp4-pack-quantized"
  assert a16.activation_format is None
  w4a4 = load_checkpoint(fx.fixture("ct_nvfp4_dense"))
  raw = fx.read_dir(fx.fixture("ct_nvfp4_dense"))
  rec = w4a4.modules["model.layers.0.mlp.up_proj"]
  assert rec.activation_format == "nvfp4" and w4a4.activation_format == "nvfp4"
  name = "model.layers.0.mlp.up_proj.input_global_scale"
  assert rec.activation_scales == {name: raw[name].reshape(())}
  moe = load_checkpoint(fx.fixture("ct_nvfp4a16_moe"))
  ex = moe.moe["model.layers.0.mlp.experts"]
  assert ex.fused and ex.w13.shape == (4, 96, 64) and ex.w2.shape == (4, 64, 48)
  divisors = np.asarray(ex.w2.global_scale_divisor)
  np.testing.assert_array_equal(
      divisors, [raw_e[0] for raw_e in (fx.read_dir(fx.fixture("ct_nvfp4a16_moe"))[
          f"model.layers.0.mlp.experts.{e}.down_proj.weight_global_scale"] for e in range(4))])


@pytest.mark.parametrize("name", ["ct_nvfp4a16_dense", "ct_nvfp4_dense"])
def test_mlp_forward_matches_tool_weights(name, rng):
  ck = load_checkpoint(fx.fixture(name))
  ref = fx.reference(name)
  p = "model.layers.0.mlp."
  x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
  g = nf.nvfp4_matmul(x, ck.weight(p + "gate_proj"))
  u = nf.nvfp4_matmul(x, ck.weight(p + "up_proj"))
  y = nf.nvfp4_matmul((jax.nn.silu(g.astype(jnp.float32)) * u).astype(x.dtype),
                      ck.weight(p + "down_proj"))
  x64 = np.asarray(x, np.float64)
  w = {k: ref[p + k + ".fake_quant"].astype(np.float64) for k in ("gate_proj", "up_proj",
                                                                   "down_proj")}
  want = (_silu(x64 @ w["gate_proj"].T) * (x64 @ w["up_proj"].T)) @ w["down_proj"].T
  assert _rel(y, want) < 1e-2


def test_moe_block_matches_tool_weights(rng):
  moe_check("ct_nvfp4a16_moe", rng)


@pytest.mark.parametrize("up_divisor,fused", [(60928.0, True), (34304.0, False)])
def test_gate_up_divisors_that_differ_stay_exact(tmp_path, rng, up_divisor, fused):
  """Synthetic: expert 0's up_proj has another weight_global_scale than its gate_proj (30464).
  Twice as large: the ratio refolds into the E4M3 block scales exactly, w13 stays fused; a
  ratio of 1.126: no exact refold, gate and up stay separate stacks. Either way the weights
  reproduce the tool's formula bit for bit."""
  path = str(tmp_path / "ct")
  os.makedirs(path)
  hidden, inter = 32, 16
  tensors, truth = {}, {}
  for e in range(2):
    for proj, (n, k), d in (("gate_proj", (inter, hidden), 30464.0),
                            ("up_proj", (inter, hidden), 30464.0 if e else up_divisor),
                            ("down_proj", (hidden, inter), 32640.0)):
      m = f"model.layers.0.mlp.experts.{e}.{proj}"
      codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
      scales = rng.uniform(8, 300, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
      tensors[m + ".weight_packed"] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
      tensors[m + ".weight_scale"] = scales
      tensors[m + ".weight_global_scale"] = np.array([d], np.float32)
      # compressed-tensors' decompression: e2m1 * (float32(scale) / wgs) in f32, then bf16.
      factor = scales.astype(np.float32) / np.float32(d)
      truth[m] = (npref.E2M1[codes].astype(np.float32) * np.repeat(factor, 16, axis=1)).astype(
          np.float32).astype(ml_dtypes.bfloat16)
  fx.write_file(os.path.join(path, "model.safetensors"), tensors)
  weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
             "symmetric": True, "dynamic": False}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"hidden_size": hidden, "moe_intermediate_size": inter, "num_experts": 2,
               "quantization_config": {
                   "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                   "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                 "input_activations": None}},
                   "ignore": []}}, f)
  ck = load_checkpoint(path)
  ex = ck.moe["model.layers.0.mlp.experts"]
  assert ex.fused == fused
  if ex.fused:
    assert "refolded" in ex.w13.note and ex.w13.exact
    views = _expert_views(ck)
  else:
    assert "separate" in ex.note and ex.w1.exact and ex.w3.exact
    gate, up, down = (np.asarray(nf.dequantize(r.weight, jnp.bfloat16))
                      for r in (ex.w1, ex.w3, ex.w2))
    views = {}
    for e in range(2):
      p = f"model.layers.0.mlp.experts.{e}."
      views.update({p + "gate_proj": gate[e], p + "up_proj": up[e], p + "down_proj": down[e]})
  for m, want in truth.items():
    fx.assert_same_bits(views[m], want, what=m)

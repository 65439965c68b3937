"""Expert- and tensor-parallel fused MoE (jax_nvfp4/parallel/moe.py) on 8 fake CPU devices.

The multi-device cases run in one child process (tests/_multidevice.py) and return numbers; the
tests below assert on them. References: the independent float64 NumPy layer
(tests/numpy_moe_reference.py) and ``fused_moe`` on one device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.parallel import moe as pmoe
from tests import _multidevice
from tests import numpy_moe_reference as ref
from tests import numpy_reference as npref

M, H, I, E, TOP_K = 16, 64, 512, 8, 2   # I/8 = 64: whole k64 chunks of w2 on 8 tensor shards
MESHES = ((1, 8), (2, 4), (8, 1))        # ("expert", "tensor")
TOL = 5e-3                               # rel-L2 vs float64 of the one-device layer (test_moe)
BF16_U = 2.0**-8


def random_experts(rng, e, n, k, *, out_std=1.0):
  """Random codes (all 16) and E4M3 block scales for [E, N, K]; per-expert global scales make a
  row dotted with a unit-variance x have std about ``out_std``."""
  packed = rng.integers(0, 256, size=(e, n, k // 2), dtype=np.uint8)
  scales = rng.uniform(2.0**-6, 8.0, size=(e, n, k // 16)).astype(jnp.float8_e4m3fn)
  code_rms = np.sqrt(np.mean(npref.E2M1[:8] ** 2))
  s_rms = np.sqrt(np.mean(scales.astype(np.float64) ** 2))
  gs = out_std / (np.sqrt(k) * code_rms * s_rms) * rng.uniform(0.7, 1.4, e)
  return nf.NVFP4Weight(jnp.asarray(packed), jnp.asarray(scales), jnp.asarray(gs, jnp.float32))


def _error_text(fn) -> str:
  try:
    fn()
  except Exception as e:  # noqa: BLE001
    return f"{type(e).__name__}: {e}"
  return "no error"


def worker():
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  assert len(jax.devices()) == 8
  rng = np.random.default_rng(2024)
  x = jnp.asarray(rng.standard_normal((M, H)), jnp.bfloat16)
  logits = jnp.asarray(rng.standard_normal((M, E)), jnp.float32)
  tw, ti = ref.route(np.asarray(logits), TOP_K)
  gated = {"checkpoint": (random_experts(rng, E, 2 * I, H, out_std=2.0),
                          random_experts(rng, E, H, I))}
  gated["prepared"] = tuple(nf.prepare(w) for w in gated["checkpoint"])
  # w13 in gate_up_pairs order: GEMM 1 applies the activation; split over tensor shards as is.
  gated["pairs"] = (nf.prepare(gated["checkpoint"][0], gate_up_pairs=True),
                    gated["prepared"][1])
  relu_w13 = random_experts(rng, E, I, H, out_std=2.0)
  b13 = rng.standard_normal((E, 2 * I)).astype(np.float32)
  b2 = rng.standard_normal((E, H)).astype(np.float32)
  x64 = np.asarray(x, np.float64)

  def reference(w13, w2, activation="swiglu", **kw):
    """float64 layer and, per output element, sum_j |w_j| (|act_j| @ |W2_e|^T): the scale of
    the partial products whose roundings a sharded layer may reorder."""
    w13_64, w2_64 = ref.dequantize_experts(w13), ref.dequantize_experts(w2)
    out = ref.moe(x64, w13_64, w2_64, tw, ti, activation_kind=activation,
                  b13=kw.get("b13"), b2=kw.get("b2"), limit=kw.get("limit"))
    scale = np.zeros_like(out)
    for t in range(M):
      for j in range(TOP_K):
        e = ti[t, j]
        hid = x64[t] @ w13_64[e].T + (kw["b13"][e] if "b13" in kw else 0)
        act = ref.activation(hid, activation, limit=kw.get("limit"))
        scale[t] += abs(tw[t, j]) * (np.abs(act) @ np.abs(w2_64[e]).T
                                     + (abs(kw["b2"][e]) if "b2" in kw else 0))
    return out, scale

  refs = {"swiglu": reference(*gated["checkpoint"])}
  single = {}
  for layout, (w13, w2) in gated.items():
    single[layout] = np.asarray(jax.jit(lambda x, l, a, b: nf.fused_moe(
        x, a, b, router_logits=l, top_k=TOP_K))(x, logits, w13, w2), np.float64)

  def record(out, single_out, ref_pair, hlo=None):
    out = np.asarray(out, np.float64)
    want, scale = ref_pair
    # Partials rounded to bf16 once per device, the result once more, and GEMM1/activation
    # roundings that a different split of the same dot may flip by one ulp.
    bound = 4 * BF16_U * scale + 3 * BF16_U * np.abs(single_out) + 1e-30
    r = dict(rel_l2=ref.rel_l2(out, want), single_rel_l2=ref.rel_l2(single_out, want),
             err_over_bound=float(np.max(np.abs(out - single_out) / bound)),
             bitwise=bool(np.array_equal(out, single_out)))
    if hlo is not None:
      weight_shapes = set()
      for w in gated["checkpoint"] + gated["prepared"] + gated["pairs"] + (relu_w13,):
        for a in jax.tree.leaves(w):
          weight_shapes.add(f"{a.dtype.name}[{','.join(map(str, a.shape))}]".replace(
              "uint8", "u8").replace("uint32", "u32").replace("float8_e4m3fn", "f8e4m3fn").replace(
              "float32", "f32"))
      r["collectives"] = _multidevice.collective_counts(hlo)
      r["gathered"] = _multidevice.gathered_shapes(hlo)
      r["weight_gathered"] = sorted(set(r["gathered"]) & weight_shapes)
    return r

  def run(sw, token_axis=None, **kw):
    f = jax.jit(lambda x, l, sw: pmoe.sharded_fused_moe(x, sw, router_logits=l, top_k=TOP_K,
                                                        token_axis=token_axis, **kw))
    xs = x
    if token_axis is not None:
      xs = jax.device_put(x, NamedSharding(sw.mesh, P(token_axis)))
    out = f(xs, logits, sw)
    return out, f.lower(xs, logits, sw).compile().as_text()

  results = {}
  for shape in MESHES:
    mesh = jax.make_mesh(shape, ("expert", "tensor"), axis_types=(AxisType.Auto,) * 2)
    for layout, (w13, w2) in gated.items():
      sw = pmoe.shard_moe_weights(w13, w2, mesh, expert_axis="expert", tensor_axis="tensor")
      out, hlo = run(sw)
      results[f"{shape}/{layout}/ep_tp"] = record(out, single[layout], refs["swiglu"], hlo)

  mesh = jax.make_mesh((2, 4), ("expert", "tensor"), axis_types=(AxisType.Auto,) * 2)
  w13, w2 = gated["checkpoint"]
  sw = pmoe.shard_moe_weights(w13, w2, mesh, expert_axis="expert", tensor_axis="tensor")
  # Tokens split over the expert axis: all-gathered in, reduce-scattered out.
  out, hlo = run(sw, token_axis="expert")
  results["tokens_on_expert_axis"] = record(out, single["checkpoint"], refs["swiglu"], hlo)
  results["tokens_on_expert_axis"]["out_spec"] = str(out.sharding.spec)
  # Tokens split over the whole mesh (prepared weights).
  swp = pmoe.shard_moe_weights(*gated["prepared"], mesh, expert_axis="expert",
                               tensor_axis="tensor")
  out, hlo = run(swp, token_axis=("expert", "tensor"))
  results["tokens_on_both_axes"] = record(out, single["prepared"], refs["swiglu"], hlo)
  # Expert parallel x data parallel: experts over "expert", tokens over "tensor".
  sw_dp = pmoe.shard_moe_weights(w13, w2, mesh, expert_axis="expert")
  out, hlo = run(sw_dp, token_axis="tensor")
  results["ep_x_dp"] = record(out, single["checkpoint"], refs["swiglu"], hlo)
  # Non-gated relu2 (w13 has I rows; no gate/up reordering).
  sw_relu = pmoe.shard_moe_weights(relu_w13, w2, mesh, expert_axis="expert",
                                   tensor_axis="tensor", activation="relu2")
  relu_single = np.asarray(nf.fused_moe(x, relu_w13, w2, router_logits=logits, top_k=TOP_K,
                                        activation="relu2"), np.float64)
  out, hlo = run(sw_relu, activation="relu2")
  results["relu2"] = record(out, relu_single, reference(relu_w13, w2, "relu2"), hlo)
  # gpt-oss activation with both biases, routing given as (topk_weights, topk_ids).
  w13p, w2p = gated["prepared"]
  sw_b = pmoe.shard_moe_weights(w13p, w2p, mesh, expert_axis="expert", tensor_axis="tensor",
                                activation="gptoss", w13_bias=b13, w2_bias=b2)
  kw = dict(activation="gptoss", limit=7.0)
  b_single = np.asarray(nf.fused_moe(x, w13p, w2p, topk_weights=tw.astype(np.float32),
                                     topk_ids=ti.astype(np.int32), w13_bias=b13, w2_bias=b2,
                                     **kw), np.float64)
  f = jax.jit(lambda x, sw: pmoe.sharded_fused_moe(x, sw, topk_weights=tw.astype(np.float32),
                                                   topk_ids=ti.astype(np.int32), **kw))
  ref_b = reference(gated["checkpoint"][0], w2, "gptoss", b13=b13, b2=b2, limit=7.0)
  results["gptoss_biases"] = record(f(x, sw_b), b_single, ref_b,
                                    f.lower(x, sw_b).compile().as_text())
  # What adding the w2 bias on each of the 4 tensor shards would give (a real mistake).
  b_per_shard = np.asarray(nf.fused_moe(x, w13p, w2p, topk_weights=tw.astype(np.float32),
                                        topk_ids=ti.astype(np.int32), w13_bias=b13,
                                        w2_bias=4 * b2, **kw), np.float64)
  results["gptoss_biases"]["rel_l2_if_w2_bias_added_per_shard"] = ref.rel_l2(b_per_shard,
                                                                             ref_b[0])
  # The same with w13 in gate_up_pairs order: the bias is reordered per shard, the rows not.
  w13q = gated["pairs"][0]
  sw_q = pmoe.shard_moe_weights(w13q, w2p, mesh, expert_axis="expert", tensor_axis="tensor",
                                activation="gptoss", w13_bias=b13, w2_bias=b2)
  q_single = np.asarray(nf.fused_moe(x, w13q, w2p, topk_weights=tw.astype(np.float32),
                                     topk_ids=ti.astype(np.int32), w13_bias=b13, w2_bias=b2,
                                     **kw), np.float64)
  results["gptoss_biases_pairs"] = record(f(x, sw_q), q_single, ref_b,
                                          f.lower(x, sw_q).compile().as_text())
  results["gptoss_biases_pairs"]["pairs_flag_kept"] = bool(sw_q.w13.gate_up_pairs)
  # Negative control: the pairs w13's rows reordered as a [gate; up] one's would be (pairs of
  # pairs; gate_up_per_shard itself leaves a pairs w13 as it is).
  sw_wrong = dataclasses.replace(sw_q, w13=jax.device_put(
      pmoe._permute_w13(w13q, 4), jax.tree.map(lambda a: a.sharding, sw_q.w13)))
  results["pairs_reordered_as_plain"] = record(f(x, sw_wrong), q_single, ref_b)
  # Negative control: tensor parallel without the [gate_t; up_t] reordering.
  raw = dataclasses.replace(sw, w13=jax.device_put(w13, jax.tree.map(
      lambda a: a.sharding, sw.w13)))
  out, _ = run(raw)
  results["unreordered_w13"] = record(out, single["checkpoint"], refs["swiglu"])

  # Zero tokens (an empty batch) on each axis combination, routed by logits or by top-k ids:
  # the shape of the output, or the error.
  zero_tokens = {}
  for ea, ta in (("expert", None), (None, "tensor"), ("expert", "tensor")):
    sw0 = pmoe.shard_moe_weights(w13, w2, mesh, expert_axis=ea, tensor_axis=ta)
    for route, kw0 in (("logits", dict(router_logits=logits[:0], top_k=TOP_K)),
                       ("topk", dict(topk_weights=tw[:0].astype(np.float32),
                                     topk_ids=ti[:0].astype(np.int32)))):
      try:
        y0 = pmoe.sharded_fused_moe(x[:0], sw0, **kw0)
        zero_tokens[f"{ea}/{ta}/{route}"] = [list(y0.shape), str(y0.dtype)]
      except Exception as e:  # noqa: BLE001
        zero_tokens[f"{ea}/{ta}/{route}"] = f"{type(e).__name__}: {e}"
  results["zero_tokens"] = zero_tokens

  errors = {
      "tokens": _error_text(lambda: pmoe.sharded_fused_moe(
          x[:6], sw, router_logits=logits[:6], top_k=TOP_K, token_axis="tensor")),
      "activation": _error_text(lambda: pmoe.sharded_fused_moe(
          x, sw, router_logits=logits, top_k=TOP_K, activation="relu2")),
  }
  return dict(results=results, errors=errors)


# ----------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def multidevice():
  return _multidevice.run_worker("tests.test_sharding_moe", "worker")


SHARDED_CASES = [f"{s}/{l}/ep_tp" for s in MESHES for l in ("checkpoint", "prepared", "pairs")
                 ] + ["tokens_on_expert_axis", "tokens_on_both_axes", "ep_x_dp", "relu2",
                      "gptoss_biases", "gptoss_biases_pairs"]


@pytest.mark.parametrize("case", SHARDED_CASES)
def test_sharded_layer_matches_one_device(multidevice, case):
  r = multidevice["results"][case]
  assert r["single_rel_l2"] <= TOL, r
  assert r["rel_l2"] <= TOL, r
  assert r["err_over_bound"] <= 1.0, r


@pytest.mark.parametrize("layout", ["checkpoint", "prepared", "pairs"])
def test_pure_expert_parallel_is_bitwise(multidevice, layout):
  # With top_k = 2 a device's partial is 0, one GEMM2 row (already bf16, so exact) or the same
  # two-row sum the single device rounds; the float32 psum adds exact zeros: same bits.
  assert multidevice["results"][f"(8, 1)/{layout}/ep_tp"]["bitwise"]


def test_negative_control_unreordered_gate_up_is_caught(multidevice):
  r = multidevice["results"]["unreordered_w13"]
  assert r["rel_l2"] > 0.1 and r["err_over_bound"] > 1.0, r


def test_gate_up_pairs_split_as_is_and_keep_their_flag(multidevice):
  """A gate_up_pairs w13 is split over the tensor shards without reordering and each device
  still fuses the activation; reordering it as a [gate; up] weight is caught."""
  r = multidevice["results"]
  assert r["gptoss_biases_pairs"]["pairs_flag_kept"], r["gptoss_biases_pairs"]
  wrong = r["pairs_reordered_as_plain"]
  assert wrong["rel_l2"] > 0.1 and wrong["err_over_bound"] > 1.0, wrong


def test_w2_bias_matters_and_is_added_once(multidevice):
  r = multidevice["results"]["gptoss_biases"]
  assert r["rel_l2"] <= TOL and r["rel_l2_if_w2_bias_added_per_shard"] > 0.05, r


@pytest.mark.parametrize("case", SHARDED_CASES)
def test_no_weight_all_gather(multidevice, case):
  r = multidevice["results"][case]
  assert r["weight_gathered"] == [], r
  c = r["collectives"]
  assert c["all-to-all"] == 0 and c["collective-permute"] == 0, c
  if case in ("tokens_on_expert_axis", "tokens_on_both_axes"):
    # x and the router logits come in, the output leaves as a reduce-scatter.
    assert c["all-gather"] == 2 and c["reduce-scatter"] == 1, c
    assert sorted(g.split("[")[1] for g in r["gathered"]) == ["16,64]", "16,8]"], r
    assert c["all-reduce"] == (1 if case == "tokens_on_expert_axis" else 0), c
  else:
    assert c["all-gather"] == 0 and c["reduce-scatter"] == 0, c
    assert c["all-reduce"] == 1, c


def test_token_sharded_output_keeps_token_sharding(multidevice):
  assert multidevice["results"]["tokens_on_expert_axis"]["out_spec"] == "P('expert',)"


@pytest.mark.parametrize("axes", ["expert/None", "None/tensor", "expert/tensor"])
@pytest.mark.parametrize("route", ["logits", "topk"])
def test_zero_tokens_give_an_empty_output(multidevice, axes, route):
  # fused_moe on one device returns [0, H] for M = 0; the sharded layer must too.
  assert multidevice["results"]["zero_tokens"][f"{axes}/{route}"] == [[0, H], "bfloat16"]


def test_bad_calls_raise_clear_errors(multidevice):
  e = multidevice["errors"]
  assert "ValueError" in e["tokens"] and "M = 6" in e["tokens"] and "'tensor' of size 4" in e[
      "tokens"], e
  assert "ValueError" in e["activation"] and "'relu2'" in e["activation"], e


# ----------------------------------------------------------------------------- one device

def test_shard_moe_weights_rejects_bad_splits(rng):
  from jax.sharding import AbstractMesh
  mesh = AbstractMesh((2, 4), ("expert", "tensor"))
  w13, w2 = random_experts(rng, 6, 96, 64), random_experts(rng, 6, 64, 48)
  with pytest.raises(ValueError, match=r"E = 6 experts.*'tensor' of size 4"):
    pmoe.shard_moe_weights(w13, w2, mesh, expert_axis="tensor")
  with pytest.raises(ValueError, match=r"I = 48 .*'tensor' of size 4.*scale blocks"):
    pmoe.shard_moe_weights(w13, w2, mesh, tensor_axis="tensor")
  w13, w2 = random_experts(rng, 4, 256, 64), random_experts(rng, 4, 64, 128)
  with pytest.raises(ValueError, match=r"I = 128 .*'tensor' of size 4.*kernel chunks \(64\)"):
    pmoe.shard_moe_weights(nf.prepare(w13), nf.prepare(w2), mesh, tensor_axis="tensor")
  with pytest.raises(ValueError, match="needs w13 with 128 rows"):
    pmoe.shard_moe_weights(w13, w2, mesh, activation="relu2")
  with pytest.raises(ValueError, match="share an axis"):
    pmoe.shard_moe_weights(w13, w2, mesh, expert_axis="tensor", tensor_axis="tensor")
  with pytest.raises(TypeError, match="same kind"):
    pmoe.shard_moe_weights(w13, nf.prepare(w2), mesh)
  relu_pairs = nf.prepare(random_experts(rng, 4, 128, 64), gate_up_pairs=True)
  with pytest.raises(ValueError, match="gate_up_pairs=True, which only a gated activation"):
    pmoe.shard_moe_weights(relu_pairs, nf.prepare(w2), mesh, activation="relu2")


@pytest.mark.parametrize("tp", [2, 4])
def test_gate_up_reordering_gives_each_shard_its_pair(rng, tp):
  e, i, h = 2, 64, 64  # I/tp a multiple of 16: whole tiles in the prepared layout
  w13 = random_experts(rng, e, 2 * i, h)
  full = ref.dequantize_experts(w13)
  for w in (w13, nf.prepare(w13)):
    moved = pmoe._permute_w13(w, tp)
    got = ref.dequantize_experts(moved if isinstance(moved, nf.NVFP4Weight)
                                 else nf.unprepare(moved))
    step = i // tp
    for t in range(tp):
      shard = got[:, 2 * step * t:2 * step * (t + 1)]
      np.testing.assert_array_equal(shard[:, :step], full[:, t * step:(t + 1) * step])
      np.testing.assert_array_equal(shard[:, step:], full[:, i + t * step:i + (t + 1) * step])

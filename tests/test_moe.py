"""fused_moe and the nvfp4_moe_gemm primitive through the reference path (CPU), against the
independent float64 NumPy layer in tests/numpy_moe_reference.py.

Tolerances: the implementation rounds GEMM1's output (a gated activation on a plain [gate; up]
w13 only), the activation and each GEMM2 row to the activation dtype, and the result once more;
four roundings of bf16 (8 significant bits) give a rel-L2 of about 3.8e-3 even with exact
products, of fp16 (11 bits) about 5e-4 (relu2, always fused into GEMM1: 2.8-3.5e-3 in bf16).
One grouped GEMM alone rounds once (the dense matmul's bounds).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.ops import moe as moe_ops
from jax_nvfp4.moe import capacity
from jax_nvfp4.ops import moe_align, moe_route
from tests import numpy_moe_reference as ref
from tests import numpy_reference as npref

TOL = {jnp.bfloat16: 5e-3, jnp.float16: 1e-3}
GEMM_TOL = {jnp.bfloat16: 4e-3, jnp.float16: 6e-4}
CODE_RMS = float(np.sqrt(np.mean(npref.E2M1[:8] ** 2)))


def random_experts(rng, e, n, k, *, out_std=1.0, scale_range=(2.0**-6, 8.0), gs=None):
  """Random codes (all 16) and E4M3 block scales for [E, N, K]; the global scale makes a row
  dot a unit-variance x have std ``out_std`` unless ``gs`` is given (scalar or [E])."""
  packed = rng.integers(0, 256, size=(e, n, k // 2), dtype=np.uint8)
  scales = rng.uniform(*scale_range, size=(e, n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  if gs is None:
    s_rms = np.sqrt(np.mean(scales.astype(np.float64) ** 2))
    gs = out_std / (np.sqrt(k) * CODE_RMS * s_rms) * rng.uniform(0.7, 1.4, e)
  gs = np.broadcast_to(np.asarray(gs, np.float32), (e,))
  return nf.NVFP4Weight(jnp.asarray(packed), jnp.asarray(scales), jnp.asarray(gs))


def _layer(rng, m, h, i, e, *, gated=True, dtype=jnp.bfloat16, x_std=1.0, **wkw):
  w13 = random_experts(rng, e, 2 * i if gated else i, h, out_std=2.0, **wkw)
  w2 = random_experts(rng, e, h, i)
  x = jnp.asarray(rng.standard_normal((m, h)) * x_std, dtype)
  return x, w13, w2


def _ref(x, w13, w2, tw, ti, **kw):
  return ref.moe(np.asarray(x, np.float64), ref.dequantize_experts(w13),
                 ref.dequantize_experts(w2), tw, ti, **kw)


def _distinct_topk(rng, m, e, k):
  ids = np.stack([rng.choice(e, k, replace=False) for _ in range(m)]).astype(np.int32)
  w = rng.uniform(0.05, 1.0, (m, k)).astype(np.float32)
  return w, ids


_fused = jax.jit(nf.fused_moe, static_argnames=("top_k", "routing", "activation", "limit",
                                                "alpha", "block_m"))


# ----------------------------------------------------------------------------- peer shapes

# (m, H, I, E, top_k, dtype): peer MoE shapes (m in {1, 123, 666}, n=I in {128, 1024},
# k=H in {256, 2048}, e in {5, 12}, topk in {2, 3}) with H and I scaled down for the CPU.
PEER = [(1, 256, 128, 5, 2, jnp.bfloat16), (123, 256, 128, 12, 3, jnp.float16),
        (666, 128, 64, 12, 2, jnp.bfloat16), (123, 256, 256, 5, 3, jnp.bfloat16),
        (666, 64, 128, 5, 3, jnp.float16), (1, 512, 64, 12, 3, jnp.float16)]


@pytest.mark.parametrize("m, h, i, e, k, dtype", PEER)
def test_peer_shapes_router_logits(rng, m, h, i, e, k, dtype):
  x, w13, w2 = _layer(rng, m, h, i, e, dtype=dtype)
  logits = rng.standard_normal((m, e)).astype(np.float32)
  out = _fused(x, w13, w2, router_logits=logits, top_k=k)
  assert out.shape == (m, h) and out.dtype == dtype
  tw, ti = ref.route(logits, k)
  assert ref.rel_l2(out, _ref(x, w13, w2, tw, ti)) <= TOL[dtype]
  rd = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float16
  rounded = _ref(x, w13, w2, tw, ti, round_dtype=rd).astype(rd)
  assert ref.rel_l2(out, rounded) <= (1e-3 if dtype == jnp.bfloat16 else 2e-4)


@pytest.mark.parametrize("prepared", [None, "pairs", "plain"])
def test_prepared_and_checkpoint_weights_agree(rng, prepared):
  x, w13, w2 = _layer(rng, 37, 128, 96, 6)
  tw, ti = _distinct_topk(rng, 37, 6, 2)
  a13, a2 = w13, w2
  if prepared:
    a13, a2 = nf.prepare(w13, gate_up_pairs=prepared == "pairs"), nf.prepare(w2)
  out = _fused(x, a13, a2, topk_weights=tw, topk_ids=ti)
  assert ref.rel_l2(out, _ref(x, w13, w2, tw, ti)) <= TOL[jnp.bfloat16]
  # GEMM1's output is rounded to bf16 before the activation unless w13 has gate/up pairs (the
  # activation fused into GEMM1).
  rd = ml_dtypes.bfloat16
  rounded = _ref(x, w13, w2, tw, ti, round_dtype=rd, gemm1_rounded=prepared != "pairs")
  assert ref.rel_l2(out, rounded.astype(rd)) <= 1e-3
  if prepared == "plain":  # the primitive's reference lowering and the checkpoint path: same
    np.testing.assert_array_equal(  # arithmetic
        np.asarray(out), np.asarray(_fused(x, w13, w2, topk_weights=tw, topk_ids=ti)))


# ----------------------------------------------------------------------------- expert parallel

def test_expert_map_partition_sums_to_full_layer(rng):
  m, h, i, e, k = 40, 128, 64, 8, 3
  x, w13, w2 = _layer(rng, m, h, i, e, dtype=jnp.float16)
  tw, ti = _distinct_topk(rng, m, e, k)
  full = np.asarray(_fused(x, w13, w2, topk_weights=tw, topk_ids=ti), np.float64)
  parts = []
  for local in (np.array([0, 3, 5]), np.array([1, 2, 4, 6, 7])):
    emap = np.full(e, -1, np.int32)
    emap[local] = np.arange(len(local))
    sub = lambda w: jax.tree.map(lambda a: a[local], w)
    out = _fused(x, sub(w13), sub(w2), topk_weights=tw, topk_ids=ti, expert_map=emap)
    want = _ref(x, sub(w13), sub(w2), tw, ti, expert_map=emap)
    assert ref.rel_l2(out, want) <= TOL[jnp.float16]
    # Tokens with no local expert get exactly zero (the 3-expert part has some).
    none_local = ~np.isin(ti, local).any(axis=1)
    assert none_local.any() or len(local) > 3
    assert not np.asarray(out)[none_local].any()
    parts.append(np.asarray(out, np.float64))
  assert ref.rel_l2(parts[0] + parts[1], full) <= 1e-3


def test_expert_map_with_router_logits_and_bad_maps(rng):
  x, w13, w2 = _layer(rng, 9, 64, 32, 2)
  logits = rng.standard_normal((9, 6)).astype(np.float32)
  emap = np.array([-1, 0, -1, -1, 1, -1], np.int32)
  out = _fused(x, w13, w2, router_logits=logits, top_k=2, expert_map=emap)
  tw, ti = ref.route(logits, 2)
  assert ref.rel_l2(out, _ref(x, w13, w2, tw, ti, expert_map=emap)) <= TOL[jnp.bfloat16]
  with pytest.raises(ValueError, match="local id"):
    nf.fused_moe(x, w13, w2, router_logits=logits, top_k=2,
                 expert_map=np.array([-1, 0, 2, -1, 1, -1]))
  with pytest.raises(ValueError, match="two global experts"):
    nf.fused_moe(x, w13, w2, router_logits=logits, top_k=2,
                 expert_map=np.array([0, 0, -1, -1, 1, -1]))
  with pytest.raises(ValueError, match="router_logits must have shape"):
    nf.fused_moe(x, w13, w2, router_logits=logits[:, :2], top_k=2, expert_map=emap)


# ----------------------------------------------------------------------------- activations

@pytest.mark.parametrize("m, e, k", [(1, 8, 2), (64, 8, 2), (256, 64, 4)])
def test_relu2_non_gated(rng, m, e, k):
  # Peer relu2 shapes: m in {1, 64, 256}, (e, topk) in {(8, 2), (64, 4)}; H = I = 128 here.
  x, w13, w2 = _layer(rng, m, 128, 128, e, gated=False)
  assert w13.shape == (e, 128, 128)
  tw, ti = _distinct_topk(rng, m, e, k)
  out = _fused(x, w13, w2, topk_weights=tw, topk_ids=ti, activation="relu2")
  want = _ref(x, w13, w2, tw, ti, activation_kind="relu2")
  assert ref.rel_l2(out, want) <= TOL[jnp.bfloat16]
  # GEMM1 squares its float32 result (relu2 needs no row order, so it is always fused): rounded
  # where the implementation rounds, only accumulation order differs; rounding GEMM1's output
  # first (the unfused order) is about 5e-3 away.
  bf16 = ml_dtypes.bfloat16
  rounded = _ref(x, w13, w2, tw, ti, activation_kind="relu2", round_dtype=bf16,
                 gemm1_rounded=False).astype(bf16)
  assert ref.rel_l2(out, rounded) <= 1e-3
  unfused = _ref(x, w13, w2, tw, ti, activation_kind="relu2", round_dtype=bf16).astype(bf16)
  assert ref.rel_l2(unfused, rounded) > 3e-3


@pytest.mark.parametrize("limit, gs", [(5.0, 2.0**-13), (7.0, 2.0**-12), (10.0, 2.0**-11),
                                       (15.0, 2.0**-10), (15.0, 2.0**-9), (5.0, 2.0**-9)])
def test_swiglu_clamp_active(rng, limit, gs):
  # Peer clamp case (k=4096, n=2048, topk=6) scaled down: H = 512, I = 128, E = 8, topk = 6.
  m, h, i, e, k = 24, 512, 128, 8, 6
  # Large block scales so that a tiny global scale still gives large weights; x is sized so
  # that GEMM1's outputs spread to about twice the clamp.
  w13 = random_experts(rng, e, 2 * i, h, scale_range=(64.0, 448.0), gs=gs)
  w2 = random_experts(rng, e, h, i, out_std=1.0 / limit)
  dq13 = ref.dequantize_experts(w13)
  x_std = 2 * limit / (np.sqrt(h) * np.sqrt(np.mean(dq13 ** 2)))
  x = jnp.asarray(rng.standard_normal((m, h)) * x_std, jnp.bfloat16)
  tw, ti = _distinct_topk(rng, m, e, k)
  out = _fused(x, w13, w2, topk_weights=tw, topk_ids=ti, limit=limit)
  want = _ref(x, w13, w2, tw, ti, limit=limit)
  assert ref.rel_l2(out, want) <= TOL[jnp.bfloat16]
  # The clamp is active: on a good share of the entries, and clamping changes the result.
  hid = np.einsum("mh,enh->men", np.asarray(x, np.float64), dq13)
  gate, up = hid[..., :i], hid[..., i:]
  assert np.mean(ref.silu(gate) > limit) > 0.05 and np.mean(np.abs(up) > limit) > 0.1
  assert ref.rel_l2(_ref(x, w13, w2, tw, ti), want) > 0.05


def test_gptoss_interleaved_checkpoint_with_biases(rng):
  m, h, i, e, k = 33, 128, 64, 4, 2
  # A gpt-oss style checkpoint: gate/up rows interleaved (gate i at 2i, up i at 2i+1).
  w13_inter = random_experts(rng, e, 2 * i, h, out_std=4.0)
  b13_inter = rng.standard_normal((e, 2 * i)).astype(np.float32)
  w2 = random_experts(rng, e, h, i, out_std=0.3)
  b2 = rng.standard_normal((e, h)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((m, h)), jnp.bfloat16)
  logits = rng.standard_normal((m, e)).astype(np.float32)
  w13 = nf.deinterleave_gate_up(w13_inter)
  b13 = nf.deinterleave_gate_up(b13_inter, axis=-1)
  out = _fused(x, w13, w2, router_logits=logits, top_k=k, activation="gptoss", limit=7.0,
               w13_bias=b13, w2_bias=b2)
  # The oracle reads the interleaved checkpoint directly.
  d = ref.dequantize_experts(w13_inter)
  d = np.concatenate([d[:, 0::2], d[:, 1::2]], axis=1)
  bb = np.concatenate([b13_inter[:, 0::2], b13_inter[:, 1::2]], axis=1)
  tw, ti = ref.route(logits, k)
  want = ref.moe(np.asarray(x, np.float64), d, ref.dequantize_experts(w2), tw, ti,
                 activation_kind="gptoss", limit=7.0, b13=bb, b2=b2)
  assert ref.rel_l2(out, want) <= TOL[jnp.bfloat16]
  hid = np.einsum("mh,enh->men", np.asarray(x, np.float64), d) + bb[None]
  assert np.mean(np.abs(hid) > 7.0) > 0.02  # the gpt-oss clamp is exercised too
  # Feeding the interleaved weight without the helper is a different (wrong) layer.
  wrong = _fused(x, w13_inter, w2, router_logits=logits, top_k=k, activation="gptoss",
                 limit=7.0, w13_bias=b13_inter, w2_bias=b2)
  assert ref.rel_l2(wrong, want) > 0.1


@pytest.mark.parametrize("prepared", [None, "pairs"])
def test_gptoss_alpha_reaches_the_activation(rng, prepared):
  """A non-default alpha (gpt-oss uses 1.702) through fused_moe, unfused (checkpoint layout)
  and fused into GEMM 1 (gate/up pairs), against float64 with that alpha."""
  m, h, i, e, k = 21, 128, 64, 4, 2
  x, w13, w2 = _layer(rng, m, h, i, e)
  tw, ti = _distinct_topk(rng, m, e, k)
  a13 = nf.prepare(w13, gate_up_pairs=True) if prepared else w13
  a2 = nf.prepare(w2) if prepared else w2
  out = nf.fused_moe(x, a13, a2, topk_weights=tw, topk_ids=ti, activation="gptoss", limit=7.0,
                     alpha=0.5)
  want = _ref(x, w13, w2, tw, ti, activation_kind="gptoss", limit=7.0, alpha=0.5)
  assert ref.rel_l2(out, want) <= TOL[jnp.bfloat16]
  default = _ref(x, w13, w2, tw, ti, activation_kind="gptoss", limit=7.0)
  assert ref.rel_l2(default, want) > 10 * TOL[jnp.bfloat16]  # alpha matters at this size


def test_deinterleave_is_a_row_permutation(rng):
  w = random_experts(rng, 2, 8, 32)
  d = nf.deinterleave_gate_up(w)
  np.testing.assert_array_equal(np.asarray(d.packed)[:, :4], np.asarray(w.packed)[:, 0::2])
  np.testing.assert_array_equal(np.asarray(d.packed)[:, 4:], np.asarray(w.packed)[:, 1::2])
  np.testing.assert_array_equal(np.asarray(d.scales).view(np.uint8)[:, 4:],
                                np.asarray(w.scales).view(np.uint8)[:, 1::2])
  np.testing.assert_array_equal(np.asarray(nf.deinterleave_gate_up(jnp.arange(6), axis=0)),
                                [0, 2, 4, 1, 3, 5])
  with pytest.raises(ValueError, match="odd"):
    nf.deinterleave_gate_up(jnp.arange(5), axis=0)


def test_swiglu_with_biases(rng):
  x, w13, w2 = _layer(rng, 21, 64, 48, 5, dtype=jnp.float16)
  b13 = rng.standard_normal((5, 96)).astype(np.float32)
  b2 = rng.standard_normal((5, 64)).astype(np.float32)
  tw, ti = _distinct_topk(rng, 21, 5, 2)
  out = _fused(x, w13, w2, topk_weights=tw, topk_ids=ti, w13_bias=b13, w2_bias=b2)
  want = _ref(x, w13, w2, tw, ti, b13=b13, b2=b2)
  assert ref.rel_l2(out, want) <= TOL[jnp.float16]
  assert ref.rel_l2(_ref(x, w13, w2, tw, ti), want) > 0.05  # the biases matter


def test_activation_formulas_hand_values():
  h = jnp.array([[1.0, 20.0, 3.0, -30.0]], jnp.float32)  # gate = [1, 20], up = [3, -30]
  silu = lambda v: v / (1 + np.exp(-v))
  np.testing.assert_allclose(np.asarray(nf.apply_activation(h, "swiglu")),
                             [[silu(1) * 3, silu(20) * -30]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(nf.apply_activation(h, "swiglu", limit=7.0)),
                             [[silu(1) * 3, 7.0 * -7.0]], rtol=1e-6)
  sig = lambda v: 1 / (1 + np.exp(-v))
  np.testing.assert_allclose(np.asarray(nf.apply_activation(h, "gptoss", limit=7.0)),
                             [[1 * sig(1.702) * 4, 7 * sig(7 * 1.702) * (-7 + 1)]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(nf.apply_activation(h, "relu2")),
                             [[1.0, 400.0, 9.0, 0.0]])


# ----------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("case", ["empty_experts", "one_expert", "m1", "m_not_multiple"])
def test_edge_routings(rng, case):
  e, k = 8, 2
  m = {"m1": 1, "m_not_multiple": 19}.get(case, 40)
  x, w13, w2 = _layer(rng, m, 64, 32, e)
  tw, ti = _distinct_topk(rng, m, e, k)
  if case == "empty_experts":
    ti = np.where(ti < 4, ti, ti % 2 + 1).astype(np.int32)  # experts 4..7 and 0..? unused
    ti[:, 1] = np.where(ti[:, 1] == ti[:, 0], 3, ti[:, 1])
  elif case == "one_expert":
    ti = np.stack([np.full(m, 5), np.full(m, 2)], 1).astype(np.int32)
  out = _fused(x, w13, w2, topk_weights=tw, topk_ids=ti, block_m=16)
  assert ref.rel_l2(out, _ref(x, w13, w2, tw, ti)) <= TOL[jnp.bfloat16]


def test_block_m_does_not_change_the_result(rng):
  x, w13, w2 = _layer(rng, 50, 64, 32, 6)
  tw, ti = _distinct_topk(rng, 50, 6, 3)
  outs = [np.asarray(_fused(x, w13, w2, topk_weights=tw, topk_ids=ti, block_m=b), np.float64)
          for b in (8, 16, 32, 64)]
  for o in outs[1:]:  # each row is its own f32 dot whatever the blocking
    np.testing.assert_allclose(o, outs[0], rtol=1e-2, atol=1e-3)
    assert ref.rel_l2(o, outs[0]) < 1e-4


def test_leading_dims_m_zero_jit_eval_shape(rng):
  x, w13, w2 = _layer(rng, 6, 64, 32, 4)
  logits = rng.standard_normal((6, 4)).astype(np.float32)
  out = _fused(x.reshape(2, 3, 64), w13, w2, router_logits=logits.reshape(2, 3, 4), top_k=2)
  np.testing.assert_array_equal(np.asarray(out).reshape(6, 64),
                                np.asarray(_fused(x, w13, w2, router_logits=logits, top_k=2)))
  empty = _fused(x[:0], w13, w2, router_logits=logits[:0], top_k=2)
  assert empty.shape == (0, 64) and empty.dtype == jnp.bfloat16
  shape = jax.eval_shape(lambda a, b, c, l: nf.fused_moe(a, b, c, router_logits=l, top_k=2),
                         jax.ShapeDtypeStruct((1000, 64), jnp.float16), w13, nf.prepare(w2),
                         jax.ShapeDtypeStruct((1000, 4), jnp.float32))
  assert shape.shape == (1000, 64) and shape.dtype == jnp.float16


def test_deepseek_routing_through_fused_moe(rng):
  m, e, k = 17, 16, 4
  x, w13, w2 = _layer(rng, m, 64, 32, e)
  logits = rng.standard_normal((m, e)).astype(np.float32)
  bias = rng.uniform(-0.2, 0.2, e).astype(np.float32)
  cfg = nf.RoutingConfig.deepseek_v3(k, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                     correction_bias=jnp.asarray(bias))
  out = jax.jit(lambda *a: nf.fused_moe(*a[:3], router_logits=a[3], routing=a[4]))(
      x, w13, w2, logits, cfg)
  tw, ti = ref.route(logits, k, scoring="sigmoid", n_group=4, topk_group=2,
                     routed_scaling_factor=2.5, correction_bias=bias)
  assert ref.rel_l2(out, _ref(x, w13, w2, tw, ti)) <= TOL[jnp.bfloat16]


def test_vmap_over_a_batch_of_sequences(rng):
  x, w13, w2 = _layer(rng, 12, 64, 32, 4)
  tw, ti = _distinct_topk(rng, 12, 4, 2)
  p13, p2 = nf.prepare(w13), nf.prepare(w2)
  f = lambda xx, w, i: nf.fused_moe(xx, p13, p2, topk_weights=w, topk_ids=i)
  out = jax.jit(jax.vmap(f))(x.reshape(3, 4, 64), tw.reshape(3, 4, 2), ti.reshape(3, 4, 2))
  jf = jax.jit(f)
  for b in range(3):
    np.testing.assert_array_equal(np.asarray(out[b]),
                                  np.asarray(jf(x[4 * b:4 * b + 4], tw[4 * b:4 * b + 4],
                                                ti[4 * b:4 * b + 4])))
  # Batched expert weights are refused, not looped over silently.
  with pytest.raises(NotImplementedError, match="nvfp4_moe_gemm: vmap over the expert weights"):
    jax.vmap(lambda gs: nf.fused_moe(x, dataclasses.replace(p13, global_scale=gs), p2,
                                     topk_weights=tw, topk_ids=ti))(
        jnp.stack([p13.global_scale] * 2))


# ----------------------------------------------------------------------------- the primitive

def _contract_numpy(x, w, sorted_ids, block_expert, num_padded, topk_weights, bias, *, gather_div,
                    num_rows_out, block_m):
  """The contract of nvfp4_moe_gemm, literally, in float64."""
  W = ref.dequantize_experts(w)
  out = np.zeros((num_rows_out, W.shape[1]))
  for b in range(len(block_expert)):
    e = block_expert[b]
    if b * block_m >= num_padded or e < 0:
      continue
    for r in range(block_m):
      sid = sorted_ids[b * block_m + r]
      if sid < num_rows_out:
        v = np.asarray(x, np.float64)[sid // gather_div] @ W[e].T
        if bias is not None:
          v = v + bias[e]
        out[sid] = v * (topk_weights[sid] if topk_weights is not None else 1.0)
  return out


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_primitive_contract_hand_schedule(rng, monkeypatch, loop, dtype):
  """A schedule that exercises every rule: -1 blocks, blocks past num_padded that name a real
  expert (must be skipped), sids >= num_rows_out, gathers, epilogue weight and bias."""
  if loop:  # force the one-expert-at-a-time path
    monkeypatch.setattr(moe_ops, "SMALL_ALL_EXPERTS", 0)
  e, n, k, bm = 3, 40, 96, 8
  w = random_experts(rng, e, n, k)
  rows_out, gd = 20, 2
  x = jnp.asarray(rng.standard_normal((10, k)), dtype)
  sids = np.full(48, 99, np.int32)
  sids[0:5] = [0, 7, 3, 19, 25]     # block 0 -> expert 2 (25 >= rows_out: skipped)
  sids[8:11] = [1, 2, 4]            # block 1 -> -1 (skipped)
  sids[16:20] = [5, 6, 8, 9]        # block 2 -> expert 0
  sids[24:26] = [10, 11]            # block 3 -> expert 1
  sids[32:34] = [12, 13]            # block 4 -> expert 1 but past num_padded = 32: skipped
  block_expert = np.array([2, -1, 0, 1, 1, -1], np.int32)
  tw = rng.uniform(0.1, 1, rows_out).astype(np.float32)
  bias = rng.standard_normal((e, n)).astype(np.float32)
  p = nf.prepare(w)
  al = nf.Alignment(jnp.asarray(sids), jnp.asarray(block_expert), jnp.array([32], jnp.int32),
                    block_m=bm, num_pairs=rows_out)
  for weights, b in ((None, None), (tw, bias)):
    out = jax.jit(lambda xx: nf.nvfp4_moe_gemm(xx, p, al, gather_div=gd, num_rows_out=rows_out,
                                               topk_weights=weights, bias=b))(x)
    assert out.shape == (rows_out, n) and out.dtype == dtype
    want = _contract_numpy(x, w, sids, block_expert, 32, weights, b, gather_div=gd,
                           num_rows_out=rows_out, block_m=bm)
    written = [0, 7, 3, 19, 5, 6, 8, 9, 10, 11]
    untouched = np.setdiff1d(np.arange(rows_out), written)
    assert not np.asarray(out)[untouched].any()
    assert ref.rel_l2(np.asarray(out)[written], want[written]) <= GEMM_TOL[dtype]


def test_reference_loop_path_equals_all_at_once(rng, monkeypatch):
  x, w13, w2 = _layer(rng, 30, 64, 32, 5)
  tw, ti = _distinct_topk(rng, 30, 5, 2)
  p13, p2 = nf.prepare(w13), nf.prepare(w2)
  f = jax.jit(lambda a, b: nf.fused_moe(x, a, b, topk_weights=tw, topk_ids=ti, block_m=8))
  a = f(p13, p2)
  monkeypatch.setattr(moe_ops, "SMALL_ALL_EXPERTS", 0)
  f = jax.jit(lambda a, b: nf.fused_moe(x, a, b, topk_weights=tw, topk_ids=ti, block_m=8))
  b = f(p13, p2)
  c = f(w13, w2)
  assert ref.rel_l2(b, np.asarray(a, np.float64)) < 1e-4
  np.testing.assert_array_equal(np.asarray(b), np.asarray(c))


def test_primitive_abstract_eval_errors(rng):
  w = random_experts(rng, 2, 32, 64)
  p = nf.prepare(w)
  x = jnp.zeros((4, 64), jnp.bfloat16)
  al = nf.align_tokens(jnp.zeros((4, 1), jnp.int32), 2, 8)
  ok = dict(gather_div=1, num_rows_out=4)
  assert jax.eval_shape(lambda: nf.nvfp4_moe_gemm(x, p, al, **ok)).shape == (4, 32)
  bind = moe_ops.nvfp4_moe_gemm_p.bind
  args = [x, p.qweight, p.qscales, p.global_scale, al.sorted_ids, al.block_expert,
          al.num_padded, jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)]
  params = dict(n=32, k=64, gather_div=1, num_rows_out=4, block_m=8, mul_topk_weight=False,
                has_bias=False, zero_unwritten=True, backend="auto")
  cases = [
      ({0: x.astype(jnp.float32)}, {}, TypeError, "bfloat16 or float16"),
      ({0: jnp.zeros((4, 48), jnp.bfloat16)}, {}, ValueError, "k = 64"),
      ({}, {"k": 60}, ValueError, "k % 16"),
      ({}, {"n": 48}, ValueError, "qweight must have shape"),
      ({1: p.qweight[0]}, {}, ValueError, "stacked"),
      ({2: p.qscales.astype(jnp.int32)}, {}, TypeError, "qscales must be uint8"),
      ({3: p.global_scale[:1]}, {}, ValueError, "global_scale must have shape"),
      ({4: al.sorted_ids[:-1]}, {}, ValueError, "multiple of block_m"),
      ({5: al.block_expert[:-1]}, {}, ValueError, "block_expert must have shape"),
      ({6: jnp.zeros((2,), jnp.int32)}, {}, ValueError, "num_padded"),
      ({}, {"mul_topk_weight": True}, ValueError, r"topk_weights must have shape \(4,\)"),
      ({}, {"has_bias": True}, ValueError, r"bias must have shape \(2, 32\)"),
      ({}, {"block_m": 12}, ValueError, "block_m must be one of"),
      ({}, {"num_rows_out": 5}, ValueError, "reads rows"),
      ({4: al.sorted_ids.astype(jnp.uint32)}, {}, TypeError, "sorted_ids must be int32"),
      ({}, {"backend": "kernel"}, ValueError, "backend must be one of"),
      ({}, {"zero_unwritten": "no"}, TypeError, "zero_unwritten must be a bool"),
      ({}, {"expert_rows": -1}, ValueError, "expert_rows must be >= 0"),
      ({}, {"expert_rows": 1.5}, TypeError, "expert_rows must be an int"),
  ]
  for over, pover, exc, match in cases:
    a = list(args)
    for i, v in over.items():
      a[i] = v
    with pytest.raises(exc, match=match):
      jax.eval_shape(lambda *ops: bind(*ops, **{**params, **pover}), *a)


def test_fused_moe_bad_inputs_raise(rng):
  x, w13, w2 = _layer(rng, 4, 64, 32, 4)
  tw, ti = _distinct_topk(rng, 4, 4, 2)
  kw = dict(topk_weights=tw, topk_ids=ti)
  relu_w13 = random_experts(rng, 4, 32, 64)
  cases = [
      (lambda: nf.fused_moe(x.astype(jnp.float32), w13, w2, **kw), TypeError, "bfloat16"),
      (lambda: nf.fused_moe(x[:, :32], w13, w2, **kw), ValueError, "hidden size"),
      (lambda: nf.fused_moe(x, w13, jax.tree.map(lambda a: a[:3], w2), **kw), ValueError,
       "w2 has 3"),
      (lambda: nf.fused_moe(x, w2, w2, **kw), ValueError, "hidden size"),
      (lambda: nf.fused_moe(x, w13, w2, activation="relu2", **kw), ValueError, "needs w13"),
      (lambda: nf.fused_moe(x, relu_w13, w2, **kw), ValueError, r"needs w13 \[E, 64, H\]"),
      (lambda: nf.fused_moe(x, relu_w13, w2, activation="relu2", limit=5.0, **kw), ValueError,
       "relu2"),
      (lambda: nf.fused_moe(x, w13, w2, activation="gptoss", **kw), ValueError, "limit=7"),
      (lambda: nf.fused_moe(x, w13, w2, activation="gelu", **kw), ValueError, "activation"),
      (lambda: nf.fused_moe(x, w13, w2, limit=-1.0, **kw), ValueError, "> 0"),
      (lambda: nf.fused_moe(x, w13, w2, router_logits=np.zeros((4, 4)), top_k=5), ValueError,
       "exceeds"),
      (lambda: nf.fused_moe(x, w13, w2, topk_weights=np.ones((4, 5)),
                            topk_ids=np.zeros((4, 5), np.int32)), ValueError, "top_k = 5"),
      (lambda: nf.fused_moe(x, w13, w2, router_logits=np.zeros((4, 4))), ValueError, "top_k"),
      (lambda: nf.fused_moe(x, w13, w2), ValueError, "router_logits"),
      (lambda: nf.fused_moe(x, w13, w2, router_logits=np.zeros((4, 4)), top_k=2, **kw),
       ValueError, "not both"),
      (lambda: nf.fused_moe(x, w13, w2, topk_weights=tw, topk_ids=ti.astype(np.float32)),
       TypeError, "integer"),
      (lambda: nf.fused_moe(x, w13, w2, topk_weights=tw[:, :1], topk_ids=ti), ValueError,
       "topk_weights must have shape"),
      (lambda: nf.fused_moe(x, w13, w2, topk_weights=tw, topk_ids=ti[:3]), ValueError,
       "topk_ids must be"),
      (lambda: nf.fused_moe(x, w13, w2, w13_bias=np.zeros((4, 32)), **kw), ValueError,
       r"w13_bias must have shape \(4, 64\)"),
      (lambda: nf.fused_moe(x, w13, w2, w2_bias=np.zeros((4, 32)), **kw), ValueError,
       r"w2_bias must have shape \(4, 64\)"),
      (lambda: nf.fused_moe(x, w13, w2, expert_map=np.zeros((2,), np.int32), **kw), ValueError,
       "expert_map has 2"),
      (lambda: nf.fused_moe(x, w13, w2, block_m=24, **kw), ValueError, "block_m"),
      (lambda: nf.fused_moe(x, jnp.zeros((4, 64, 64)), w2, **kw), TypeError, "NVFP4Weight"),
      (lambda: nf.fused_moe(x, jax.tree.map(lambda a: a[0], w13), w2, **kw), ValueError,
       "stacked"),
      (lambda: nf.fused_moe(x, w13, w2, router_logits=np.zeros((4, 4)), top_k=3,
                            routing=nf.RoutingConfig(top_k=2)), ValueError, "disagrees"),
      (lambda: nf.fused_moe(x, w13, w2, activation="gptoss", limit=np.inf, **kw), ValueError,
       "finite limit"),
      (lambda: nf.fused_moe(x, w13, w2, expert_map=np.arange(4, dtype=np.uint8), **kw),
       ValueError, "signed integer"),
  ]
  for fn, exc, match in cases:
    with pytest.raises(exc, match=match):
      fn()


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_zero_tokens_with_a_given_routing(rng, lead):
  _, w13, w2 = _layer(rng, 1, 64, 32, 4)
  x = jnp.ones((*lead, 64), jnp.bfloat16)
  out = nf.fused_moe(x, w13, w2, topk_weights=np.ones((*lead, 2), np.float32),
                     topk_ids=np.zeros((*lead, 2), np.int32))
  assert out.shape == (*lead, 64) and out.dtype == jnp.bfloat16


def test_traced_expert_map_values_past_the_local_experts_count_as_held_elsewhere(rng):
  """A traced map cannot be checked at trace time: a value >= E_local must not name an expert
  the weights do not hold (NaN rows on the reference, a read past the weights in the kernel)."""
  m, e_local = 12, 3
  x, w13, w2 = _layer(rng, m, 64, 32, e_local)
  tw, ti = _distinct_topk(rng, m, 5, 2)
  f = jax.jit(lambda emap: nf.fused_moe(x, w13, w2, topk_weights=tw, topk_ids=ti,
                                        expert_map=emap))
  bad = f(jnp.asarray([0, 1, 2, 3, -1], jnp.int32))   # global 3 -> local 3: not held here
  good = f(jnp.asarray([0, 1, 2, -1, -1], jnp.int32))
  assert np.isin(np.asarray(ti), [3]).any()
  assert np.isfinite(np.asarray(bad, np.float32)).all()
  np.testing.assert_array_equal(np.asarray(bad), np.asarray(good))


def test_grouped_gemm_refuses_more_rows_than_the_alignment_has_pairs(rng):
  x, w13, _ = _layer(rng, 5, 64, 32, 4)
  _, ti = _distinct_topk(rng, 5, 4, 2)
  al = nf.align_tokens(jnp.asarray(ti), 4, 8)
  p13 = nf.prepare(w13)
  nf.nvfp4_moe_gemm(x, p13, al, gather_div=2, num_rows_out=10)
  with pytest.raises(ValueError, match="exceeds the alignment's 10"):
    nf.nvfp4_moe_gemm(x, p13, al, gather_div=2, num_rows_out=12)


@pytest.mark.parametrize("pairs", [False, True])
def test_cuda_lowering_emits_the_ffi_call(rng, monkeypatch, pairs):
  """The CUDA lowering (exported for the cuda platform, no GPU needed): operands in contract
  order, attributes typed as the handler binds them, the workspace result only internal; with
  a gate_up_pairs w13, GEMM 1 carries the activation and writes [rows, I]."""
  # The lowering rule asks at lowering time whether the kernel is built (here it is not).
  targets = (moe_ops.CUDA_TARGET, moe_align.CUDA_TARGET, moe_route.CUDA_TARGET)
  monkeypatch.setattr(nf._ffi, "REGISTERED", nf._ffi.REGISTERED | set(targets))
  p13 = nf.prepare(random_experts(rng, 4, 64, 128), gate_up_pairs=pairs)
  p2 = nf.prepare(random_experts(rng, 4, 128, 32))
  f = jax.jit(lambda x, l: nf.fused_moe(x, p13, p2, router_logits=l, top_k=2,
                                        activation="gptoss", limit=7.0))
  exp = jax.export.export(f, platforms=["cuda"], disabled_checks=[
      jax.export.DisabledSafetyCheck.custom_call(t) for t in targets])(
          jax.ShapeDtypeStruct((3, 128), jnp.bfloat16), jax.ShapeDtypeStruct((3, 4), jnp.float32))
  lines = exp.mlir_module().split("\n")
  calls = [l for l in lines if "custom_call @jax_nvfp4_moe_gemm_cuda" in l]
  routing = [l for l in lines if f"custom_call @{moe_route.CUDA_TARGET}" in l]
  assert len(calls) == 2 and exp.out_avals[0].shape == (3, 128)
  # Routing and alignment are one launch at decode (no sort, no separate alignment).
  assert len(routing) == 1 and ("(tensor<3x4xf32>, tensor<0xf32>, tensor<0xi32>) -> "
                                "(tensor<3x2xf32>, tensor<3x2xi32>, tensor<40xi32>") in routing[0]
  assert not any(f"@{moe_align.CUDA_TARGET}" in l or "sort" in l for l in lines)
  gemm1, gemm2 = calls
  for attr in ("block_m = 8 : i64", "num_rows_out = 6 : i64", "splits = 1 : i64",
               "k_slices = 1 : i64", "tiles_per_block = 1 : i64", "cluster = false",
               "has_bias = false",
               "zero_unwritten = false"):
    assert attr in gemm1 and attr in gemm2
  assert "gather_div = 2 : i64" in gemm1 and "mul_topk_weight = false" in gemm1
  assert "n = 64 : i64" in gemm1 and "k = 128 : i64" in gemm1
  assert "gather_div = 1 : i64" in gemm2 and "mul_topk_weight = true" in gemm2
  assert ("(tensor<3x128xbf16>, tensor<4x4x2x32x4xui32>, tensor<4x4x2x64xui8>, tensor<4xf32>, "
          "tensor<40xi32>, tensor<5xi32>, tensor<1xi32>, tensor<0xf32>, tensor<0xf32>) -> "
          f"(tensor<6x{32 if pairs else 64}xbf16>, tensor<256xui8>)") in gemm1
  assert f"activation = {2 if pairs else 0} : i64" in gemm1 and "activation = 0 : i64" in gemm2
  if pairs:
    assert "act_limit = 7.000000e+00 : f32" in gemm1 and "act_alpha = 1.702" in gemm1
  assert "tensor<6xf32>, tensor<0xf32>) -> (tensor<6x128xbf16>" in gemm2


def test_split_k_choice_and_workspace(monkeypatch):
  monkeypatch.setattr(moe_ops._ffi, "sm_count", lambda: 132)           # an H100's SMs
  monkeypatch.setattr(moe_ops._ffi, "moe_blocks_per_sm", lambda mt, bf16: 3)
  # Mixtral-like GEMM2 at decode: 32 N blocks x 2 tiles leave SMs idle and K = 14336 is long.
  assert moe_ops.choose_moe_splits(16, 4096, 14336, 8) == 4
  # Qwen3-like GEMM1/GEMM2 at decode: K of 2048 / 768 is too short to pay for a split
  # (measured: NOTES_moe.md v5); so is one k64 chunk.
  assert moe_ops.choose_moe_splits(64, 1536, 2048, 8) == 1
  assert moe_ops.choose_moe_splits(64, 2048, 768, 8) == 1
  assert moe_ops.choose_moe_splits(64, 2048, 64, 8) == 1
  assert moe_ops.choose_moe_splits(48896, 4096, 7168, 64) == 1   # prefill: no split
  s = moe_ops.choose_moe_splits(16, 4096, 14336, 8)
  assert moe_ops.moe_workspace_bytes(16, 4096, 8, s) == 256 + s * 16 * 4096 * 4  # 2x32 tickets
  assert moe_ops.moe_workspace_bytes(64, 2048, 8, 1) == 256


@pytest.mark.parametrize("slots, n, k, block_m, blocks, want", [
    (16, 28672, 4096, 8, 2, 4),     # Mixtral-like decode, GEMM 1: 2 token tiles; 14 N tiles
                                    # per block with 8 slices, 7 pairs with 4
    (16, 4096, 14336, 8, 2, 4),     # GEMM 2 (K = 7 k-sliced units): 2 tiles or 1 pair
    (32, 4096, 14336, 8, 1, 4),     # 4 token tiles; one k-sliced block per SM: 8 or 4 x 2
    (32, 3584, 4096, 8, 1, 8),      # 224 N tiles over 33 blocks per token tile: 7, or 4 pairs
    (16, 4096, 14336, 8, 0, 1),     # a k-sliced block does not fit an SM (an L4's)
    (16, 4096, 14336, 16, 2, 1),    # block_m 16
    (64, 1536, 2048, 8, 2, 1),      # Qwen3-like decode: 8 token tiles
    (16, 4096, 7168, 8, 2, 1),      # K = 3.5 k-sliced units
    (16, 2048, 768, 8, 2, 1),       # K shorter than a unit
])
def test_k_slices_at_decode_with_few_token_tiles(monkeypatch, slots, n, k, block_m, blocks,
                                                 want):
  monkeypatch.setattr(moe_ops.dense_ops, "k_sliced_blocks_per_sm",
                      lambda moe=False, m_tile=1, rows=0, k_slices=8: blocks)
  monkeypatch.setattr(moe_ops.dense_ops, "_sm_count", lambda: 132)
  assert moe_ops.choose_moe_k_slices(slots, n, k, block_m) == want
  tpb = moe_ops.choose_moe_tiles_per_block(slots, n, block_m, want)
  if want == 1:
    assert tpb == 1
  else:  # every token tile's blocks together make at most one wave
    tiles = -(-(-(-n // 16)) // (8 // want))  # N tiles, or pairs of them with 4 slices
    assert (slots // block_m) * -(-tiles // tpb) <= 132 * blocks


def _capacity_slots(tokens, top_k, experts, block_m=64):
  from jax_nvfp4.moe.align import capacity
  return capacity(tokens * top_k, experts, block_m)


@pytest.mark.parametrize("slots, n, k, block_m, splits, want", [
    (_capacity_slots(4096, 8, 128), 2048, 768, 64, 1, 4),    # Qwen3-like GEMM 2, T = 4096
    (_capacity_slots(4096, 8, 128), 1536, 2048, 64, 1, 4),   # its GEMM 1: 8 units x 4
    (_capacity_slots(1024, 8, 128), 2048, 768, 64, 1, 2),    # T = 1024: 4 would be < 4 waves
    (_capacity_slots(4096, 8, 256), 4096, 7168, 64, 1, 1),   # DeepSeek-like GEMM 1: K is long
    (_capacity_slots(4096, 8, 256), 7168, 2048, 64, 1, 4),   # its GEMM 2
    (_capacity_slots(4096, 2, 8), 28672, 4096, 64, 1, 2),    # Mixtral-like GEMM 1: 16 units
    (_capacity_slots(1024, 2, 8), 4096, 14336, 64, 1, 1),    # GEMM 2 at T = 1024 (measured loss)
    (_capacity_slots(4096, 8, 128), 2048, 768, 32, 1, 1),    # block_m 32
    (_capacity_slots(4096, 8, 128), 2048, 768, 64, 2, 1),    # K split across blocks
    (64, 100, 768, 64, 1, 1),                                # one N block
    # Decode (block_m 8), 3 blocks per SM in this test's figures: 2 N blocks where K has at
    # most 8 units and 2 waves remain.
    (_capacity_slots(16, 8, 128, 8), 2048, 768, 8, 1, 2),    # Qwen3-like GEMM 2, T = 16
    (_capacity_slots(16, 8, 128, 8), 1536, 2048, 8, 1, 1),   # its GEMM 1: 6 x 128 < 2 waves
    (_capacity_slots(16, 8, 256, 8), 7168, 2048, 8, 1, 2),   # DeepSeek-like GEMM 2
    (_capacity_slots(16, 8, 256, 8), 4096, 7168, 8, 1, 1),   # its GEMM 1: 28 units
    (_capacity_slots(4, 2, 8, 8), 28672, 4096, 8, 1, 1),     # Mixtral-like GEMM 1: 16 units
    (_capacity_slots(1, 8, 128, 8), 2048, 768, 8, 1, 1),     # T = 1: under a wave
    (_capacity_slots(16, 8, 128, 8), 2048, 768, 8, 2, 1),    # K split across blocks
])
def test_prefill_tiles_per_block(monkeypatch, slots, n, k, block_m, splits, want):
  """Several N blocks per block at block_m 64 where K is short, the block runs at most
  MOE_PREFILL_MAX_UNITS units and the grid keeps MOE_PREFILL_MIN_WAVES waves; at block_m 8
  two where K has at most MOE_DECODE_TILES_MAX_UNITS units and MOE_DECODE_TILES_MIN_WAVES
  waves remain; never with split K or at block_m 16 / 32."""
  per_sm = 3 if block_m == 8 else 2
  monkeypatch.setattr(moe_ops._ffi, "sm_count", lambda: 132)           # an H100's SMs
  monkeypatch.setattr(moe_ops._ffi, "moe_blocks_per_sm", lambda mt, bf16: per_sm)
  got = moe_ops.choose_moe_prefill_tiles(slots, n, k, block_m, splits)
  assert got == want
  n_blocks = -(-(-(-n // 16)) // 8)
  units = -(-(-(-k // 64)) // 4)
  assert 1 <= got <= n_blocks
  if got > 1 and block_m == 64:
    assert units * got <= moe_ops.MOE_PREFILL_MAX_UNITS
    assert -(-n_blocks // got) * (slots // block_m) >= moe_ops.MOE_PREFILL_MIN_WAVES * 132 * 2
  if got > 1 and block_m == 8:
    assert got == 2 and units <= moe_ops.MOE_DECODE_TILES_MAX_UNITS
    assert -(-n_blocks // 2) * (slots // 8) >= moe_ops.MOE_DECODE_TILES_MIN_WAVES * 132 * 3


@pytest.mark.parametrize("limit", [0, 1, 2, 16])
def test_cluster_reduction_policy(monkeypatch, limit):
  """Splits reduce in a cluster only for 2..CLUSTER_MAX_SPLITS (3) and only up to the largest
  cluster the device launches (0: none, e.g. no sm_90 code); then no workspace is needed."""
  from jax_nvfp4.ops import dense
  monkeypatch.setattr(dense, "_cluster_limit", lambda m_tile: limit)
  monkeypatch.setattr(moe_ops, "moe_cluster_limit", lambda block_m, bf16=True: limit)
  for splits in range(1, 9):
    want = 2 <= splits <= min(3, limit)
    assert dense.use_cluster(splits, 1) == want
    assert moe_ops.use_moe_cluster(splits, 8) == want
  assert dense.workspace_bytes(1, 4096, 2, 1, cluster=True) == 256
  assert dense.workspace_bytes(1, 4096, 2, 1, cluster=False) == 256 + 2 * 4096 * 4
  assert moe_ops.moe_workspace_bytes(64, 2048, 8, 3, cluster=True) == 256


@pytest.mark.parametrize("k", [16, 64, 192, 256, 320, 768, 2048, 7168])
@pytest.mark.parametrize("slots", [8, 64, 512])
def test_split_k_never_exceeds_the_kernel_units(k, slots):
  # The handler accepts at most one split per pipeline unit: four k64 chunks, eight at m_tile 2
  # (csrc/nvfp4_tile.cuh unsliced_unit_chunks).
  k64 = -(-k // 64)
  units = {1: -(-k64 // 4), 2: -(-k64 // 8), 4: -(-k64 // 4), 8: -(-k64 // 4)}
  assert 1 <= moe_ops.choose_moe_splits(slots, 256, k, 8) <= units[1]
  assert 1 <= moe_ops.choose_moe_splits(slots, 256, k, 16) <= units[2]
  from jax_nvfp4.ops import dense
  for m, m_tile in ((1, 1), (9, 2), (16, 2), (17, 4), (40, 8), (300, 8)):
    splits, got_tile = dense.choose_launch(m, 256, k)
    assert got_tile == m_tile and 1 <= splits <= units[m_tile]


# ----------------------------------------------------------------------------- backend choice


def _kernel_calls(fn, *args, platform="cuda") -> int:
  """Custom calls to the grouped-GEMM kernel in ``fn``'s module lowered for ``platform``."""
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return text.count(moe_ops.CUDA_TARGET)


@pytest.fixture
def kernel_built(monkeypatch):
  """Pretends the grouped-GEMM kernel is built: what the CUDA lowering rule asks at lowering
  time. Lowering does not need the handler; these modules are never compiled."""
  monkeypatch.setattr(nf._ffi, "REGISTERED", nf._ffi.REGISTERED | {moe_ops.CUDA_TARGET})


def test_backend_picks_the_lowering_for_cuda(rng, kernel_built):
  x, w13, w2 = _layer(rng, 6, 64, 32, 4)
  p13, p2 = nf.prepare(w13), nf.prepare(w2)
  logits = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
  layer = lambda backend: (lambda a, l: nf.fused_moe(a, p13, p2, router_logits=l, top_k=2,
                                                     backend=backend))
  if jax.default_backend() != "gpu":
    # Off a GPU, "auto" leaves the choice to the lowering: the kernel when lowered for cuda.
    assert _kernel_calls(layer(None), x, logits) == 2
    assert _kernel_calls(layer("auto"), x, logits) == 2
  assert _kernel_calls(layer("reference"), x, logits) == 0
  assert _kernel_calls(layer("reference"), x, logits, platform="cpu") == 0
  # Checkpoint-layout weights with "reference" are never prepared for the kernel either.
  assert _kernel_calls(lambda a, l: nf.fused_moe(a, w13, w2, router_logits=l, top_k=2,
                                                 backend="reference"), x, logits) == 0
  # The primitive itself: "cuda" is the kernel (and cannot lower for the CPU).
  al = nf.align_tokens(jnp.asarray(_distinct_topk(rng, 6, 4, 2)[1]), 4, 8)
  gemm = lambda backend: (lambda a: nf.nvfp4_moe_gemm(a, p13, al, gather_div=2, num_rows_out=12,
                                                      backend=backend))
  assert _kernel_calls(gemm("cuda"), x) == 1
  assert _kernel_calls(gemm("reference"), x) == 0
  with pytest.raises(ValueError, match="cannot lower for platform"):
    _kernel_calls(gemm("cuda"), x, platform="cpu")


def test_auto_on_a_gpu_machine_still_lowers_for_the_host(rng, kernel_built, monkeypatch):
  # On a GPU machine None/"auto" resolves to the kernel (weights prepared at trace time), but a
  # computation placed on the host must lower there to the reference, not fail as "cuda" does.
  monkeypatch.setattr(moe_ops, "resolve_backend", lambda backend, *a, **k: (
      "cuda" if backend in (None, "auto", "cuda") else backend))
  x, w13, w2 = _layer(rng, 6, 64, 32, 4)
  logits = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
  layer = lambda backend: (lambda a, l: nf.fused_moe(a, w13, w2, router_logits=l, top_k=2,
                                                     backend=backend))
  for backend in (None, "auto"):
    assert _kernel_calls(layer(backend), x, logits) == 2
    assert _kernel_calls(layer(backend), x, logits, platform="cpu") == 0
  with pytest.raises(ValueError, match="cannot lower for platform"):
    _kernel_calls(layer("cuda"), x, logits, platform="cpu")
  # And it computes: the same result as the reference backend, on the CPU.
  got = jax.jit(layer(None))(x, logits)
  want = jax.jit(layer("reference"))(x, logits)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_backend_without_the_kernel(rng):
  x, w13, w2 = _layer(rng, 6, 64, 32, 4)
  p13 = nf.prepare(w13)
  al = nf.align_tokens(jnp.asarray(_distinct_topk(rng, 6, 4, 2)[1]), 4, 8)
  gemm = lambda backend: (lambda a: nf.nvfp4_moe_gemm(a, p13, al, gather_div=2, num_rows_out=12,
                                                      backend=backend))
  if moe_ops.CUDA_TARGET not in nf._ffi.REGISTERED:
    assert _kernel_calls(gemm("auto"), x) == 0  # auto falls back to the reference
    with pytest.raises(ValueError, match="not in this build"):
      gemm("cuda")(x)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match=r"fused_moe: .*backend='cuda' cannot serve.*cuda: "
                                         r"needs an NVIDIA GPU"):
      nf.fused_moe(x, w13, w2, topk_weights=np.ones((6, 1), np.float32),
                   topk_ids=np.zeros((6, 1), np.int32), backend="cuda")
  with pytest.raises(ValueError, match="backend must be"):
    nf.fused_moe(x, w13, w2, topk_weights=np.ones((6, 1), np.float32),
                 topk_ids=np.zeros((6, 1), np.int32), backend="kernel")
  with pytest.raises(ValueError, match="backend must be"):
    gemm("kernel")(x)


@pytest.mark.parametrize("prepared", [False, True])
def test_reference_backend_equals_default(rng, prepared):
  x, w13, w2 = _layer(rng, 20, 64, 32, 4)
  b13 = jnp.asarray(rng.standard_normal((4, 64)) * 0.1, jnp.float32)
  if prepared:
    w13, w2 = nf.prepare(w13), nf.prepare(w2)
  logits = jnp.asarray(rng.standard_normal((20, 4)), jnp.float32)
  run = lambda backend: jax.jit(lambda a, l: nf.fused_moe(
      a, w13, w2, router_logits=l, top_k=2, w13_bias=b13, backend=backend))(x, logits)
  ref_out, default = np.asarray(run("reference")), np.asarray(run(None))
  if jax.default_backend() == "gpu" and moe_ops.CUDA_TARGET in nf._ffi.REGISTERED:
    assert ref.rel_l2(ref_out, np.asarray(default, np.float64)) <= TOL[jnp.bfloat16]
  else:  # the default is the reference here: the same computation
    np.testing.assert_array_equal(ref_out, default)
  # And the layer it computes (so "equal" is not two identical wrong answers).
  ck13, ck2 = (nf.unprepare(w13), nf.unprepare(w2)) if prepared else (w13, w2)
  tw, ti = ref.route(logits, 2)
  want = _ref(x, ck13, ck2, tw, ti, b13=np.asarray(b13, np.float64))
  assert ref.rel_l2(ref_out, want) <= TOL[jnp.bfloat16]


# ----------------------------------------------------------------------------- fused activation

def _pairs_order(i):
  """Row order of a w13 prepared with gate_up_pairs, from [gate; up] (I gate rows, I up rows):
  per 16-row tile, 8 gate rows then the same 8 up rows."""
  return np.concatenate([np.r_[8 * t:8 * t + 8, i + 8 * t:i + 8 * t + 8] for t in range(i // 8)])


def test_prepare_gate_up_pairs_row_order_and_round_trip(rng):
  w = random_experts(rng, 3, 96, 128)  # I = 48: six pairs, three tiles
  p = nf.prepare(w, gate_up_pairs=True)
  assert p.gate_up_pairs and p.n == 96 and p.shape == (3, 96, 128)
  order = _pairs_order(48)
  by_hand = nf.prepare(nf.NVFP4Weight(w.packed[:, order], w.scales[:, order], w.global_scale))
  assert not by_hand.gate_up_pairs
  np.testing.assert_array_equal(np.asarray(p.qweight), np.asarray(by_hand.qweight))
  np.testing.assert_array_equal(np.asarray(p.qscales), np.asarray(by_hand.qscales))
  back = nf.unprepare(p)  # [gate; up] again
  np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(w.packed))
  np.testing.assert_array_equal(np.asarray(back.scales.astype(np.float32)),
                                np.asarray(w.scales.astype(np.float32)))
  with pytest.raises(ValueError, match="gate_up_pairs needs"):
    nf.prepare(random_experts(rng, 2, 40, 64), gate_up_pairs=True)  # I = 20: not whole pairs


@pytest.mark.parametrize("activation, limit, with_bias, alpha", [("swiglu", None, False, None),
                                                                 ("swiglu", 3.0, True, None),
                                                                 ("gptoss", 7.0, True, None),
                                                                 ("gptoss", 7.0, False, 1.0),
                                                                 ("relu2", None, False, None)])
def test_primitive_fused_activation_against_float64(rng, activation, limit, with_bias, alpha):
  """The grouped GEMM with the activation in its epilogue (reference lowering here; the same
  contract as the kernel, which tests/test_moe_gpu.py checks with this function)."""
  check_fused_activation_primitive(rng, activation, limit, with_bias, 19, 128, 48, 5, 2,
                                   alpha=alpha)


def check_fused_activation_primitive(rng, activation, limit, with_bias, m, h, i, e, k, *,
                                     alpha=None):
  """``nvfp4_moe_gemm(..., activation=)`` against a float64 per-row loop over the [gate; up]
  checkpoint, on fresh random data (``alpha``: gptoss's, None for the default 1.702)."""
  kw = {} if alpha is None else {"alpha": alpha}
  gated = activation != "relu2"
  n = 2 * i if gated else i
  w = random_experts(rng, e, n, h, out_std=3.0 if limit is None else 2 * limit)
  x = jnp.asarray(rng.standard_normal((m, h)), jnp.bfloat16)
  tw, ti = _distinct_topk(rng, m, e, k)
  tw = tw.astype(np.float32)
  b = rng.standard_normal((e, n)).astype(np.float32) if with_bias else None
  al = nf.align_tokens(jnp.asarray(ti), e, 8)
  pw = nf.prepare(w, gate_up_pairs=gated)
  pb = None if b is None else (b[:, _pairs_order(i)] if gated else b)
  out = jax.jit(lambda xx: nf.nvfp4_moe_gemm(
      xx, pw, al, gather_div=k, num_rows_out=m * k, topk_weights=tw.reshape(-1), bias=pb,
      activation=activation, limit=limit, **kw))(x)
  assert out.shape == (m * k, i) and out.dtype == jnp.bfloat16
  d = ref.dequantize_experts(w)
  x64 = np.asarray(x, np.float64)
  want = np.zeros((m * k, i))
  hid = np.zeros((m * k, n))
  for t in range(m):
    for j in range(k):
      hid[t * k + j] = d[ti[t, j]] @ x64[t] + (0.0 if b is None else b[ti[t, j]])
      want[t * k + j] = ref.activation(hid[t * k + j], activation, limit=limit,
                                       **kw) * tw[t, j]
  assert ref.rel_l2(out, want) <= 4e-3  # one bf16 rounding of the result
  if limit is not None:  # the clamp is active on a share of the gates and ups
    assert np.mean(hid[:, :i] > limit) > 0.02 and np.mean(np.abs(hid[:, i:]) > limit) > 0.02


def test_fused_activation_errors(rng):
  w = random_experts(rng, 2, 32, 64)
  x = jnp.zeros((4, 64), jnp.bfloat16)
  al = nf.align_tokens(jnp.zeros((4, 1), jnp.int32), 2, 8)
  ok = dict(gather_div=1, num_rows_out=4)
  with pytest.raises(ValueError, match="gate_up_pairs=True"):
    nf.nvfp4_moe_gemm(x, nf.prepare(w), al, activation="swiglu", **ok)
  paired = nf.prepare(w, gate_up_pairs=True)
  with pytest.raises(ValueError, match="only a fused gated activation"):
    nf.nvfp4_moe_gemm(x, paired, al, **ok)
  with pytest.raises(ValueError, match="needs limit"):
    nf.nvfp4_moe_gemm(x, paired, al, activation="gptoss", **ok)
  assert jax.eval_shape(lambda: nf.nvfp4_moe_gemm(x, paired, al, activation="swiglu",
                                                  **ok)).shape == (4, 16)
  bind = moe_ops.nvfp4_moe_gemm_p.bind
  args = [x, paired.qweight, paired.qscales, paired.global_scale, al.sorted_ids,
          al.block_expert, al.num_padded, jnp.zeros((0,), jnp.float32),
          jnp.zeros((0,), jnp.float32)]
  params = dict(n=32, k=64, gather_div=1, num_rows_out=4, block_m=8, mul_topk_weight=False,
                has_bias=False, zero_unwritten=True, backend="auto", activation="swiglu",
                limit=float("inf"), alpha=1.702)
  for bad, match in [({"activation": "gelu"}, "activation must be one of"),
                     ({"activation": "relu2", "limit": 5.0}, "clamps nothing"),
                     ({"limit": -1.0}, "limit must be > 0"),
                     ({"activation": "gptoss"}, "finite for gptoss")]:
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda: bind(*args, **{**params, **bad}))
  w24 = random_experts(rng, 2, 24, 64)  # n = 24: gate/up pairs do not fill 16-row tiles
  p24 = nf.prepare(w24)
  args24 = [x, p24.qweight, p24.qscales, *args[3:]]
  with pytest.raises(ValueError, match="multiple of 16"):
    jax.eval_shape(lambda: bind(*args24, **{**params, "n": 24}))
  w13, w2 = random_experts(rng, 2, 32, 64), random_experts(rng, 2, 64, 32)
  with pytest.raises(ValueError, match="only a gated"):
    nf.fused_moe(x, nf.prepare(w13, gate_up_pairs=True), nf.prepare(w2),
                 topk_weights=np.ones((4, 1), np.float32), topk_ids=np.zeros((4, 1), np.int32),
                 activation="relu2")


def test_a_gpu_without_room_for_large_tiles_takes_block_m_8(monkeypatch):
  """Where a block gets 99 KB of shared memory (A10, L4) the grouped GEMM's blocks of 16-64
  rows (100-104 KB) cannot launch: fused_moe aligns to 8-row blocks whatever the batch, and
  refuses an explicit block_m above 8 before anything runs (cross-lowered for cuda with such
  a GPU's occupancy patched in)."""
  from jax_nvfp4.ops import dense
  from tests.test_moe_pair import _abstract_prepared
  monkeypatch.setattr(nf._ffi, "REGISTERED", nf._ffi.REGISTERED | {moe_ops.CUDA_TARGET})
  monkeypatch.setattr(dense._ffi, "sm_count", lambda: 58)
  monkeypatch.setattr(dense._ffi, "cluster_limit", lambda *a, **kw: 0)
  e, h, i, m, k = 8, 256, 320, 512, 2
  assert nf.choose_block_m(m, k, e) == 64
  args = (jax.ShapeDtypeStruct((m, h), jnp.bfloat16), _abstract_prepared(e, 2 * i, h),
          _abstract_prepared(e, h, i), jax.ShapeDtypeStruct((m, k), jnp.float32),
          jax.ShapeDtypeStruct((m, k), jnp.int32))
  lower = lambda **kw: jax.jit(lambda *a: nf.fused_moe(
      a[0], a[1], a[2], topk_weights=a[3], topk_ids=a[4], **kw)).trace(*args).lower(
          lowering_platforms=("cuda",)).as_text()
  monkeypatch.setattr(dense._ffi, "moe_blocks_per_sm", lambda *a, **kw: 2)  # room for all
  assert set(re.findall(r"block_m = (\d+)", lower())) == {"64"}
  monkeypatch.setattr(dense._ffi, "moe_blocks_per_sm",
                      lambda mt, bf16=True, k_slices=1, rows=0: 2 if mt == 1 else 0)
  text = lower()
  assert text.count(moe_ops.CUDA_TARGET) == 2
  assert set(re.findall(r"block_m = (\d+)", text)) == {"8"}
  with pytest.raises(ValueError, match=r"block_m = 16 needs more shared memory .* block_m <= 8"):
    lower(block_m=16)
  with pytest.raises(ValueError, match=r"nvfp4_moe_gemm: block_m = 32 needs more shared memory"):
    moe_ops.check_block_m_fits("nvfp4_moe_gemm", 32)


@pytest.mark.parametrize("t, k, e, block_m", [(1, 1, 1, 8), (100, 8, 128, 8), (5000, 2, 8, 64),
                                               (70000, 8, 256, 8), (10**6, 8, 128, 64)])
def test_tokens_per_launch_is_the_most_that_fit(t, k, e, block_m):
  """The chunk is the largest token count whose aligned rows stay within one launch's token
  tiles (a brute-force scan near the answer)."""
  tiles = lambda n: capacity(n * k, e, block_m) // block_m
  got = moe_ops.tokens_per_launch(t, k, e, block_m)
  assert 1 <= got <= t and tiles(got) <= moe_ops.MAX_TOKEN_TILES
  assert got == t or tiles(got + 1) > moe_ops.MAX_TOKEN_TILES


@pytest.mark.parametrize("use_logits", [True, False])
def test_a_batch_beyond_one_launch_runs_in_token_chunks(monkeypatch, rng, use_logits):
  """A batch whose aligned rows need more token tiles than one launch takes runs as token
  chunks (here with the limit patched down to 8 tiles: 29 tokens at top-2 over 5 global
  experts, block_m 8: t tokens align to ceil((2t + 5 * 7) / 8) tiles, so chunks of 14, 14 and
  1), each routed alone: the layer against the float64 reference and the one-launch reference
  path, with an expert map and biases."""
  e, h, i, m, k = 4, 64, 48, 29, 2
  x, w13, w2 = _layer(rng, m, h, i, e)
  b13 = jnp.asarray(rng.standard_normal((e, 2 * i)), jnp.float32)
  b2 = jnp.asarray(rng.standard_normal((e, h)), jnp.float32)
  expert_map = jnp.asarray([0, -1, 1, 2, 3], jnp.int32)  # 5 global experts, one elsewhere
  logits = jnp.asarray(rng.standard_normal((m, 5)), jnp.float32)
  tw, ti = nf.route(logits, nf.RoutingConfig(top_k=k))
  route = (dict(router_logits=logits, top_k=k) if use_logits
           else dict(topk_weights=tw, topk_ids=ti))
  layer = lambda backend: nf.fused_moe(x, w13, w2, **route, w13_bias=b13, w2_bias=b2,
                                       expert_map=expert_map, block_m=8, backend=backend)
  whole = np.asarray(layer("reference"), np.float64)
  monkeypatch.setattr(moe_ops, "MAX_TOKEN_TILES", 8)
  assert moe_ops.tokens_per_launch(m, k, 5, 8) == 14
  calls = []
  real = moe_ops.fused_moe
  monkeypatch.setattr(moe_ops, "fused_moe",
                      lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
  chunked = np.asarray(layer(None), np.float64)
  assert calls == [(14, h), (14, h), (1, h)]
  want = _ref(x, w13, w2, np.asarray(tw), np.asarray(ti), b13=np.asarray(b13, np.float64),
              b2=np.asarray(b2, np.float64), expert_map=np.asarray(expert_map),
              round_dtype=ml_dtypes.bfloat16)
  assert ref.rel_l2(chunked, want) <= 5e-3
  np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6 * np.abs(whole).max())
  with pytest.raises(ValueError, match="token tiles, more than one launch takes"):
    moe_ops.check_token_tiles("nvfp4_moe_gemm", 72, 8)

"""MoE routing (softmax top-k, DeepSeek sigmoid + bias + group-limited top-k) against an
independent float64 NumPy routing and hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4 as nf
from tests import numpy_moe_reference as ref


def _assert_routes_match(logits, config, **ref_kw):
  w, ids = jax.jit(nf.route)(jnp.asarray(logits), config)
  assert w.dtype == jnp.float32 and ids.dtype == jnp.int32
  assert w.shape == ids.shape == (*logits.shape[:-1], config.top_k)
  rw, rids = ref.route(np.asarray(logits).reshape(-1, logits.shape[-1]), config.top_k, **ref_kw)
  np.testing.assert_array_equal(np.asarray(ids).reshape(rids.shape), rids)
  np.testing.assert_allclose(np.asarray(w).reshape(rw.shape), rw, rtol=2e-6, atol=1e-7)
  return np.asarray(w), np.asarray(ids)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("m, e, k", [(1, 8, 2), (37, 16, 4), (64, 128, 8)])
def test_softmax_topk_matches_numpy(rng, m, e, k, renormalize):
  logits = rng.standard_normal((m, e)).astype(np.float32) * 2
  cfg = nf.RoutingConfig.softmax_topk(k, renormalize=renormalize)
  w, _ = _assert_routes_match(logits, cfg, renormalize=renormalize)
  if renormalize:
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  else:
    assert (w.sum(-1) < 1.0).all()


def test_renormalized_softmax_equals_softmax_of_topk_logits(rng):
  # Mixtral's formulation: softmax over the k selected logits.
  logits = rng.standard_normal((20, 8)).astype(np.float32)
  w, ids = nf.route(logits, nf.RoutingConfig(top_k=2))
  sel = np.take_along_axis(logits.astype(np.float64), np.asarray(ids), -1)
  want = np.exp(sel) / np.exp(sel).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(w), want, rtol=1e-6)
  assert (sel[:, 0] >= sel[:, 1]).all()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m, e, n_group, topk_group, k", [(9, 64, 8, 3, 6), (33, 256, 8, 4, 8),
                                                            (5, 16, 1, 1, 4)])
def test_deepseek_v3_matches_numpy(rng, m, e, n_group, topk_group, k, with_bias):
  logits = rng.standard_normal((m, e)).astype(np.float32)
  bias = rng.uniform(-0.3, 0.3, e).astype(np.float32) if with_bias else None
  cfg = nf.RoutingConfig.deepseek_v3(k, n_group=n_group, topk_group=topk_group,
                                     routed_scaling_factor=2.5, correction_bias=bias)
  w, ids = _assert_routes_match(logits, cfg, scoring="sigmoid", n_group=n_group,
                                topk_group=topk_group, routed_scaling_factor=2.5,
                                correction_bias=bias)
  # Weights come from the pre-bias sigmoid scores, normalised, times the scaling factor.
  s = 1 / (1 + np.exp(-np.take_along_axis(logits.astype(np.float64), ids, -1)))
  np.testing.assert_allclose(w, 2.5 * s / s.sum(-1, keepdims=True), rtol=2e-6)
  if n_group > 1:
    groups = ids // (e // n_group)
    assert max(len(np.unique(g)) for g in groups) <= topk_group


def test_correction_bias_affects_selection_only():
  logits = np.array([[3.0, 2.0, 1.0, 0.0]], np.float32)
  bias = np.array([-10.0, 0.0, 0.0, 5.0], np.float32)
  cfg = nf.RoutingConfig(top_k=2, scoring="sigmoid", renormalize=False, correction_bias=bias)
  w, ids = nf.route(logits, cfg)
  # selection scores: sig+bias = [-9.05, .88, .73, 5.5] -> experts 3 then 1
  np.testing.assert_array_equal(np.asarray(ids), [[3, 1]])
  sig = lambda v: 1 / (1 + np.exp(-v))
  np.testing.assert_allclose(np.asarray(w), [[sig(0.0), sig(2.0)]], rtol=1e-6)
  w0, ids0 = nf.route(logits, nf.RoutingConfig(top_k=2, scoring="sigmoid", renormalize=False))
  np.testing.assert_array_equal(np.asarray(ids0), [[0, 1]])


def test_group_score_top2_sum_vs_max():
  # Group 0 = experts 0..3 has the single best expert; group 1 = 4..7 has the best pair.
  logits = np.array([[4.0, -4, -4, -4, 2.0, 2.0, -4, -4]], np.float32)
  base = dict(top_k=2, scoring="sigmoid", n_group=2, topk_group=1, renormalize=False)
  _, ids = nf.route(logits, nf.RoutingConfig(**base, group_score="top2_sum"))
  np.testing.assert_array_equal(np.asarray(ids), [[4, 5]])
  _, ids = nf.route(logits, nf.RoutingConfig(**base, group_score="max"))
  np.testing.assert_array_equal(np.asarray(ids), [[0, 1]])
  for gs in ("top2_sum", "max"):
    _assert_routes_match(logits, nf.RoutingConfig(**base, group_score=gs), scoring="sigmoid",
                         renormalize=False, n_group=2, topk_group=1, group_score=gs)


def test_ties_lower_index_first():
  logits = np.zeros((3, 8), np.float32)
  logits[1, [2, 5, 6]] = 1.0                      # three-way tie for the top
  logits[2] = [1, 1, 1, 1, 0, 0, 0, 0]
  w, ids = nf.route(logits, nf.RoutingConfig(top_k=3))
  np.testing.assert_array_equal(np.asarray(ids), [[0, 1, 2], [2, 5, 6], [0, 1, 2]])
  np.testing.assert_allclose(np.asarray(w), 1 / 3, rtol=1e-6)
  # Tied groups: the lower group wins, and inside it the lower experts.
  cfg = nf.RoutingConfig(top_k=2, scoring="sigmoid", n_group=4, topk_group=1)
  _, ids = nf.route(np.zeros((1, 16), np.float32), cfg)
  np.testing.assert_array_equal(np.asarray(ids), [[0, 1]])
  _assert_routes_match(logits, nf.RoutingConfig(top_k=3))


def test_leading_dims_and_config_through_jit(rng):
  logits = rng.standard_normal((2, 3, 16)).astype(np.float32)
  bias = jnp.asarray(rng.uniform(-1, 1, 16), jnp.float32)
  cfg = nf.RoutingConfig.deepseek_v3(4, n_group=4, topk_group=2, routed_scaling_factor=1.5,
                                     correction_bias=bias)
  w, ids = jax.jit(nf.route)(logits, cfg)  # the bias is a traced leaf of the config
  assert w.shape == ids.shape == (2, 3, 4)
  rw, rids = ref.route(logits.reshape(6, 16), 4, scoring="sigmoid", n_group=4, topk_group=2,
                       routed_scaling_factor=1.5, correction_bias=np.asarray(bias))
  np.testing.assert_array_equal(np.asarray(ids).reshape(6, 4), rids)
  np.testing.assert_allclose(np.asarray(w).reshape(6, 4), rw, rtol=2e-6)
  # bf16 logits route in float32
  w16, _ = nf.route(jnp.asarray(logits, jnp.bfloat16), nf.RoutingConfig(top_k=2))
  assert w16.dtype == jnp.float32


@pytest.mark.parametrize("cfg, match", [
    (dict(top_k=9), "exceeds the number of experts"),
    (dict(top_k=0), "positive"),
    (dict(top_k=2, scoring="tanh"), "scoring"),
    (dict(top_k=2, n_group=3), "divide"),
    (dict(top_k=2, n_group=4, topk_group=5), "topk_group"),
    (dict(top_k=5, n_group=4, topk_group=2), "selected groups"),
    (dict(top_k=2, group_score="mean"), "group_score"),
    (dict(top_k=2, correction_bias=np.zeros(7, np.float32)), r"shape \(8,\)"),
])
def test_bad_config_raises(cfg, match):
  with pytest.raises(ValueError, match=match):
    nf.route(np.zeros((2, 8), np.float32), nf.RoutingConfig(**cfg))


def test_bad_logits_raise():
  with pytest.raises(TypeError, match="floating"):
    nf.route(np.zeros((2, 8), np.int32), nf.RoutingConfig(top_k=2))
  with pytest.raises(TypeError, match="RoutingConfig"):
    nf.route(np.zeros((2, 8), np.float32), 2)

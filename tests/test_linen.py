"""Flax Linen layers: NVFP4Dense and NVFP4MoE (init/apply, collections, numerics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jax_nvfp4 as nf
from jax_nvfp4.nn import linen as L
from jax_nvfp4.nn.nnx import NVFP4MoE as NNXMoE
from tests.test_nnx import checkpoint_layout_by_default  # noqa: F401 (autouse fixture)
from tests.test_nnx import (NVFP4_REL_MAX, NVFP4_REL_MIN, REF_REL, bf16, dequant64, np_moe,
                            randn, rel_l2)


def test_dense_init_collections_and_nn_dense_kernel(rng):
  x = jnp.asarray(randn(rng, 2, 5, 64), jnp.bfloat16)
  layer = L.NVFP4Dense(32)
  variables = layer.init(jax.random.key(0), x)
  assert set(variables) == {"params", "nvfp4"}
  assert set(variables["params"]) == {"bias"}  # the optimizer's collection: bias only
  assert set(variables["nvfp4"]) == {"packed", "scales", "global_scale"}
  # The same draw as nn.Dense (kernel then bias from the "params" rng), transposed, quantized.
  dense_params = nn.Dense(32).init(jax.random.key(0), x)["params"]
  q = nf.quantize(dense_params["kernel"].T)
  np.testing.assert_array_equal(np.asarray(variables["nvfp4"]["packed"]), np.asarray(q.packed))
  np.testing.assert_array_equal(np.asarray(variables["nvfp4"]["scales"]).view(np.uint8),
                                np.asarray(q.scales).view(np.uint8))
  y = layer.apply(variables, x)
  assert y.shape == (2, 5, 32) and y.dtype == jnp.bfloat16
  w = nf.NVFP4Weight(*(variables["nvfp4"][k] for k in ("packed", "scales", "global_scale")))
  want = bf16(x) @ dequant64(w).T
  assert rel_l2(y, want) < REF_REL
  # Against the float nn.Dense within the NVFP4 error (see tests/test_nnx.py for the bound).
  x32 = jnp.asarray(randn(rng, 32, 64))
  err = rel_l2(layer.apply(variables, x32),
               np.asarray(x32, np.float64) @ np.asarray(dense_params["kernel"], np.float64))
  assert NVFP4_REL_MIN < err < NVFP4_REL_MAX, err


def test_dense_optax_on_params_leaves_nvfp4_alone(rng):
  x = jnp.asarray(randn(rng, 8, 64))
  layer = L.NVFP4Dense(16)
  variables = layer.init(jax.random.key(1), x)
  frozen = variables["nvfp4"]
  tx = optax.sgd(0.25)
  params = variables["params"]
  opt_state = tx.init(params)

  def loss(p):
    return jnp.sum(layer.apply({"params": p, "nvfp4": frozen}, x))

  grads = jax.grad(loss)(params)
  np.testing.assert_array_equal(np.asarray(grads["bias"]), np.full(16, 8.0))  # rows, exactly
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(params["bias"]), np.full(16, -2.0))
  y_new = layer.apply({"params": params, "nvfp4": frozen}, x)
  y_old = layer.apply(variables, x)
  # The output is a bf16 product cast to float32: equal up to one bf16 rounding.
  np.testing.assert_allclose(np.asarray(y_new), np.asarray(y_old) - 2.0, rtol=2**-7, atol=2**-7)


def test_dense_quantize_dense_variables_and_prepare(rng):
  x = jnp.asarray(randn(rng, 3, 64), jnp.bfloat16)
  dense = nn.Dense(48)
  params = dense.init(jax.random.key(2), x)["params"]
  params = {**params, "bias": jnp.asarray(randn(rng, 48))}
  layer = L.NVFP4Dense(48)
  v = L.quantize_dense_variables(params)
  vp = L.quantize_dense_variables(params, prepare=True)
  assert set(vp["nvfp4"]) == {"qweight", "qscales", "global_scale", "shape"}
  # The record's shape: the last 16-row tile holds 16 rows, the last 64-column chunk 4 blocks.
  assert vp["nvfp4"]["shape"].shape == (16, 4) and vp["nvfp4"]["shape"].dtype == jnp.uint8
  y = layer.apply(v, x)
  # The stored layout is used as it is at apply time.
  np.testing.assert_allclose(np.asarray(layer.apply(vp, x), np.float32),
                             np.asarray(y, np.float32), rtol=2**-7, atol=1e-2)
  w = nf.NVFP4Weight(*(v["nvfp4"][k] for k in ("packed", "scales", "global_scale")))
  want = bf16(x) @ dequant64(w).T + np.asarray(params["bias"], np.float64)
  assert rel_l2(y, want) < REF_REL
  init_prepared = L.NVFP4Dense(48, prepare=True).init(jax.random.key(2), x)
  assert init_prepared["nvfp4"]["qweight"].shape == (3, 1, 32, 4)
  np.testing.assert_array_equal(np.asarray(init_prepared["nvfp4"]["qweight"]),
                                np.asarray(nf.prepare(nf.quantize(
                                    dense.init(jax.random.key(2), x)["params"]["kernel"].T))
                                    .qweight))


@pytest.mark.parametrize("prepare", [False, True])
def test_quantize_dense_variables_takes_partitioned_params(rng, prepare):
  """Params of an nn.Dense built with nn.with_partitioning are nn.Partitioned boxes: unboxed,
  quantized as the bare kernel is, and the output holds plain arrays."""
  x = jnp.asarray(randn(rng, 2, 64), jnp.bfloat16)
  dense = nn.Dense(32, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(),
                                                        (None, "model")),
                   bias_init=nn.with_partitioning(nn.initializers.normal(), ("model",)))
  boxed = dense.init(jax.random.key(0), x)["params"]
  assert isinstance(boxed["kernel"], nn.Partitioned)
  kernel, bias = boxed["kernel"].value, boxed["bias"].value
  v = L.quantize_dense_variables(boxed, prepare=prepare)
  assert not any(isinstance(a, nn.Partitioned) for a in jax.tree.leaves(
      v, is_leaf=lambda a: isinstance(a, nn.Partitioned)))
  want = L.weight_variables(nf.quantize(kernel.T), prepare=prepare)
  assert set(v["nvfp4"]) == set(want)
  for name, a in want.items():
    got = np.asarray(v["nvfp4"][name])
    assert got.shape == a.shape and got.tobytes() == np.asarray(a).tobytes(), name
  np.testing.assert_array_equal(np.asarray(v["params"]["bias"]), np.asarray(bias))
  w = nf.quantize(kernel.T)
  want_y = bf16(x) @ dequant64(w).T + np.asarray(bias, np.float64)
  assert rel_l2(L.NVFP4Dense(32).apply(v, x), want_y) < REF_REL


def test_dense_kernel_layout_records_its_logical_shape(rng):
  """The kernel layout pads N to 16 and K to 64: a stored [36, 48] weight has the arrays of a
  [40, 64] one. The shape record makes the mismatch an error (eager and under jit), where the
  layer used to run the padding rows/columns as zeros."""
  x = jnp.asarray(randn(rng, 3, 64), jnp.bfloat16)
  vp = L.quantize_dense_variables({"kernel": jnp.asarray(randn(rng, 64, 36))}, prepare=True)
  vp48 = L.quantize_dense_variables({"kernel": jnp.asarray(randn(rng, 48, 36))}, prepare=True)
  assert vp48["nvfp4"]["qweight"].shape == vp["nvfp4"]["qweight"].shape  # same arrays' shapes
  for layer, variables, msg in (
      (L.NVFP4Dense(40, use_bias=False), vp, r"\(36, 64\), expected \(40, 64\)"),
      (L.NVFP4Dense(36, use_bias=False), vp48, r"\(36, 48\), expected \(36, 64\)")):
    with pytest.raises(ValueError, match="stored weight has logical shape " + msg):
      layer.apply(variables, x)
    with pytest.raises(ValueError, match="stored weight has logical shape " + msg):
      jax.jit(layer.apply)(variables, x)
  assert L.NVFP4Dense(36, use_bias=False).apply(vp, x).shape == (3, 36)
  no_record = {"nvfp4": {k: v for k, v in vp["nvfp4"].items() if k != "shape"}}
  with pytest.raises(ValueError, match="without its logical-shape record 'shape'"):
    L.NVFP4Dense(36, use_bias=False).apply(no_record, x)
  # init writes the record too, and weight_variables builds it from a weight.
  init = L.NVFP4Dense(36, prepare=True).init(jax.random.key(0), x)
  assert init["nvfp4"]["shape"].shape == (4, 4)  # 36 = 2 * 16 + 4 rows, 64 = 4 blocks of 16
  w = nf.quantize(jnp.asarray(randn(rng, 36, 64)))
  wv = L.weight_variables(w, prepare=True, prefix="p_")
  assert set(wv) == {"p_qweight", "p_qscales", "p_global_scale", "p_shape"}
  assert set(L.weight_variables(w)) == {"packed", "scales", "global_scale"}
  np.testing.assert_array_equal(np.asarray(wv["p_qweight"]), np.asarray(nf.prepare(w).qweight))


def test_moe_kernel_layout_shape_mismatch_is_named(rng):
  e, h, i = 4, 64, 32
  x = jnp.asarray(randn(rng, 5, h), jnp.bfloat16)
  v = L.moe_variables(randn(rng, e, h), randn(rng, e, 2 * i, h), randn(rng, e, h, i),
                      prepare=True)
  assert v["nvfp4"]["w13_shape"].shape == (16, 4)  # [64, 64]: a whole tile and chunk
  assert v["nvfp4"]["w2_shape"].shape == (16, 2)   # [64, 32]: 2 of the chunk's 4 blocks
  assert L.NVFP4MoE(i, e, top_k=2).apply(v, x).shape == (5, h)
  with pytest.raises(ValueError, match=r"stored w13_weight has logical shape \(4, 64, 64\), "
                                       r"expected \(4, 96, 64\)"):
    L.NVFP4MoE(48, e, top_k=2).apply(v, x)


def test_dense_documents_how_it_differs_from_nn_dense(rng):
  import inspect
  fields = lambda cls: set(cls.__dataclass_fields__)
  missing = fields(nn.Dense) - fields(L.NVFP4Dense)
  assert missing == {"precision", "dot_general", "dot_general_cls", "promote_dtype"}, missing
  doc = inspect.getdoc(L.NVFP4Dense)
  for name in sorted(missing):
    assert f"``{name}``" in doc, name
    with pytest.raises(TypeError, match=name):
      L.NVFP4Dense(16, **{name: None})
  module_doc = inspect.getdoc(L)
  assert "reverse mode" in module_doc and "second derivatives" in module_doc
  x = jnp.asarray(randn(rng, 2, 32), jnp.bfloat16)
  layer = L.NVFP4Dense(16)
  v = layer.init(jax.random.key(0), x)
  assert layer.apply(v, x).dtype == jnp.bfloat16  # nn.Dense: float32 (its bias's dtype)
  assert nn.Dense(16).apply(nn.Dense(16).init(jax.random.key(0), x), x).dtype == jnp.float32
  f = lambda a: jnp.sum(layer.apply(v, a).astype(jnp.float32))
  assert jax.grad(f)(x).shape == x.shape
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(f, (x,), (x,))


def test_dense_dtypes_and_errors(rng):
  x32 = jnp.asarray(randn(rng, 4, 32))
  layer = L.NVFP4Dense(16, use_bias=False)
  v = layer.init(jax.random.key(0), x32)
  assert "params" not in v or not v["params"]
  y = layer.apply(v, x32)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y),
                                np.asarray(layer.apply(v, x32.astype(jnp.bfloat16)), np.float32))
  assert L.NVFP4Dense(16, use_bias=False, dtype=jnp.float16).apply(v, x32).dtype == jnp.float16
  with pytest.raises(ValueError, match="pass all the variables"):
    L.NVFP4Dense(16).apply({"params": {"bias": jnp.zeros(16)}}, x32)
  with pytest.raises(ValueError, match="multiple of 16"):
    L.NVFP4Dense(16).init(jax.random.key(0), jnp.ones((2, 40)))
  with pytest.raises(ValueError, match="dtype must be"):
    L.NVFP4Dense(16, dtype=jnp.float32).init(jax.random.key(0), x32)
  with pytest.raises(ValueError, match="stored weight has logical shape"):
    L.NVFP4Dense(8, use_bias=False).apply(v, x32)
  with pytest.raises(TypeError, match="kernel"):
    L.quantize_dense_variables({"w": jnp.ones((32, 8))})


def _moe_case(rng):
  """(E, H, I, top_k), router, w13, w2, their biases and 12 tokens of a small MoE layer."""
  e, h, i, k = 4, 64, 32, 2
  router = randn(rng, e, h, scale=0.3)
  w13, w2 = randn(rng, e, 2 * i, h, scale=0.15), randn(rng, e, h, i, scale=0.2)
  b13, b2 = randn(rng, e, 2 * i, scale=0.1), randn(rng, e, h, scale=0.1)
  x = jnp.asarray(randn(rng, 12, h), jnp.bfloat16)
  return e, h, i, k, router, w13, w2, b13, b2, x


def test_moe_matches_nnx_and_reference(rng):
  e, h, i, k, router, w13, w2, b13, b2, x = _moe_case(rng)
  layer = L.NVFP4MoE(i, e, top_k=k, use_expert_bias=True)
  v = L.moe_variables(router, w13, w2, w13_bias=b13, w2_bias=b2)
  assert set(v["params"]) == {"router", "w13_bias", "w2_bias"}
  assert v["params"]["router"].dtype == jnp.bfloat16
  y = jax.jit(layer.apply)(v, x)
  nnx_layer = NNXMoE.from_dense(router, w13, w2, w13_bias=b13, w2_bias=b2, top_k=k)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(nnx.jit(lambda m, a: m(a))(nnx_layer,
                                                                                      x)))
  w13q = nf.NVFP4Weight(*(v["nvfp4"][f"w13_{f}"] for f in ("packed", "scales", "global_scale")))
  w2q = nf.NVFP4Weight(*(v["nvfp4"][f"w2_{f}"] for f in ("packed", "scales", "global_scale")))
  want = np_moe(bf16(x), bf16(router), dequant64(w13q), dequant64(w2q), k, "swiglu", b13=b13,
                b2=b2)
  assert rel_l2(y, want) < 1e-2


def test_moe_init_and_correction_bias(rng):
  e, h, i, k = 4, 64, 32, 2
  x = jnp.asarray(randn(rng, 12, h), jnp.bfloat16)
  routing = nf.RoutingConfig.deepseek_v3(k, n_group=2, topk_group=1, routed_scaling_factor=1.5)
  layer = L.NVFP4MoE(i, e, routing=routing, use_correction_bias=True, activation="relu2")
  v = layer.init(jax.random.key(0), x)
  assert set(v["params"]) == {"router"}
  assert set(v["nvfp4"]) == {"w13_packed", "w13_scales", "w13_global_scale", "w2_packed",
                             "w2_scales", "w2_global_scale", "correction_bias"}
  assert v["nvfp4"]["w13_packed"].shape == (e, i, h // 2)  # relu2: w13 has I rows
  correction = randn(rng, e, scale=0.5)
  v = {"params": v["params"], "nvfp4": {**v["nvfp4"], "correction_bias": jnp.asarray(correction)}}
  y = jax.jit(layer.apply)(v, x)
  w13q = nf.NVFP4Weight(*(v["nvfp4"][f"w13_{f}"] for f in ("packed", "scales", "global_scale")))
  w2q = nf.NVFP4Weight(*(v["nvfp4"][f"w2_{f}"] for f in ("packed", "scales", "global_scale")))
  router = np.asarray(v["params"]["router"], np.float64)
  # Group-limited (2 groups of 2, best 1 group by top-2 sum): with top_k = 2 that is exactly
  # the best group's two experts; the NumPy oracle below selects the groups itself.
  choice = 1.0 / (1.0 + np.exp(-(bf16(x) @ router.T))) + correction
  best_group = np.argmax(choice.reshape(12, 2, 2).sum(-1), axis=-1)
  mask = np.repeat(np.eye(2)[best_group], 2, axis=-1)
  want = np_moe(bf16(x), router, dequant64(w13q), dequant64(w2q), k, "relu2",
                scoring="sigmoid", correction=np.where(mask > 0, correction, -1e9), scale=1.5)
  assert rel_l2(y, want) < 1e-2
  with pytest.raises(TypeError, match="without correction_bias"):
    L.NVFP4MoE(i, e, routing=nf.RoutingConfig.deepseek_v3(
        k, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        correction_bias=jnp.zeros(e))).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="top_k or routing"):
    L.NVFP4MoE(i, e).init(jax.random.key(0), x)
  # A correction bias that is not [E_global]: refused by moe_variables and at apply.
  with pytest.raises(ValueError, match=r"moe_variables: the correction bias must have shape "
                                       r"\(E_global,\) = \(4,\) .*got shape \(7,\)"):
    L.moe_variables(randn(rng, e, h), randn(rng, e, i, h), randn(rng, e, h, i),
                    correction_bias=np.zeros(e + 3))
  bad = {"params": v["params"], "nvfp4": {**v["nvfp4"], "correction_bias": jnp.zeros(e + 3)}}
  for apply in (layer.apply, jax.jit(layer.apply)):
    with pytest.raises(ValueError, match=r"NVFP4MoE: the correction bias must have shape "
                                         r"\(E_global,\) = \(4,\) .*got shape \(7,\)"):
      apply(bad, x)


def test_moe_reference_backend_never_reaches_the_kernel(rng, monkeypatch):
  """As the NNX test: backend="reference" lowers without the kernel for a CUDA GPU that has it."""
  from jax_nvfp4.ops import moe as moe_ops
  monkeypatch.setattr(nf._ffi, "REGISTERED", nf._ffi.REGISTERED | {moe_ops.CUDA_TARGET})
  monkeypatch.setattr(moe_ops, "_kernel_wanted", lambda: True)  # "on this GPU"
  e, h, i = 4, 64, 32
  x = jnp.asarray(randn(rng, 5, h), jnp.bfloat16)
  layer = L.NVFP4MoE(i, e, top_k=2, prepare=True, backend="reference")
  v = layer.init(jax.random.key(0), x)
  assert "w13_qweight" in v["nvfp4"]
  lower = lambda f: jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert moe_ops.CUDA_TARGET not in lower(lambda a: layer.apply(v, a))
  y = jax.jit(layer.apply)(v, x)
  # A gated kernel-layout init stores w13 in gate_up_pairs order, with its record.
  assert v["nvfp4"]["w13_gate_up_pairs"].shape == (8,)
  w13, w2 = (nf.PreparedNVFP4Weight(v["nvfp4"][f"{p}_qweight"], v["nvfp4"][f"{p}_qscales"],
                                    v["nvfp4"][f"{p}_global_scale"], n=n, k=k,
                                    gate_up_pairs=f"{p}_gate_up_pairs" in v["nvfp4"])
             for p, n, k in (("w13", 2 * i, h), ("w2", h, i)))
  want = np_moe(bf16(x), bf16(v["params"]["router"]), dequant64(w13), dequant64(w2), 2,
                "swiglu")
  assert rel_l2(y, want) < 1e-2
  if jax.default_backend() != "gpu":
    control = lambda a: moe_ops.fused_moe(
        a, w13, w2, router_logits=jnp.einsum("mh,eh->me", a, v["params"]["router"],
                                             preferred_element_type=jnp.float32), top_k=2)
    assert lower(control).count(moe_ops.CUDA_TARGET) == 2


# ----------------------------------------------------------------------------- gate_up_pairs
#
# Tolerances as tests/test_nnx.py's gate_up_pairs tests: the pairs order skips the bf16
# rounding of GEMM 1's output, so it differs from [gate; up] by one-ulp flips of some outputs
# (measured 2.6e-3 to 4.8e-3 rel-L2, bound 2^-7); both stay within the layers' 1e-2 of float64.


def _records(variables) -> dict:
  """The w13 row-order records of a variables dict, name -> shape."""
  unbox = lambda a: a.unbox(apply_constraint=False) if isinstance(a, nn.Partitioned) else a
  return {k: tuple(unbox(a).shape) for k, a in variables["nvfp4"].items()
          if k.startswith("w13_gate_up")}


def _stored_w13(variables, n, k):
  """The stored w13, its row order read from the record as the layer reads it."""
  s = variables["nvfp4"]
  return nf.PreparedNVFP4Weight(s["w13_qweight"], s["w13_qscales"], s["w13_global_scale"], n=n,
                                k=k, gate_up_pairs="w13_gate_up_pairs" in s)


def test_moe_init_stores_gate_up_pairs_where_safe(rng):
  from jax.sharding import AbstractMesh, AxisType
  e, h, i, k = 4, 64, 32, 2
  x = jnp.asarray(randn(rng, 12, h), jnp.bfloat16)
  key = jax.random.key(3)
  pairs_layer = L.NVFP4MoE(i, e, top_k=k, prepare=True)
  plain_layer = L.NVFP4MoE(i, e, top_k=k, prepare=True, fuse_activation=False)
  vp, vq = pairs_layer.init(key, x), plain_layer.init(key, x)
  assert _records(vp) == {"w13_gate_up_pairs": (8,)} and _records(vq) == {}
  # The same draw, stored in pairs order: the canonical weight bitwise once unprepared.
  wp, wq = _stored_w13(vp, 2 * i, h), _stored_w13(vq, 2 * i, h)
  assert wp.gate_up_pairs and not wq.gate_up_pairs
  for a, b in zip(jax.tree.leaves(nf.unprepare(wp)), jax.tree.leaves(nf.unprepare(wq))):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  np.testing.assert_array_equal(np.asarray(wp.qweight), np.asarray(
      nf.prepare(nf.unprepare(wq), gate_up_pairs=True).qweight))
  yp, yq = jax.jit(pairs_layer.apply)(vp, x), jax.jit(plain_layer.apply)(vq, x)
  assert rel_l2(yp, yq) < 2**-7
  w2 = nf.PreparedNVFP4Weight(vp["nvfp4"]["w2_qweight"], vp["nvfp4"]["w2_qscales"],
                              vp["nvfp4"]["w2_global_scale"], n=h, k=i)
  want = np_moe(bf16(x), bf16(vp["params"]["router"]), dequant64(wp), dequant64(w2), k,
                "swiglu")
  assert rel_l2(yp, want) < 1e-2 and rel_l2(yq, want) < 1e-2
  # [gate; up] (no record) where the order is not correct: the checkpoint layout, relu2.
  assert _records(L.NVFP4MoE(i, e, top_k=k).init(key, x)) == {}
  assert _records(L.NVFP4MoE(i, e, top_k=k, prepare=True, activation="relu2").init(key, x)) == {}
  # With mesh axes: pairs (an expert axis; a tensor split into whole pair tiles, which keeps
  # its per-shard record for the bias), or per-shard [gate_t; up_t] with fuse_activation=False.
  # Numbers on 8 devices: tests/test_sharding_layers.py.
  mesh = AbstractMesh((2, 4), ("expert", "model"), axis_types=(AxisType.Auto,) * 2)
  with jax.sharding.use_abstract_mesh(mesh):
    init = lambda **kw: jax.eval_shape(L.NVFP4MoE(256, 8, top_k=k, prepare=True, **kw).init,
                                       key, x)
    pairs, shards = {"w13_gate_up_pairs": (8,)}, {"w13_gate_up_shards": (4,)}
    assert _records(init(tensor_axis="model")) == {**pairs, **shards}
    assert _records(init(expert_axis="expert", tensor_axis="model")) == {**pairs, **shards}
    assert _records(init(expert_axis="expert")) == pairs
    assert _records(init(tensor_axis="model", fuse_activation=False)) == shards
    # State in pairs order under a layer that runs sharded on experts: read as pairs.
    v64 = L.NVFP4MoE(64, e, top_k=k, prepare=True).init(key, x)
    out = jax.eval_shape(L.NVFP4MoE(64, e, top_k=k, expert_axis="expert").apply, v64, x)
    assert out.shape == x.shape
  with pytest.raises(ValueError, match="fuse_activation=True .*checkpoint layout"):
    L.NVFP4MoE(i, e, top_k=k, fuse_activation=True).init(key, x)
  with pytest.raises(ValueError, match="fuse_activation=True .*'relu2' is not gated"):
    L.NVFP4MoE(i, e, top_k=k, prepare=True, activation="relu2", fuse_activation=True).init(
        key, x)


def test_moe_variables_gate_up_pairs_gptoss_bias_and_old_state(rng):
  e, h, i, k, router, w13, w2, b13, b2, x = _moe_case(rng)
  act = dict(activation="gptoss", limit=0.7)
  layer = L.NVFP4MoE(i, e, top_k=k, use_expert_bias=True, **act)
  # What moe_variables built before the pairs order existed (and still builds by default).
  old = L.moe_variables(router, w13, w2, w13_bias=b13, w2_bias=b2, prepare=True)
  new = L.moe_variables(router, w13, w2, w13_bias=b13, w2_bias=b2, prepare=True,
                        gate_up_pairs=True)
  assert _records(old) == {} and _records(new) == {"w13_gate_up_pairs": (8,)}
  np.testing.assert_array_equal(np.asarray(new["params"]["w13_bias"]), b13)  # [gate; up]
  y_old, y_new = jax.jit(layer.apply)(old, x), jax.jit(layer.apply)(new, x)
  # Each is the NNX layer of the same order, bitwise (the same fused_moe call).
  nnx_call = nnx.jit(lambda m, a: m(a))
  for y, fuse in ((y_old, False), (y_new, None)):
    twin = NNXMoE.from_dense(router, w13, w2, w13_bias=b13, w2_bias=b2, top_k=k, prepare=True,
                             fuse_activation=fuse, **act)
    assert twin.gate_up_pairs == (fuse is None)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(nnx_call(twin, x)))
  want = np_moe(bf16(x), bf16(router), dequant64(_stored_w13(new, 2 * i, h)),
                dequant64(nf.quantize(jnp.asarray(w2))), k, "gptoss", limit=0.7, b13=b13, b2=b2)
  assert rel_l2(y_new, want) < 1e-2 and rel_l2(y_old, want) < 1e-2
  assert rel_l2(y_new, y_old) < 2**-7
  # An explicit fuse_activation must be the stored order.
  np.testing.assert_array_equal(np.asarray(layer.clone(fuse_activation=True).apply(new, x)),
                                np.asarray(y_new))
  with pytest.raises(ValueError, match=r"fuse_activation=True, but the stored w13 is in "
                                       r"\[gate; up\] order \(no record"):
    layer.clone(fuse_activation=True).apply(old, x)
  with pytest.raises(ValueError, match="fuse_activation=False, but the stored w13 is in "
                                       "gate_up_pairs order"):
    layer.clone(fuse_activation=False).apply(new, x)
  # moe_variables puts a w13 given in pairs order back in [gate; up] unless asked, exactly.
  q13 = nf.quantize(jnp.asarray(w13))
  given = L.moe_variables(router, nf.prepare(q13, gate_up_pairs=True), w2, prepare=True)
  assert _records(given) == {}
  np.testing.assert_array_equal(np.asarray(given["nvfp4"]["w13_qweight"]),
                                np.asarray(nf.prepare(q13).qweight))


def test_moe_gate_up_pairs_record_mismatches_raise(rng):
  e, h, i, k = 4, 64, 32, 2
  router, w13, w2 = randn(rng, e, h), randn(rng, e, 2 * i, h), randn(rng, e, h, i)
  x = jnp.asarray(randn(rng, 5, h), jnp.bfloat16)
  layer = L.NVFP4MoE(i, e, top_k=k)
  record = jnp.zeros((8,), jnp.uint8)
  with_store = lambda v, **extra: {"params": v["params"], "nvfp4": {**v["nvfp4"], **extra}}
  pairs = L.moe_variables(router, w13, w2, prepare=True, gate_up_pairs=True)
  ckpt = L.moe_variables(router, w13, w2)
  cases = [
      # A pairs record beside a checkpoint-layout w13 (whose rows are always [gate; up]).
      (layer, with_store(ckpt, w13_gate_up_pairs=record), "beside a checkpoint-layout"),
      (layer, with_store(pairs, w13_gate_up_pairs=jnp.zeros((4,), jnp.uint8)),
       r"must be the gate_up_pairs record, of shape \(8,\)"),
      (layer, with_store(pairs, w13_gate_up_shards=jnp.zeros((2, 3), jnp.uint8)),
       r"'w13_gate_up_shards' must be a record of shape \(tp,\)"),
      # Pairs rows per shard need whole 16-row tiles per shard: I = 32 holds 4, not 8.
      (layer, with_store(pairs, w13_gate_up_shards=jnp.zeros((8,), jnp.uint8)),
       r"stored in gate_up_pairs order .* for 8 tensor shard\(s\) .*I = 32 is not a multiple "
       "of 64"),
      (layer, with_store(pairs, w2_gate_up_pairs=record), "w2 has no gate and up rows"),
      (L.NVFP4MoE(i, e, top_k=k, activation="relu2"),
       with_store(L.moe_variables(router, w13[:, :i], w2, prepare=True),
                  w13_gate_up_pairs=record), "only a gated activation reads"),
  ]
  for module, variables, msg in cases:
    with pytest.raises(ValueError, match=msg):
      module.apply(variables, x)
  with pytest.raises(ValueError, match="only a gated MoE's w13"):
    L.NVFP4Dense(2 * i, use_bias=False).apply(
        {"nvfp4": L.weight_variables(nf.prepare(nf.quantize(jnp.asarray(w13[0])),
                                                gate_up_pairs=True))}, x)
  for rows, kw, msg in ((w13, dict(), "prepare=False"),
                        (w13, dict(prepare=True, gate_up_shards=8),
                         "tensor axis of size 8 and I = 32 is not a multiple of 64"),
                        (w13[:, :i], dict(prepare=True), r"not the \[gate; up\] = 2I = 64")):
    with pytest.raises(ValueError, match="gate_up_pairs=True cannot be used: .*" + msg):
      L.moe_variables(router, rows, w2, gate_up_pairs=True, **kw)


def test_moe_variables_gate_up_pairs_per_tensor_shard(rng):
  """moe_variables(gate_up_pairs=True, gate_up_shards=tp): the pairs rows as for one device,
  the bias per shard, both records; without a mesh the layer puts the bias back and runs the
  one-device pairs call (same bits)."""
  e, h, i, k, router, w13, w2, b13, b2, x = _moe_case(rng)
  layer = L.NVFP4MoE(i, e, top_k=k, use_expert_bias=True, activation="gptoss", limit=0.7)
  one = L.moe_variables(router, w13, w2, w13_bias=b13, w2_bias=b2, prepare=True,
                        gate_up_pairs=True)
  y_one = np.asarray(jax.jit(layer.apply)(one, x))
  for tp in (2, 4):  # I = 32: 4 pair tiles, whole on 2 or 4 shards
    split = L.moe_variables(router, w13, w2, w13_bias=b13, w2_bias=b2, prepare=True,
                            gate_up_pairs=True, gate_up_shards=tp)
    assert _records(split) == {"w13_gate_up_pairs": (8,), "w13_gate_up_shards": (tp,)}
    for name in ("w13_qweight", "w13_qscales", "w13_global_scale"):
      np.testing.assert_array_equal(np.asarray(split["nvfp4"][name]),
                                    np.asarray(one["nvfp4"][name]))
    step = i // tp  # [gate_0; up_0; ...], written out here
    per_shard = np.concatenate([b13[:, s:s + step] for t in range(tp)
                                for s in (t * step, i + t * step)], axis=-1)
    np.testing.assert_array_equal(np.asarray(split["params"]["w13_bias"]), per_shard)
    np.testing.assert_array_equal(np.asarray(jax.jit(layer.apply)(split, x)), y_one)


# ----------------------------------------------------------------------------- records
#
# The records are small zero arrays whose shape carries the information (module docstring of
# jax_nvfp4/nn/linen.py). Zero-size arrays, as the records used to be, are refused by orbax.


def _all_record_variables(rng):
  """Variables holding every record: a dense kernel-layout weight, and a gated MoE with w13 in
  gate_up_pairs order stored for 2 tensor shards (shape, pairs and shards records)."""
  e, h, i, k, router, w13, w2, b13, b2, x = _moe_case(rng)
  dense = L.quantize_dense_variables({"kernel": jnp.asarray(randn(rng, 64, 36)),
                                      "bias": jnp.asarray(randn(rng, 36))}, prepare=True)
  moe = L.moe_variables(router, w13, w2, w13_bias=b13, w2_bias=b2, prepare=True,
                        gate_up_pairs=True, gate_up_shards=2)
  return (dense, L.NVFP4Dense(36)), (moe, L.NVFP4MoE(i, e, top_k=k, use_expert_bias=True)), x


def _to_empty_records(variables, logical):
  """``variables`` with the records of earlier state: ``(*logical_shape, 0)`` per weight prefix
  (``logical``: prefix -> shape), ``(8, 0)`` and ``(tp, 0)``."""
  store = dict(variables["nvfp4"])
  for prefix, shape in logical.items():
    store[prefix + "shape"] = jnp.zeros((*shape, 0), jnp.uint8)
  if "w13_gate_up_pairs" in store:
    store["w13_gate_up_pairs"] = jnp.zeros((8, 0), jnp.uint8)
  if "w13_gate_up_shards" in store:
    store["w13_gate_up_shards"] = jnp.zeros((store["w13_gate_up_shards"].shape[0], 0), jnp.uint8)
  return {**variables, "nvfp4": store}


@pytest.mark.parametrize("n, k", [(1, 16), (15, 48), (16, 64), (17, 80), (36, 32), (48, 128)])
def test_shape_record_is_small_and_gives_the_logical_shape(rng, n, k):
  x = jnp.asarray(randn(rng, 2, k), jnp.bfloat16)
  v = L.quantize_dense_variables({"kernel": jnp.asarray(randn(rng, k, n))}, prepare=True)
  record = v["nvfp4"]["shape"]
  # Rows of the last 16-row tile, 16-column blocks of the last 64-column chunk.
  assert record.shape == ((n - 1) % 16 + 1, (k // 16 - 1) % 4 + 1) and record.size > 0
  assert L.NVFP4Dense(n, use_bias=False).apply(v, x).shape == (2, n)
  for wrong in (n - 1, n + 1):  # same tiles or not: the record tells them apart
    if wrong > 0:
      with pytest.raises(ValueError, match=rf"logical shape \({n}, {k}\), expected "
                                           rf"\({wrong}, {k}\)"):
        L.NVFP4Dense(wrong, use_bias=False).apply(v, x)


def test_no_record_is_empty(rng):
  from jax.sharding import AbstractMesh, AxisType
  (dense, _), (moe, _), x = _all_record_variables(rng)
  mesh = AbstractMesh((2, 4), ("expert", "model"), axis_types=(AxisType.Auto,) * 2)
  with jax.sharding.use_abstract_mesh(mesh):  # init's records under a tensor split
    sharded = jax.eval_shape(L.NVFP4MoE(256, 8, top_k=2, prepare=True, tensor_axis="model").init,
                             jax.random.key(0), x)
  init = L.NVFP4Dense(36, prepare=True).init(jax.random.key(0), x)
  for variables in (dense, moe, sharded, init):
    store = nn.unbox(variables["nvfp4"])
    records = {k for k in store if k.endswith(("shape", "gate_up_pairs", "gate_up_shards"))}
    assert records, store.keys()
    sizes = {k: int(np.prod(store[k].shape)) for k in records}
    assert all(0 < size <= 64 for size in sizes.values()), sizes
  assert set(sharded["nvfp4"]) >= {"w13_shape", "w2_shape", "w13_gate_up_pairs",
                                   "w13_gate_up_shards"}


def test_state_with_the_earlier_empty_records_is_still_read(rng):
  (dense, dense_layer), (moe, moe_layer), x = _all_record_variables(rng)
  e, h, i = 4, 64, 32
  old_dense = _to_empty_records(dense, {"": (36, 64)})
  old_moe = _to_empty_records(moe, {"w13_": (e, 2 * i, h), "w2_": (e, h, i)})
  assert all(a.size == 0 for k, a in old_moe["nvfp4"].items()
             if k.endswith(("shape", "gate_up_pairs", "gate_up_shards")))
  for layer, new, old in ((dense_layer, dense, old_dense), (moe_layer, moe, old_moe)):
    np.testing.assert_array_equal(np.asarray(jax.jit(layer.apply)(old, x)),
                                  np.asarray(jax.jit(layer.apply)(new, x)))
  # An earlier record that names another logical shape is still caught.
  with pytest.raises(ValueError, match=r"logical shape \(36, 48\), expected \(36, 64\)"):
    dense_layer.apply(_to_empty_records(dense, {"": (36, 48)}), x)


def test_records_survive_an_orbax_round_trip(rng, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  (dense, dense_layer), (moe, moe_layer), x = _all_record_variables(rng)
  checkpointer = ocp.StandardCheckpointer()
  for name, layer, variables in (("dense", dense_layer, dense), ("moe", moe_layer, moe)):
    checkpointer.save(tmp_path / name, variables)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / name, jax.eval_shape(lambda v=variables: v))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), restored) == jax.tree.map(
        lambda a: (a.shape, a.dtype), variables)
    np.testing.assert_array_equal(np.asarray(layer.apply(restored, x)),
                                  np.asarray(layer.apply(variables, x)))

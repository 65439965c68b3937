"""Flax NNX layers: NVFP4Linear and NVFP4MoE against float64 NumPy and the float layers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import jax_nvfp4 as nf
from jax_nvfp4 import backend as backend_lib
from jax_nvfp4.nn import MoEBuffer, NVFP4Linear, NVFP4MoE, NVFP4Variable
from jax_nvfp4.nn.nnx import LayoutRecord
from tests import numpy_moe_reference as moe_ref
from tests import numpy_reference as npr

# NVFP4 on Gaussian weights: the E2M1 grid with a per-16 scale mapping each block's amax to 6
# leaves a relative L2 error of ~0.095 on the weight (measured: 0.0950-0.0953 over seeds at these
# sizes), and a product with independent Gaussian inputs inherits the same relative error. The
# bounds below bracket it: above 0.13 the quantization is broken; below 0.05 the layer did not
# quantize at all (so comparing against the float layer can fail both ways).
NVFP4_REL_MAX = 0.13
NVFP4_REL_MIN = 0.05
# Against float64 math on the *dequantized* weight the only error is the bf16 output rounding
# (2^-9 relative, ~2^-10 RMS) and bf16 inputs (exact here: the reference uses the same inputs).
REF_REL = 5e-3
from jax_nvfp4.nn import _common

@pytest.fixture(autouse=True)
def checkpoint_layout_by_default(request, monkeypatch):
  """The layout and byte assertions here are written for prepare="auto" choosing the checkpoint
  layout (the CPU choice); on a GPU "auto" picks the kernel layout, which the tests marked gpu
  cover. Keep the CPU choice for the others wherever they run."""
  if "gpu" in request.keywords:
    return
  original = _common.resolve_prepare
  monkeypatch.setattr(
      _common, "resolve_prepare",
      lambda arg, choice, who: False if arg == "auto" else original(arg, choice, who))



def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bf16(a) -> np.ndarray:
  """Round to bf16 and come back to float64 (what the layer sees)."""
  return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def dequant64(w) -> np.ndarray:
  if isinstance(w, nf.PreparedNVFP4Weight):
    w = nf.unprepare(w)
  return npr.dequantize(np.asarray(w.packed), np.asarray(w.scales), np.asarray(w.global_scale))


# One jitted caller for every layer (nnx.jit retraces per module structure and shapes); the MoE
# runs ~7x faster on CPU under jit than op by op.
call = nnx.jit(lambda m, v: m(v))


def randn(rng, *shape, scale=1.0):
  return (rng.standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------- NVFP4Linear


@pytest.mark.parametrize("prepare", [False, True])
def test_linear_matches_float64_reference(rng, prepare):
  layer = NVFP4Linear(128, 48, rngs=nnx.Rngs(0), prepare=prepare)
  layer.bias.set_value(jnp.asarray(randn(rng, 48)))
  x = jnp.asarray(randn(rng, 2, 3, 128), jnp.bfloat16)
  y = layer(x)
  assert y.shape == (2, 3, 48) and y.dtype == jnp.bfloat16
  want = bf16(x) @ dequant64(layer.weight).T + np.asarray(layer.bias.get_value(), np.float64)
  assert rel_l2(y, want) < REF_REL
  # And the package's own reference on the checkpoint-layout weight.
  w = nf.unprepare(layer.weight) if prepare else layer.weight
  ref = nf.reference_matmul(x, w, layer.bias.get_value())
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                             rtol=2**-7, atol=1e-2)


def test_linear_draws_the_nnx_linear_kernel_and_stays_within_nvfp4_error(rng):
  ref_layer = nnx.Linear(256, 64, rngs=nnx.Rngs(3))
  layer = NVFP4Linear(256, 64, rngs=nnx.Rngs(3))
  kernel = np.asarray(ref_layer.kernel.get_value())
  q = nf.quantize(jnp.asarray(kernel).T)
  np.testing.assert_array_equal(np.asarray(layer.packed.get_value()), np.asarray(q.packed))
  np.testing.assert_array_equal(np.asarray(layer.global_scale.get_value()),
                                np.asarray(q.global_scale))
  x = randn(rng, 32, 256)
  y_float = x.astype(np.float64) @ kernel.astype(np.float64)
  err = rel_l2(layer(jnp.asarray(x)), y_float)
  assert NVFP4_REL_MIN < err < NVFP4_REL_MAX, err


def test_from_linear_copies_bias_and_transposes(rng):
  lin = nnx.Linear(64, 32, rngs=nnx.Rngs(1))
  lin.bias.set_value(jnp.asarray(randn(rng, 32)))
  q = NVFP4Linear.from_linear(lin)
  assert (q.in_features, q.out_features, q.weight.shape) == (64, 32, (32, 64))
  np.testing.assert_array_equal(np.asarray(q.bias.get_value()), np.asarray(lin.bias.get_value()))
  x = randn(rng, 16, 64)
  err = rel_l2(q(jnp.asarray(x)), np.asarray(lin(jnp.asarray(x)), np.float64))
  assert NVFP4_REL_MIN / 2 < err < NVFP4_REL_MAX  # the bias dilutes the error a little
  no_bias = NVFP4Linear.from_linear(nnx.Linear(64, 32, use_bias=False, rngs=nnx.Rngs(1)))
  assert no_bias.bias is None and no_bias(jnp.ones((1, 64), jnp.bfloat16)).shape == (1, 32)


def test_dtype_rule(rng):
  layer = NVFP4Linear(64, 16, rngs=nnx.Rngs(0))
  x32 = jnp.asarray(randn(rng, 4, 64))
  y32 = layer(x32)
  # float32 input: computed in bf16, returned as float32, equal to the bf16 call.
  assert y32.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y32),
                                np.asarray(layer(x32.astype(jnp.bfloat16)), np.float32))
  assert layer(x32.astype(jnp.float16)).dtype == jnp.float16
  half = NVFP4Linear(64, 16, rngs=nnx.Rngs(0), dtype=jnp.float16)
  assert half(x32).dtype == jnp.float16
  with pytest.raises(ValueError, match="dtype must be None, bfloat16 or float16"):
    NVFP4Linear(64, 16, rngs=nnx.Rngs(0), dtype=jnp.float32)
  with pytest.raises(TypeError, match="floating"):
    layer(jnp.ones((2, 64), jnp.int32))


def test_leading_dims_fold(rng):
  layer = NVFP4Linear(32, 16, rngs=nnx.Rngs(0))
  x = jnp.asarray(randn(rng, 2, 3, 4, 32), jnp.bfloat16)
  y = layer(x)
  assert y.shape == (2, 3, 4, 16)
  np.testing.assert_array_equal(np.asarray(y).reshape(24, 16),
                                np.asarray(layer(x.reshape(24, 32))))
  assert layer(jnp.zeros((0, 32), jnp.bfloat16)).shape == (0, 16)


def test_from_nvfp4_and_prepare_layouts(rng):
  w = nf.quantize(jnp.asarray(randn(rng, 48, 64)))
  bias = randn(rng, 48)
  plain = NVFP4Linear.from_nvfp4(w, bias)
  prepped = NVFP4Linear.from_nvfp4(nf.prepare(w), bias, prepare=True)
  back = NVFP4Linear.from_nvfp4(nf.prepare(w), bias, prepare=False)  # unprepared on the way in
  assert not plain.prepared and prepped.prepared and not back.prepared
  assert set(nnx.state(prepped, NVFP4Variable)) == {"qweight", "qscales", "global_scale"}
  assert set(nnx.state(plain, NVFP4Variable)) == {"packed", "scales", "global_scale"}
  np.testing.assert_array_equal(np.asarray(back.packed.get_value()), np.asarray(w.packed))
  x = jnp.asarray(randn(rng, 5, 64), jnp.bfloat16)
  y = np.asarray(plain(x), np.float32)
  np.testing.assert_allclose(np.asarray(prepped(x), np.float32), y, rtol=2**-7, atol=1e-2)
  assert plain.nbytes == w.nbytes == 48 * 32 + 48 * 4 + 4
  assert prepped.nbytes == nf.prepare(w).nbytes


def test_nnx_transforms(rng):
  layer = NVFP4Linear(64, 32, rngs=nnx.Rngs(0))
  x = jnp.asarray(randn(rng, 3, 64), jnp.bfloat16)
  eager = np.asarray(layer(x))
  np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, v: m(v))(layer, x)), eager)
  graphdef, params, frozen = nnx.split(layer, nnx.Param, NVFP4Variable)
  assert set(params) == {"bias"}
  assert set(frozen) == {"packed", "scales", "global_scale"}
  assert set(nnx.state(layer, nnx.Param)) == {"bias"}
  merged = nnx.merge(graphdef, params, frozen)
  np.testing.assert_array_equal(np.asarray(merged(x)), eager)
  # A pure function of the split state under jax.jit.
  out = jax.jit(lambda p, f, v: nnx.merge(graphdef, p, f)(v))(params, frozen, x)
  np.testing.assert_array_equal(np.asarray(out), eager)
  abstract = nnx.eval_shape(lambda: NVFP4Linear(64, 32, rngs=nnx.Rngs(0), prepare=True))
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(abstract))
  assert isinstance(abstract.qweight.get_value(), jax.ShapeDtypeStruct)
  assert shapes["qweight"].get_value() == ((2, 1, 32, 4), jnp.uint32)
  assert shapes["qscales"].get_value() == ((2, 1, 64), jnp.uint8)
  assert shapes["bias"].get_value() == ((32,), jnp.float32)


def test_optimizer_updates_bias_only(rng):
  layer = NVFP4Linear(64, 32, rngs=nnx.Rngs(0))
  before = {k: np.asarray(v.get_value()).tobytes()
            for k, v in nnx.state(layer, NVFP4Variable).items()}
  opt = nnx.Optimizer(layer, optax.sgd(0.5), wrt=nnx.Param)
  x = jnp.asarray(randn(rng, 8, 64))

  def loss(m):
    return jnp.sum(m(x))

  grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(layer)
  # d sum(y) / d bias = number of rows, exactly.
  np.testing.assert_array_equal(np.asarray(grads["bias"].get_value()), np.full(32, 8.0))
  opt.update(layer, grads)
  np.testing.assert_allclose(np.asarray(layer.bias.get_value()), np.full(32, -4.0))
  after = {k: np.asarray(v.get_value()).tobytes()
           for k, v in nnx.state(layer, NVFP4Variable).items()}
  assert after == before
  # The gradient reaching earlier layers: d sum(y) / dx = column sums of W.
  dx = jax.grad(lambda v: jnp.sum(layer(v)))(x)
  np.testing.assert_allclose(np.asarray(dx[0]), dequant64(layer.weight).sum(0), rtol=2e-2,
                             atol=2e-2)


def test_sharding_metadata_one_device_mesh(rng):
  mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))

  def create():
    return NVFP4Linear(64, 32, rngs=nnx.Rngs(0), kernel_sharding=("model", None))

  with jax.set_mesh(mesh):
    layer = create()
    abstract = nnx.eval_shape(create)
  specs = nnx.get_partition_spec(nnx.state(abstract))
  P = jax.sharding.PartitionSpec
  assert specs["packed"].get_value() == P("model", None)
  assert specs["scales"].get_value() == P("model", None)
  assert specs["global_scale"].get_value() == P()
  assert specs["bias"].get_value() == P("model")
  assert layer.packed.get_value().sharding.spec == P("model", None)
  shardings = jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), specs)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
  graphdef = nnx.graphdef(abstract)
  x = jnp.asarray(randn(rng, 2, 64), jnp.bfloat16)
  merged, eager = np.asarray(nnx.merge(graphdef, state)(x)), np.asarray(layer(x))
  if jax.default_backend() == "cpu":
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(nnx.state(layer))):
      np.testing.assert_array_equal(np.asarray(a).reshape(-1).view(np.uint8),
                                    np.asarray(b).reshape(-1).view(np.uint8))
    np.testing.assert_array_equal(merged, eager)
  else:
    # On a GPU the random kernel drawn under jit differs from the eager one by ulps (fused
    # erf_inv), so a few codes on rounding boundaries may flip: the weights agree far inside
    # the quantization error (~0.1), and so do the outputs.
    w_jit, w_eager = (np.asarray(nf.dequantize(l.weight, jnp.float32), np.float64)
                      for l in (nnx.merge(graphdef, state), layer))
    assert np.linalg.norm(w_jit - w_eager) <= 1e-2 * np.linalg.norm(w_eager)
    np.testing.assert_allclose(merged.astype(np.float32), eager.astype(np.float32),
                               rtol=2**-6, atol=2e-2)
  # Prepared layout: names along [N16, K64, 32, 4] / [N16, K64, 64].
  with jax.set_mesh(mesh):
    prepped = nnx.eval_shape(lambda: NVFP4Linear(64, 32, rngs=nnx.Rngs(0), prepare=True,
                                                 kernel_sharding=(None, "model")))
  pspecs = nnx.get_partition_spec(nnx.state(prepped))
  assert pspecs["qweight"].get_value() == P(None, "model", None, None)
  assert pspecs["qscales"].get_value() == P(None, "model", None)


def test_sharded_creation_on_eight_cpu_devices():
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from flax import nnx
      from jax_nvfp4.nn import NVFP4Linear
      assert len(jax.devices()) == 8
      mesh = jax.make_mesh((4, 2), ("model", "data"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
      x = jax.random.normal(jax.random.key(1), (4, 128), jnp.bfloat16)
      single = NVFP4Linear(128, 64, rngs=nnx.Rngs(0))
      for prep in (False, True):
        create = lambda: NVFP4Linear(128, 64, rngs=nnx.Rngs(0), prepare=prep,
                                     kernel_sharding=("model", None))
        with jax.set_mesh(mesh):
          abstract = nnx.eval_shape(create)
          specs = nnx.get_partition_spec(nnx.state(abstract))
          shard = jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), specs)
          state = jax.jit(lambda: nnx.state(create()), out_shardings=shard)()
          layer = nnx.merge(nnx.graphdef(abstract), state)
          y = nnx.jit(lambda m, v: m(v))(layer, x)
        codes = layer.qweight if prep else layer.packed
        arr = codes.get_value()
        # 4-way along N: each device holds a quarter of the rows (tiles).
        assert arr.addressable_shards[0].data.shape[0] == arr.shape[0] // 4, arr.sharding
        assert layer.bias.get_value().sharding.spec == jax.sharding.PartitionSpec("model")
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(single(x), np.float32),
                                   rtol=2**-7, atol=1e-2)
      print("OK")
      """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_backend_argument_and_w4a4(caplog):
  backend_lib.reset_log_once()
  layer = NVFP4Linear(32, 16, rngs=nnx.Rngs(0))
  assert layer.backend == backend_lib.select_backend(weight_format="nvfp4")
  if layer.backend.name == "reference":
    with pytest.raises(ValueError, match="cuda: .*reference: available"):
      NVFP4Linear(32, 16, rngs=nnx.Rngs(0), backend="cuda")
  with caplog.at_level(logging.WARNING, logger="jax_nvfp4"):
    w4a4 = NVFP4Linear(32, 16, rngs=nnx.Rngs(0), activation_format="nvfp4")
    NVFP4Linear(32, 16, rngs=nnx.Rngs(0), activation_format="nvfp4")
  assert w4a4.backend.drops_activation_scales
  assert len([r for r in caplog.records if "activation scales" in r.getMessage()]) == 1
  backend_lib.reset_log_once()


def test_linear_documents_how_it_differs_from_nnx_linear(rng):
  """What NVFP4Linear does not take from nnx.Linear, its output dtype and its reverse-mode-only
  differentiation: each is what the layer does, and each is in its docstring."""
  import inspect
  doc = inspect.getdoc(NVFP4Linear)
  missing = (set(inspect.signature(nnx.Linear.__init__).parameters)
             - set(inspect.signature(NVFP4Linear.__init__).parameters))
  assert missing == {"precision", "dot_general", "promote_dtype", "preferred_element_type",
                     "kernel_metadata", "bias_metadata"}, missing
  for name in sorted(missing):
    assert f"``{name}``" in doc, name
    with pytest.raises(TypeError, match=name):
      NVFP4Linear(32, 16, rngs=nnx.Rngs(0), **{name: None})
  assert "``dtype=float32``" in doc
  with pytest.raises(ValueError, match="dtype must be"):
    NVFP4Linear(32, 16, dtype=jnp.float32, rngs=nnx.Rngs(0))
  # bf16 input, float32 bias: nnx.Linear promotes to float32, NVFP4Linear stays bf16.
  x = jnp.asarray(randn(rng, 2, 32), jnp.bfloat16)
  assert nnx.Linear(32, 16, rngs=nnx.Rngs(0))(x).dtype == jnp.float32
  layer = NVFP4Linear(32, 16, rngs=nnx.Rngs(0), prepare=False)
  assert layer(x).dtype == jnp.bfloat16 and "promoted" in doc
  # Reverse mode, first order only.
  f = lambda a: jnp.sum(layer(a).astype(jnp.float32) ** 2)
  assert jax.grad(f)(x).shape == x.shape
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(f, (x,), (x,))
  with pytest.raises(NotImplementedError):
    jax.grad(lambda a: jnp.sum(jax.grad(f)(a).astype(jnp.float32)))(x)
  assert "reverse mode only" in doc and "second derivatives" in doc


def test_linear_bad_arguments():
  with pytest.raises(ValueError, match="multiple of 16"):
    NVFP4Linear(40, 16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="out_features"):
    NVFP4Linear(32, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pass rngs"):
    NVFP4Linear(32, 16)
  with pytest.raises(ValueError, match="logical shape"):
    NVFP4Linear(32, 16, weight=nf.quantize(jnp.ones((32, 16))))
  with pytest.raises(TypeError, match="NVFP4Weight"):
    NVFP4Linear(32, 16, weight=jnp.ones((16, 32)))
  with pytest.raises(TypeError, match="nnx.Linear"):
    NVFP4Linear.from_linear(nnx.Conv(2, 2, (3,), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="prepare"):
    NVFP4Linear(32, 16, rngs=nnx.Rngs(0), prepare="yes")
  with pytest.raises(ValueError, match="kernel_sharding"):
    NVFP4Linear(32, 16, rngs=nnx.Rngs(0), kernel_sharding=("model",))
  with pytest.raises(ValueError, match="backend"):
    NVFP4Linear(32, 16, rngs=nnx.Rngs(0), backend="triton")
  layer = NVFP4Linear(32, 16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\[\.\.\., 32\]"):
    layer(jnp.ones((2, 48), jnp.bfloat16))


# ----------------------------------------------------------------------------- NVFP4MoE
#
# The NumPy oracle below shares nothing with jax_nvfp4's MoE code: routing, activations and
# the expert sum are written from the documented math, in float64.


def np_silu(v):
  return v / (1.0 + np.exp(-v))


def np_act(h, activation, inter, limit=None, alpha=1.702):
  if activation == "relu2":
    return np.maximum(h[..., :inter], 0.0) ** 2
  gate, up = h[..., :inter], h[..., inter:2 * inter]
  if activation == "swiglu":
    a = np_silu(gate)
    if limit is not None:
      a, up = np.minimum(a, limit), np.clip(up, -limit, limit)
    return a * up
  g, u = np.minimum(gate, limit), np.clip(up, -limit, limit)
  return g / (1.0 + np.exp(-alpha * g)) * (u + 1.0)


def np_moe(x, router, w13, w2, top_k, activation, *, limit=None, b13=None, b2=None,
           expert_map=None, scoring="softmax", correction=None, scale=1.0):
  """float64 MoE: x [M, H], router [E_g, H], w13 [E, N13, H], w2 [E, H, I]."""
  logits = x @ router.T
  if scoring == "softmax":
    p = np.exp(logits - logits.max(-1, keepdims=True))
    scores = p / p.sum(-1, keepdims=True)
  else:
    scores = 1.0 / (1.0 + np.exp(-logits))
  choice = scores + (0.0 if correction is None else correction)
  ids = np.argsort(-choice, axis=-1, kind="stable")[:, :top_k]
  wts = np.take_along_axis(scores, ids, -1)
  wts = wts / wts.sum(-1, keepdims=True) * scale
  inter = w2.shape[-1]
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j in range(top_k):
      e = ids[t, j] if expert_map is None else expert_map[ids[t, j]]
      if e < 0:
        continue
      h = w13[e] @ x[t] + (0 if b13 is None else b13[e])
      y = w2[e] @ np_act(h, activation, inter, limit) + (0 if b2 is None else b2[e])
      out[t] += wts[t, j] * y
  return out


MOE_CASES = [
    ("swiglu", None, False), ("swiglu", 0.6, False), ("gptoss", 0.7, True), ("relu2", None, True),
]


@pytest.mark.parametrize("activation,limit,bias", MOE_CASES,
                         ids=[f"{a}-{l}-{b}" for a, l, b in MOE_CASES])
def test_moe_from_dense_matches_reference_and_float(rng, activation, limit, bias):
  e, h, i, k, m = 4, 64, 32, 2, 12
  n13 = i if activation == "relu2" else 2 * i
  router = randn(rng, e, h, scale=0.3)
  w13, w2 = randn(rng, e, n13, h, scale=0.15), randn(rng, e, h, i, scale=0.2)
  b13 = randn(rng, e, n13, scale=0.1) if bias else None
  b2 = randn(rng, e, h, scale=0.1) if bias else None
  layer = NVFP4MoE.from_dense(router, w13, w2, w13_bias=b13, w2_bias=b2, top_k=k,
                              activation=activation, limit=limit)
  x = jnp.asarray(randn(rng, m, h), jnp.bfloat16)
  y = call(layer, x)
  assert y.shape == (m, h) and y.dtype == jnp.bfloat16
  x64, r64 = bf16(x), bf16(router)  # the router runs in bf16 (its stored dtype)
  kw = dict(limit=limit, b13=b13, b2=b2)
  # Tight: against float64 math on the dequantized experts. The op rounds GEMM1's output, the
  # activation and each expert's output to bf16 (documented): a few 2^-9 roundings, measured
  # 0.003-0.005, bound 1e-2.
  want = np_moe(x64, r64, dequant64(layer.w13), dequant64(layer.w2), k, activation, **kw)
  assert rel_l2(y, want) < 1e-2
  # Loose: against the float experts. Two chained NVFP4 GEMMs of ~0.095 each compound to
  # ~0.135, the gating non-linearity adds to it: measured 0.145-0.195 over seeds and
  # activations; < 0.3 with margin (a broken layer is off by ~1) and > 0.05 to prove it is
  # quantized.
  err = rel_l2(y, np_moe(x64, r64, w13.astype(np.float64), w2.astype(np.float64), k,
                         activation, **kw))
  assert NVFP4_REL_MIN < err < 0.3, err


def test_moe_expert_map_and_correction_bias(rng):
  e_global, e, h, i, k, m = 8, 4, 64, 32, 2, 12
  router = randn(rng, e_global, h, scale=0.3)
  w13, w2 = randn(rng, e, 2 * i, h, scale=0.2), randn(rng, e, h, i, scale=0.2)
  correction = randn(rng, e_global, scale=0.3)
  expert_map = np.array([-1, 0, -1, 1, 2, -1, 3, -1])
  routing = nf.RoutingConfig.deepseek_v3(k, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                                         correction_bias=jnp.asarray(correction))
  layer = NVFP4MoE.from_dense(router, w13, w2, routing=routing, expert_map=expert_map)
  assert isinstance(layer.correction_bias, MoEBuffer)
  assert layer.routing.correction_bias is None  # moved into the buffer
  x = jnp.asarray(randn(rng, m, h), jnp.bfloat16)
  want = np_moe(bf16(x), bf16(router), dequant64(layer.w13), dequant64(layer.w2), k, "swiglu",
                expert_map=expert_map, scoring="sigmoid", correction=correction, scale=2.5)
  assert np.abs(want).sum() > 0  # some tokens hit local experts
  assert rel_l2(call(layer, x), want) < 1e-2


def test_moe_constructors_agree_and_transforms(rng):
  e, h, i = 4, 64, 32  # the shapes of the tests above: compiled once
  router = randn(rng, e, h)
  w13, w2 = nf.quantize(jnp.asarray(randn(rng, e, 2 * i, h))), nf.quantize(
      jnp.asarray(randn(rng, e, h, i)))
  a = NVFP4MoE.from_nvfp4(router, w13, w2, top_k=2)
  # [gate; up] order: the rounding points of a (the gate_up_pairs order is tested below).
  b = NVFP4MoE.from_nvfp4(router, w13, w2, top_k=2, prepare=True, fuse_activation=False)
  assert b.prepared and set(nnx.state(b, NVFP4Variable)) == {
      "w13_qweight", "w13_qscales", "w13_global_scale", "w2_qweight", "w2_qscales",
      "w2_global_scale"}
  assert set(nnx.state(a, nnx.Param)) == {"router"}
  assert a.router.get_value().dtype == jnp.bfloat16
  x = jnp.asarray(randn(rng, 3, 4, h))  # float32, leading dims
  ya = call(a, x)
  assert ya.shape == (3, 4, h) and ya.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(ya))  # eager == jit
  np.testing.assert_allclose(np.asarray(call(b, x)), np.asarray(ya), rtol=2**-7, atol=1e-2)
  graphdef, state = nnx.split(a)
  np.testing.assert_array_equal(np.asarray(call(nnx.merge(graphdef, state), x)), np.asarray(ya))
  assert a.nbytes == w13.nbytes + w2.nbytes
  abstract = nnx.eval_shape(lambda: NVFP4MoE(h, i, e, top_k=2, rngs=nnx.Rngs(0),
                                             use_expert_bias=True))
  assert abstract.w13_packed.get_value().shape == (e, 2 * i, h // 2)
  assert abstract.w2_bias.get_value().shape == (e, h)
  assert nnx.eval_shape(lambda mm, v: mm(v), abstract, x).shape == (3, 4, h)


def test_moe_reference_backend_never_reaches_the_kernel(rng, monkeypatch):
  """backend="reference" runs fused_moe's pure-JAX path where the kernel would run: lowered for
  a CUDA GPU with the kernel built (pretended: lowering needs no GPU), no kernel call; the same
  weights through fused_moe's default choice do call it (the control)."""
  from jax_nvfp4.ops import moe as moe_ops
  monkeypatch.setattr(nf._ffi, "REGISTERED", nf._ffi.REGISTERED | {moe_ops.CUDA_TARGET})
  monkeypatch.setattr(moe_ops, "_kernel_wanted", lambda: True)  # "on this GPU"
  e, h, i = 4, 64, 32
  layer = NVFP4MoE.from_dense(randn(rng, e, h), randn(rng, e, 2 * i, h), randn(rng, e, h, i),
                              top_k=2, prepare=True, backend="reference")
  assert layer.backend.name == "reference" and layer.prepared
  x = jnp.asarray(randn(rng, 5, h), jnp.bfloat16)
  lower = lambda f: jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert moe_ops.CUDA_TARGET not in lower(lambda v: layer(v))
  y = call(layer, x)  # runs (used to raise NotImplementedError where the kernel was wanted)
  want = np_moe(bf16(x), bf16(layer.router.get_value()), dequant64(layer.w13),
                dequant64(layer.w2), 2, "swiglu")
  assert rel_l2(y, want) < 1e-2
  if jax.default_backend() != "gpu":
    control = lambda v: moe_ops.fused_moe(v, layer.w13, layer.w2,
                                          router_logits=layer.router_logits(v), top_k=2)
    assert lower(control).count(moe_ops.CUDA_TARGET) == 2


def test_moe_auto_on_a_gpu_machine_lowers_per_platform(rng, monkeypatch):
  """Built with backend="auto" where the oracle picks the kernel (pretended), the layer runs the
  kernel when lowered for cuda and the reference for the host, as fused_moe(backend="auto")
  does; a layer that asked for "cuda" explicitly still refuses the host."""
  from jax_nvfp4.ops import moe as moe_ops
  monkeypatch.setattr(nf._ffi, "REGISTERED", nf._ffi.REGISTERED | {moe_ops.CUDA_TARGET})
  monkeypatch.setattr(_common, "choose_backend", lambda *a, **k: backend_lib.BackendChoice(
      "cuda", "pretended GPU"))
  e, h, i = 4, 64, 32
  weights = randn(rng, e, h), randn(rng, e, 2 * i, h), randn(rng, e, h, i)
  layer = NVFP4MoE.from_dense(*weights, top_k=2, prepare=True, backend="auto")
  assert layer.backend.name == "cuda"
  x = jnp.asarray(randn(rng, 5, h), jnp.bfloat16)
  lower = lambda f, p: jax.jit(f).trace(x).lower(lowering_platforms=(p,)).as_text()
  assert lower(lambda v: layer(v), "cuda").count(moe_ops.CUDA_TARGET) == 2
  assert moe_ops.CUDA_TARGET not in lower(lambda v: layer(v), "cpu")
  if jax.default_backend() == "cpu":
    y = call(layer, x)
    want = np_moe(bf16(x), bf16(layer.router.get_value()), dequant64(layer.w13),
                  dequant64(layer.w2), 2, "swiglu")
    assert rel_l2(y, want) < 1e-2
    explicit = NVFP4MoE.from_dense(*weights, top_k=2, prepare=True, backend="cuda")
    with pytest.raises(ValueError, match="cuda"):
      explicit(x)


def test_moe_bad_arguments(rng):
  e, h, i = 4, 32, 16
  router, w13, w2 = randn(rng, e, h), randn(rng, e, 2 * i, h), randn(rng, e, h, i)
  with pytest.raises(ValueError, match="top_k or routing"):
    NVFP4MoE.from_dense(router, w13, w2)
  with pytest.raises(ValueError, match="activation"):
    NVFP4MoE.from_dense(router, w13, w2, top_k=2, activation="gelu")
  with pytest.raises(ValueError, match="needs a limit"):
    NVFP4MoE.from_dense(router, w13, w2, top_k=2, activation="gptoss")
  with pytest.raises(ValueError, match=r"w13 must have logical shape \(4, 16, 32\)"):
    NVFP4MoE.from_dense(router, w13, w2, top_k=2, activation="relu2")
  with pytest.raises(ValueError, match="router weight"):
    NVFP4MoE.from_dense(router[:3], w13, w2, top_k=2)
  with pytest.raises(ValueError, match="exceeds"):
    NVFP4MoE.from_dense(router, w13, w2, top_k=5)
  with pytest.raises(ValueError, match="expert_map"):
    NVFP4MoE.from_dense(router, w13, w2, top_k=2, expert_map=[0, 1, 2, 4])
  with pytest.raises(ValueError, match="multiples of 16"):
    NVFP4MoE(40, 16, 4, top_k=2, rngs=nnx.Rngs(0))
  layer = NVFP4MoE.from_dense(router, w13, w2, top_k=2)
  with pytest.raises(ValueError, match=r"\[\.\.\., 32\]"):
    layer(jnp.ones((2, 16), jnp.bfloat16))


@pytest.mark.parametrize("length", [1, 3, 7])
def test_moe_wrong_length_correction_bias_is_refused_at_construction(rng, length):
  """The correction bias must be [E_global]: caught when the layer is built (where it used to
  pass and fail at the first call), also with an expert_map (E_global = its length)."""
  e, h, i = 4, 32, 16
  routing = lambda n: nf.RoutingConfig.deepseek_v3(2, n_group=1, topk_group=1,
                                                   routed_scaling_factor=1.0,
                                                   correction_bias=jnp.zeros(n))
  router, w13, w2 = randn(rng, e, h), randn(rng, e, 2 * i, h), randn(rng, e, h, i)
  with pytest.raises(ValueError, match=rf"NVFP4MoE: the correction bias must have shape "
                                       rf"\(E_global,\) = \(4,\) .*got shape \({length},\)"):
    NVFP4MoE(h, i, e, routing=routing(length), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\(E_global,\) = \(6,\)"):
    NVFP4MoE.from_dense(randn(rng, 6, h), w13, w2, routing=routing(e),
                        expert_map=[0, -1, 1, 2, -1, 3])
  layer = NVFP4MoE.from_dense(router, w13, w2, routing=routing(e))
  assert layer(jnp.ones((2, h), jnp.bfloat16)).shape == (2, h)


# ----------------------------------------------------------------------------- gate_up_pairs
#
# A gated layer that keeps its weights in the kernel layout stores w13's rows in gate_up_pairs
# order, so that GEMM 1 applies the activation (fused_moe). On the CPU the reference lowering
# rounds at the kernel's points, so the order is visible in the numbers: tests/
# numpy_moe_reference.py's float64 layer with bf16 roundings at those points
# (gemm1_rounded=False for pairs: GEMM 1's output is not rounded before the activation).

PAIRS_CASES = [("swiglu", None, False), ("swiglu", 0.6, False), ("gptoss", 0.7, True)]


def _pairs_layers(rng, activation, limit, bias, e=4, h=64, i=32):
  """(pairs layer, the same layer in [gate; up] order, the float weights, the constructor's
  keywords but prepare) from the same experts."""
  router = randn(rng, e, h, scale=0.3)
  w13, w2 = randn(rng, e, 2 * i, h, scale=0.15), randn(rng, e, h, i, scale=0.2)
  b13 = randn(rng, e, 2 * i, scale=0.1) if bias else None
  b2 = randn(rng, e, h, scale=0.1) if bias else None
  kw = dict(w13_bias=b13, w2_bias=b2, top_k=2, activation=activation, limit=limit)
  pairs = NVFP4MoE.from_dense(router, w13, w2, prepare=True, **kw)
  plain = NVFP4MoE.from_dense(router, w13, w2, prepare=True, fuse_activation=False, **kw)
  return pairs, plain, (router, w13, w2), kw


def _rounded_reference(layer, x, activation, limit, b13, b2, gemm1_rounded):
  """float64 layer (tests/numpy_moe_reference.py) on the layer's dequantized experts; with
  bf16 roundings at fused_moe's points, or exact (``gemm1_rounded=None``)."""
  x64 = bf16(x)
  logits = x64 @ bf16(layer.router.get_value()).T  # the router runs in bf16
  tw, ti = moe_ref.route(logits, layer.top_k)
  kw = dict(activation_kind=activation, limit=limit, b13=b13, b2=b2)
  if gemm1_rounded is not None:
    kw.update(round_dtype=ml_dtypes.bfloat16, gemm1_rounded=gemm1_rounded)
  out = moe_ref.moe(x64, dequant64(layer.w13), dequant64(layer.w2), tw, ti, **kw)
  return bf16(out) if gemm1_rounded is not None else out


@pytest.mark.parametrize("activation,limit,bias", PAIRS_CASES,
                         ids=[f"{a}-{l}-{b}" for a, l, b in PAIRS_CASES])
def test_moe_gate_up_pairs_matches_plain_order_and_reference(rng, activation, limit, bias):
  pairs, plain, weights, kw = _pairs_layers(rng, activation, limit, bias)
  w13, b13, b2 = weights[1], kw["w13_bias"], kw["w2_bias"]
  assert pairs.gate_up_pairs and not plain.gate_up_pairs
  # Stored in pairs order (the flag on the stored pytree, and the record in the state), which
  # is the canonical weight bitwise once unprepared; the w13 property gives [gate; up].
  stored = pairs._weight("w13")
  assert isinstance(stored, nf.PreparedNVFP4Weight) and stored.gate_up_pairs
  q13 = nf.quantize(jnp.asarray(w13))
  back = nf.unprepare(stored)
  np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(q13.packed))
  np.testing.assert_array_equal(np.asarray(back.scales).view(np.uint8),
                                np.asarray(q13.scales).view(np.uint8))
  np.testing.assert_array_equal(np.asarray(back.global_scale), np.asarray(q13.global_scale))
  assert not np.array_equal(np.asarray(stored.qweight), np.asarray(nf.prepare(q13).qweight))
  assert isinstance(pairs.w13_gate_up_pairs, LayoutRecord)
  assert pairs.w13_gate_up_pairs.get_value().shape == (8,) and plain.w13_gate_up_pairs is None
  assert "w13_gate_up_pairs" not in nnx.state(plain)  # [gate; up]: the state of before
  for a, b in zip(jax.tree.leaves(pairs.w13), jax.tree.leaves(plain.w13)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not pairs.w13.gate_up_pairs
  if bias:  # stored as given: fused_moe reorders the bias of a pairs w13 itself
    np.testing.assert_array_equal(np.asarray(pairs.w13_bias.get_value()), b13)

  x = jnp.asarray(randn(rng, 24, 64), jnp.bfloat16)
  y_pairs, y_plain = call(pairs, x), call(plain, x)
  # Each order against the float64 layer rounded to bf16 at its own points: what can be left
  # is float32 accumulation flipping the odd bf16 rounding (measured 0 on the CPU; bound
  # test_moe_gpu.py's 1.5e-3, as on a GPU these tests run the kernel). The other order's
  # points are 2.6e-3 to 4.8e-3 off (as the two orders are from each other), so this checks
  # that the activation really moved into GEMM 1.
  assert rel_l2(y_pairs, _rounded_reference(pairs, x, activation, limit, b13, b2, False)) < 1.5e-3
  assert rel_l2(y_plain, _rounded_reference(plain, x, activation, limit, b13, b2, True)) < 1.5e-3
  # Against each other: the pairs order skips the bf16 rounding of GEMM 1's output (2^-9
  # relative at most), which the later bf16 roundings (activation, expert rows, output) turn
  # into one-ulp flips of some outputs: measured 2.6e-3 to 4.8e-3, bound 2^-7.
  assert rel_l2(y_pairs, y_plain) < 2**-7
  # Both against exact float64 math, within the layer tests' 1e-2 (measured 2.8e-3 to 3.1e-3
  # for pairs, 2.9e-3 to 4.1e-3 for [gate; up]: one bf16 rounding less).
  exact = _rounded_reference(pairs, x, activation, limit, b13, b2, None)
  assert rel_l2(y_pairs, exact) < 1e-2 and rel_l2(y_plain, exact) < 1e-2
  # [gate; up] order in the kernel layout is today's layer: the checkpoint layout's numbers.
  ckpt = NVFP4MoE.from_dense(*weights, prepare=False, **kw)
  np.testing.assert_array_equal(np.asarray(call(ckpt, x)), np.asarray(y_plain))


def test_moe_gate_up_pairs_only_where_safe(rng):
  e, h, i = 4, 64, 32
  router, w13, w2 = randn(rng, e, h), randn(rng, e, 2 * i, h), randn(rng, e, h, i)
  relu13 = w13[:, :i]
  # The automatic rule: kernel layout, gated, I % 8 == 0 (I % 8 tp under a tensor split).
  assert NVFP4MoE.from_dense(router, w13, w2, top_k=2, prepare=True).gate_up_pairs
  for layer in (NVFP4MoE.from_dense(router, w13, w2, top_k=2),  # checkpoint layout
                NVFP4MoE.from_dense(router, relu13, w2, top_k=2, prepare=True,
                                    activation="relu2"),
                NVFP4MoE.from_dense(router, w13, w2, top_k=2, prepare=True,
                                    fuse_activation=False)):
    assert not layer.gate_up_pairs and layer.w13_gate_up_pairs is None
    assert not getattr(layer._weight("w13"), "gate_up_pairs", False)
  # A given pairs w13 is stored in the order the layer uses, exactly.
  q13 = nf.quantize(jnp.asarray(w13))
  given = nf.prepare(q13, gate_up_pairs=True)
  for prepare, fuse in ((True, False), (False, None), (True, None)):
    layer = NVFP4MoE.from_nvfp4(router, given, nf.quantize(jnp.asarray(w2)), top_k=2,
                                prepare=prepare, fuse_activation=fuse)
    assert layer.gate_up_pairs == (prepare and fuse is None)
    want = nf.prepare(q13) if prepare else q13
    for a, b in zip(jax.tree.leaves(layer.w13), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  # fuse_activation=True where the order cannot be used names the reason.
  with pytest.raises(ValueError, match="fuse_activation=True .*checkpoint layout"):
    NVFP4MoE.from_dense(router, w13, w2, top_k=2, fuse_activation=True)
  with pytest.raises(ValueError, match="fuse_activation=True .*'relu2' is not gated"):
    NVFP4MoE.from_dense(router, relu13, w2, top_k=2, prepare=True, activation="relu2",
                        fuse_activation=True)
  with pytest.raises(ValueError, match="fuse_activation must be None, True or False"):
    NVFP4MoE.from_dense(router, w13, w2, top_k=2, fuse_activation="yes")
  # I % 8, and I/tp % 8 under a tensor split: the layers take I % 16 == 0 only, and split the
  # kernel layout into I/tp multiples of 64, so the rule's own checks are the ones to test.
  resolve = lambda fuse, i, tp: _common.resolve_fuse_activation(
      fuse, prepared=True, activation="swiglu", intermediate_size=i, gate_up_shards=tp, who="t")
  with pytest.raises(ValueError, match="I = 20 is not a multiple of 8"):
    resolve(True, 20, 1)
  assert not resolve(None, 20, 1)
  assert resolve(None, 64, 8) and resolve(True, 64, 8)  # 8 rows per shard: one pair tile each
  with pytest.raises(ValueError, match="tensor axis of size 16 and I = 64 is not a multiple of "
                                       "128: a shard would hold part of a 16-row gate/up tile"):
    resolve(True, 64, 16)
  assert not resolve(None, 64, 16)


def test_moe_gate_up_pairs_and_mesh_axes(rng):
  """An expert axis and a tensor split into whole pair tiles keep the pairs order (the rows
  are stored as on one device; with a tensor split of size > 1 only the bias is per shard);
  fuse_activation=False keeps the per-shard [gate_t; up_t] order. Numbers on 8 devices:
  tests/test_sharding_layers.py."""
  from jax.sharding import AbstractMesh, AxisType
  h, i, e = 64, 256, 8
  make = lambda **kw: NVFP4MoE(h, i, e, top_k=2, rngs=nnx.Rngs(0), prepare=True, **kw)
  with jax.sharding.use_abstract_mesh(AbstractMesh((2, 4), ("expert", "model"),
                                                   axis_types=(AxisType.Auto,) * 2)):
    for axes, tp in ((dict(tensor_axis="model"), 4), (dict(expert_axis="expert"), 1),
                     (dict(expert_axis="expert", tensor_axis="model"), 4)):
      for fuse in (None, True):
        layer = nnx.eval_shape(lambda: make(fuse_activation=fuse, **axes))
        assert layer.gate_up_shards == tp and layer.gate_up_pairs, axes
        assert layer.w13_gate_up_pairs.get_value().shape == (8,), axes
      plain = nnx.eval_shape(lambda: make(fuse_activation=False, **axes))
      assert plain.gate_up_shards == tp and not plain.gate_up_pairs, axes
      assert plain.w13_gate_up_pairs is None, axes
  mesh1 = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))
  x = jnp.asarray(randn(rng, 3, h), jnp.bfloat16)
  with jax.set_mesh(mesh1):
    tp1 = make(tensor_axis="model")
    assert tp1.gate_up_shards == 1 and tp1.gate_up_pairs
    y = call(tp1, x)
  # A mesh of size 1 splits nothing: the unsharded pairs layer's bits (same rngs, same rows).
  np.testing.assert_array_equal(np.asarray(y), np.asarray(call(make(), x)))
  assert rel_l2(y, call(make(fuse_activation=False), x)) < 2**-7


def test_moe_gate_up_pairs_state_round_trips_and_mismatches(rng, tmp_path):
  pairs, plain, _, _ = _pairs_layers(rng, "swiglu", None, False)
  x = jnp.asarray(randn(rng, 5, 64), jnp.bfloat16)
  y_pairs, y_plain = np.asarray(call(pairs, x)), np.asarray(call(plain, x))
  g_pairs, s_pairs = nnx.split(pairs)
  g_plain, s_plain = nnx.split(plain)
  np.testing.assert_array_equal(np.asarray(call(nnx.merge(g_pairs, s_pairs), x)), y_pairs)
  np.testing.assert_array_equal(np.asarray(call(nnx.merge(g_plain, s_plain), x)), y_plain)
  # State of the [gate; up] order is what the layer stored before the pairs order existed
  # (no record, the same arrays), and loads into a fuse_activation=False layer.
  assert set(s_plain) == {"router", "w13_qweight", "w13_qscales", "w13_global_scale",
                          "w2_qweight", "w2_qscales", "w2_global_scale"}
  # The other order's state is refused (the record is one leaf more or less), not misread.
  with pytest.raises(ValueError):
    nnx.merge(g_pairs, s_plain)
  with pytest.raises(ValueError):
    nnx.merge(g_plain, s_pairs)
  with pytest.raises(ValueError):
    nnx.update(nnx.merge(g_plain, s_plain), s_pairs)
  # A record that disagrees with the layer's order is caught at call time.
  tampered = nnx.merge(g_plain, s_plain)
  tampered.w13_gate_up_pairs = LayoutRecord(jnp.zeros((8,), jnp.uint8))
  with pytest.raises(ValueError, match="layout record w13_gate_up_pairs is of shape"):
    tampered(x)
  # Through orbax (the record is not empty, which orbax refuses to save): a round trip, and the
  # other order refused.
  ocp = pytest.importorskip("orbax.checkpoint")
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "pairs", s_pairs)
  ckpt.save(tmp_path / "plain", s_plain)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "pairs", nnx.state(nnx.eval_shape(lambda: pairs)))
  np.testing.assert_array_equal(np.asarray(call(nnx.merge(g_pairs, restored), x)), y_pairs)
  with pytest.raises(ValueError):
    ckpt.restore(tmp_path / "plain", nnx.state(nnx.eval_shape(lambda: pairs)))
  with pytest.raises(ValueError):
    ckpt.restore(tmp_path / "pairs", nnx.state(nnx.eval_shape(lambda: plain)))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64])
def test_linear_cuda_backend(rng, m):
  layer = NVFP4Linear(512, 320, rngs=nnx.Rngs(0))
  assert layer.backend.name == "cuda" and layer.prepared
  layer.bias.set_value(jnp.asarray(randn(rng, 320)))
  x = jnp.asarray(randn(rng, m, 512), jnp.bfloat16)
  y = call(layer, x)
  want = bf16(x) @ dequant64(layer.weight).T + np.asarray(layer.bias.get_value(), np.float64)
  assert rel_l2(y, want) < REF_REL
  ref = NVFP4Linear.from_nvfp4(nf.unprepare(layer.weight), layer.bias.get_value(),
                               backend="reference")
  assert ref.backend.name == "reference" and not ref.prepared
  np.testing.assert_allclose(np.asarray(call(ref, x), np.float32), np.asarray(y, np.float32),
                             rtol=2**-7, atol=2e-2)


@pytest.mark.gpu
def test_moe_gpu(rng):
  e, h, i, k, m = 8, 256, 128, 2, 33
  router = randn(rng, e, h, scale=0.1)
  w13, w2 = randn(rng, e, 2 * i, h, scale=0.06), randn(rng, e, h, i, scale=0.09)
  layer = NVFP4MoE.from_dense(router, w13, w2, top_k=k)
  if backend_lib.MOE_TARGET in nf._ffi.REGISTERED:
    assert layer.backend.name == "cuda" and layer.prepared
  x = jnp.asarray(randn(rng, m, h), jnp.bfloat16)
  want = np_moe(bf16(x), bf16(router), dequant64(layer.w13), dequant64(layer.w2), k, "swiglu")
  assert rel_l2(call(layer, x), want) < 1e-2

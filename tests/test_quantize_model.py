"""quantize_model on a small NNX transformer (attention, MLP, MoE): what is replaced, the byte
report (hand-computed), and the outputs against the float model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_nvfp4 as nf
from jax_nvfp4.nn import NVFP4Linear, NVFP4MoE, QuantizeReport, quantize_model
from tests.test_nnx import randn, rel_l2

D, HEADS, FFN, E, MOE_I, TOP_K, VOCAB, IN = 64, 4, 128, 4, 32, 2, 96, 40


class Attention(nnx.Module):
  def __init__(self, rngs):
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      setattr(self, name, nnx.Linear(D, D, rngs=rngs))

  def __call__(self, x):  # x [B, T, D]
    b, t, _ = x.shape
    split = lambda a: a.reshape(b, t, HEADS, D // HEADS)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // HEADS)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
    return self.o_proj(o.reshape(b, t, D))


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.gate_proj = nnx.Linear(D, FFN, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(D, FFN, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(FFN, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DenseMoE(nnx.Module):
  """Float experts, softmax -> top-k -> renormalize, computed densely (every expert)."""

  def __init__(self, rngs):
    self.gate = nnx.Linear(D, E, use_bias=False, rngs=rngs)  # the router
    self.w13 = nnx.Param(jax.random.normal(rngs.params(), (E, 2 * MOE_I, D)) * D**-0.5)
    self.w2 = nnx.Param(jax.random.normal(rngs.params(), (E, D, MOE_I)) * MOE_I**-0.5)

  def __call__(self, x):
    logits = self.gate(x)
    w, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), TOP_K)
    w = w / w.sum(-1, keepdims=True)
    dense_w = jnp.sum(jax.nn.one_hot(ids, E) * w[..., None], axis=-2)    # [..., E]
    h = jnp.einsum("...d,end->...en", x, self.w13[...])
    a = jax.nn.silu(h[..., :MOE_I]) * h[..., MOE_I:]
    y = jnp.einsum("...ei,edi->...ed", a, self.w2[...])
    return jnp.einsum("...ed,...e->...d", y, dense_w)


def moe_to_nvfp4(moe: DenseMoE):
  # The router stays bf16; the experts are quantized.
  return NVFP4MoE.from_dense(moe.gate.kernel[...].T, moe.w13[...], moe.w2[...], top_k=TOP_K,
                            prepare=False)


class Block(nnx.Module):
  def __init__(self, rngs):
    self.norm1 = nnx.RMSNorm(D, rngs=rngs)
    self.attn = Attention(rngs)
    self.norm2 = nnx.RMSNorm(D, rngs=rngs)
    self.mlp = MLP(rngs)
    self.moe = DenseMoE(rngs)
    self.shared_expert_gate = nnx.Linear(D, 1, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    h = self.norm2(x)
    return x + self.mlp(h) + jax.nn.sigmoid(self.shared_expert_gate(h)) * self.moe(h)


class Model(nnx.Module):
  def __init__(self, rngs):
    self.embed_proj = nnx.Linear(IN, D, rngs=rngs)  # in_features 40: skipped
    self.layers = nnx.List([Block(rngs), Block(rngs)])
    self.lm_head = nnx.Linear(D, VOCAB, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = self.embed_proj(x)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(x)


QUANTIZED = [f"layers/{i}/{p}" for i in (0, 1) for p in (
    "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj",
    "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj", "moe")]


def _expected_bytes():
  """Hand-computed from the shapes (float32 kernels; NVFP4: N*K/2 codes + N*K/16 scales + 4)."""
  attn_before, attn_after = 64 * 64 * 4, 64 * 64 // 2 + 64 * 64 // 16 + 4          # 16384, 2308
  mlp_before, mlp_after = 64 * 128 * 4, 64 * 128 // 2 + 64 * 128 // 16 + 4        # 32768, 4612
  # MoE, all variables: router 64x4 f32 + w13 4x64x64 f32 + w2 4x64x32 f32 before; after:
  # router bf16 [4, 64] + w13 (4*64*32 codes + 4*64*4 scales + 4*4 gs) + w2 (4*64*16 + 4*64*2 +
  # 4*4).
  moe_before = 64 * 4 * 4 + 4 * 64 * 64 * 4 + 4 * 64 * 32 * 4                      # 99328
  moe_after = 4 * 64 * 2 + (8192 + 1024 + 16) + (4096 + 512 + 16)                   # 14368
  shared_gate = 64 * 1 * 4
  embed = 40 * 64 * 4
  lm_head = 64 * 96 * 4
  per_block_before = 4 * attn_before + 3 * mlp_before + moe_before + shared_gate
  per_block_after = 4 * attn_after + 3 * mlp_after + moe_after + shared_gate
  return (embed + lm_head + 2 * per_block_before, embed + lm_head + 2 * per_block_after,
          attn_after, mlp_after, moe_after)


@pytest.fixture(scope="module")
def float_model():
  return Model(nnx.Rngs(0))


@pytest.fixture(scope="module")
def quantized(float_model):
  return quantize_model(float_model, converters={DenseMoE: moe_to_nvfp4}, prepare=False)


def test_report_is_exact(quantized):
  _, report = quantized
  assert isinstance(report, QuantizeReport)
  assert sorted(report.quantized) == sorted(QUANTIZED)
  assert sorted(report.excluded) == ["layers/0/shared_expert_gate", "layers/1/shared_expert_gate",
                                     "lm_head"]
  assert report.skipped == ("embed_proj",)
  before, after, attn_after, mlp_after, moe_after = _expected_bytes()
  assert (report.bytes_before, report.bytes_after) == (before, after) == (561664, 110200)
  by_path = {l.path: l for l in report.layers}
  assert (by_path["layers/0/attn/q_proj"].bytes_before,
          by_path["layers/0/attn/q_proj"].bytes_after) == (16384, attn_after)
  assert by_path["layers/1/mlp/down_proj"].bytes_after == mlp_after
  assert (by_path["layers/0/moe"].bytes_before, by_path["layers/0/moe"].bytes_after) == (
      99328, moe_after)
  assert "not a multiple of 16" in by_path["embed_proj"].reason
  assert by_path["embed_proj"].bytes_after == by_path["embed_proj"].bytes_before == 10240
  assert "'*gate'" in by_path["layers/0/shared_expert_gate"].reason
  assert "total: 561,664 -> 110,200 bytes" in str(report)


def test_structure_and_weights(float_model, quantized):
  model, _ = quantized
  assert model is not float_model
  for path in QUANTIZED:
    src, dst = float_model, model
    for key in path.split("/"):
      key = int(key) if key.isdigit() else key
      src, dst = src[key] if isinstance(key, int) else getattr(src, key), (
          dst[key] if isinstance(key, int) else getattr(dst, key))
    if path.endswith("moe"):
      assert isinstance(src, DenseMoE) and isinstance(dst, NVFP4MoE)
      continue
    assert type(src) is nnx.Linear and isinstance(dst, NVFP4Linear)
    q = nf.quantize(src.kernel[...].T)
    np.testing.assert_array_equal(np.asarray(dst.weight.packed), np.asarray(q.packed))
    np.testing.assert_array_equal(np.asarray(dst.weight.global_scale),
                                  np.asarray(q.global_scale))
  # Excluded / skipped layers: untouched float Linear with the same values.
  for name in ("lm_head", "embed_proj"):
    assert type(getattr(model, name)) is nnx.Linear
    np.testing.assert_array_equal(np.asarray(getattr(model, name).kernel[...]),
                                  np.asarray(getattr(float_model, name).kernel[...]))
  assert type(model.layers[0].shared_expert_gate) is nnx.Linear
  # The source model is left as it was (inplace=False).
  assert type(float_model.layers[0].attn.q_proj) is nnx.Linear
  assert isinstance(float_model.layers[1].moe, DenseMoE)


def test_outputs_match_float_model(float_model, quantized, rng):
  model, _ = quantized
  x = jnp.asarray(randn(rng, 2, 6, IN))
  y_float = np.asarray(nnx.jit(lambda m, v: m(v))(float_model, x), np.float64)
  y = np.asarray(nnx.jit(lambda m, v: m(v))(model, x), np.float64)
  assert y.dtype == np.float64 and y.shape == (2, 6, VOCAB)
  # Each residual branch chains NVFP4 GEMMs of ~0.095 relative error each (v -> o in attention,
  # gate/up -> down in the MLP and in the experts: ~0.13-0.16 per branch), and the random-init
  # branches dominate the residual stream, so the output inherits about a branch's error:
  # measured 0.174-0.188 over three seeds. Bound 0.3 (a broken layer is off by ~1); above 0.05
  # shows the model was really quantized. The next test pins the layers down tightly.
  err = rel_l2(y, y_float)
  assert 0.05 < err < 0.3, err


def test_dequantized_float_model_matches_tightly(float_model, quantized, rng):
  # The float model with every quantized weight replaced by its dequantized value: the only
  # difference left is bf16 activations inside the NVFP4 layers (measured 0.0041-0.0046).
  model, _ = quantized
  ref = nnx.clone(float_model)
  for i in (0, 1):
    blk, qblk = ref.layers[i], model.layers[i]
    for sub, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                       ("mlp", ("gate_proj", "up_proj", "down_proj"))):
      for name in names:
        w = nf.dequantize(getattr(getattr(qblk, sub), name).weight, jnp.float32)
        getattr(getattr(blk, sub), name).kernel.set_value(w.T)
    blk.moe.w13.set_value(nf.dequantize(qblk.moe.w13, jnp.float32))
    blk.moe.w2.set_value(nf.dequantize(qblk.moe.w2, jnp.float32))
    # The NVFP4 MoE's router is bf16: round the reference's the same way.
    blk.moe.gate.kernel.set_value(qblk.moe.router[...].astype(jnp.float32).T)
  x = jnp.asarray(randn(rng, 2, 6, IN))
  y_ref = np.asarray(nnx.jit(lambda m, v: m(v))(ref, x), np.float64)
  y = np.asarray(nnx.jit(lambda m, v: m(v))(model, x), np.float64)
  assert rel_l2(y, y_ref) < 1.5e-2


def test_include_exclude_and_inplace():
  model = Model(nnx.Rngs(1))
  q_before = model.layers[0].attn.q_proj
  out, report = quantize_model(model, include=("layers/0/*",), exclude=("*v_proj",),
                               inplace=True, prepare=False)
  assert out is model
  assert isinstance(model.layers[0].attn.q_proj, NVFP4Linear) and q_before is not \
      model.layers[0].attn.q_proj
  assert type(model.layers[0].attn.v_proj) is nnx.Linear
  assert type(model.layers[1].attn.q_proj) is nnx.Linear
  # No converter: the DenseMoE stays, but the walk goes inside it, and its router is quantized
  # since the default exclusions were replaced by ("*v_proj",).
  assert isinstance(model.layers[0].moe, DenseMoE)
  assert isinstance(model.layers[0].moe.gate, NVFP4Linear)
  by_path = {l.path: l for l in report.layers}
  assert by_path["layers/0/attn/v_proj"].reason == "matches exclude pattern '*v_proj'"
  assert by_path["layers/1/attn/q_proj"].reason == "matches no include pattern"


def test_shared_linear_converted_once():
  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(32, 32, rngs=rngs)
      self.b = self.a

  model, report = quantize_model(Tied(nnx.Rngs(0)), prepare=False)
  assert isinstance(model.a, NVFP4Linear) and model.a is model.b
  assert report.quantized == ("a",)


def test_root_linear_and_bad_arguments():
  q, report = quantize_model(nnx.Linear(32, 16, rngs=nnx.Rngs(0)), prepare=False)
  assert isinstance(q, NVFP4Linear) and report.quantized == ("",)
  model = Model(nnx.Rngs(2))
  with pytest.raises(TypeError, match="nnx.Module"):
    quantize_model({"w": 1})
  with pytest.raises(TypeError, match="include"):
    quantize_model(model, include=5)
  with pytest.raises(TypeError, match="exclude"):
    quantize_model(model, exclude=[1])
  with pytest.raises(TypeError, match="inplace"):
    quantize_model(model, inplace="yes")
  with pytest.raises(TypeError, match="converters"):
    quantize_model(model, converters={"DenseMoE": moe_to_nvfp4})
  with pytest.raises(ValueError, match="prepare"):
    quantize_model(model, prepare="sometimes")

  class Frozen(nnx.Module):
    def __init__(self, rngs):
      self.pair = nnx.data((nnx.Linear(32, 32, rngs=rngs), nnx.Linear(32, 32, rngs=rngs)))

  with pytest.raises(TypeError, match="immutable") as e:
    quantize_model(Frozen(nnx.Rngs(0)), prepare=False)
  # The hint names the container that works; a plain list is refused by nnx itself.
  assert "nnx.List" in str(e.value) and "a list" not in str(e.value), e.value


def test_abstract_model_is_refused_with_the_way_to_get_one():
  """An nnx.eval_shape'd model has no values to quantize: a clear TypeError names the Linear
  and the abstract evaluation that works, and that evaluation gives the quantized model's
  shapes."""
  abstract = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))
  with pytest.raises(TypeError, match=r"the Linear at '\w+_proj' has an abstract kernel .*"
                                      r"nnx\.eval_shape\(lambda: quantize_model\(Model\(\.\.\.\)\)"
                                      r"\[0\]\)"):
    quantize_model(abstract, prepare=False)
  with pytest.raises(TypeError, match="kernel is abstract"):
    NVFP4Linear.from_linear(abstract.up_proj, prepare=False)
  shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(m))
  suggested = nnx.eval_shape(lambda: quantize_model(MLP(nnx.Rngs(0)), prepare=False)[0])
  concrete = quantize_model(MLP(nnx.Rngs(0)), prepare=False)[0]
  assert isinstance(suggested.up_proj, NVFP4Linear)
  assert shapes(suggested) == shapes(concrete)

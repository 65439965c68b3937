"""nvfp4_moe_pair (a layer's two grouped GEMMs in one primitive) on the reference path (CPU),
and what its CUDA lowering emits (cross-lowered for cuda from here; the kernels run in
tests/test_moe_gpu.py).

The pair's contract is the two ``nvfp4_moe_gemm`` primitives in sequence, so results are
checked bit for bit against them, and the layer against the independent float64 NumPy layer.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.moe import capacity
from jax_nvfp4.ops import moe as moe_ops
from jax_nvfp4.ops import moe_pair
from tests import numpy_moe_reference as ref
from tests.test_moe import _distinct_topk, _layer

ACTIVATIONS = [("swiglu", None, True), ("swiglu", 5.0, True), ("gptoss", 7.0, True),
               ("relu2", None, False)]


def _weights(rng, m, h, i, e, gated, dtype=jnp.bfloat16):
  x, w13, w2 = _layer(rng, m, h, i, e, gated=gated, dtype=dtype)
  b13 = jnp.asarray(rng.standard_normal((e, w13.shape[1])) * 0.5, jnp.float32)
  b2 = jnp.asarray(rng.standard_normal((e, h)) * 0.1, jnp.float32)
  return x, w13, w2, b13, b2


def _layer_fn(activation, limit, biases):
  def f(x, w13, w2, tw, ti, b13, b2):
    return nf.fused_moe(x, w13, w2, topk_weights=tw, topk_ids=ti, activation=activation,
                        limit=limit, w13_bias=b13 if biases else None,
                        w2_bias=b2 if biases else None)
  return f


@pytest.mark.parametrize("activation, limit, gated", ACTIVATIONS)
@pytest.mark.parametrize("m, e, k", [(1, 8, 2), (37, 6, 2), (70, 16, 3)])
def test_fused_moe_through_the_pair_is_bitwise_the_two_gemms(rng, monkeypatch, activation,
                                                             limit, gated, m, e, k):
  h, i = 128, 96
  x, w13, w2, b13, b2 = _weights(rng, m, h, i, e, gated)
  tw, ti = _distinct_topk(rng, m, e, k)
  p13, p2 = nf.prepare(w13, gate_up_pairs=gated), nf.prepare(w2)
  args = (x, p13, p2, tw, ti, b13, b2)
  results, jaxprs = {}, {}
  for on in ("0", "1"):
    monkeypatch.setenv(moe_pair.ENV, on)
    f = _layer_fn(activation, limit, biases=m != 1)  # new function: no trace cache hit
    jaxprs[on] = str(jax.make_jaxpr(f)(*args))
    results[on] = np.asarray(jax.jit(f)(*args))
  assert "nvfp4_moe_pair" in jaxprs["1"] and "nvfp4_moe_gemm" not in jaxprs["1"]
  assert "nvfp4_moe_pair" not in jaxprs["0"] and jaxprs["0"].count("nvfp4_moe_gemm") == 2
  np.testing.assert_array_equal(results["1"], results["0"])
  # The layer itself, against float64 NumPy rounding where the implementation rounds.
  kw = dict(activation_kind=activation, limit=limit, gemm1_rounded=False)
  if m != 1:
    kw.update(b13=np.asarray(b13, np.float64), b2=np.asarray(b2, np.float64))
  bf16 = ml_dtypes.bfloat16
  want = ref.moe(np.asarray(x, np.float64), ref.dequantize_experts(w13),
                 ref.dequantize_experts(w2), tw, ti, round_dtype=bf16, **kw).astype(bf16)
  assert np.isfinite(results["1"].astype(np.float32)).all()
  assert ref.rel_l2(results["1"], want) <= 1.5e-3


def test_layers_that_cannot_fuse_keep_two_gemms(rng, monkeypatch):
  """A plain [gate; up] w13 (activation in XLA after GEMM 1) and checkpoint-layout weights on
  the reference path do not take the pair."""
  monkeypatch.setenv(moe_pair.ENV, "1")
  x, w13, w2, _, _ = _weights(rng, 9, 64, 32, 4, gated=True)
  tw, ti = _distinct_topk(rng, 9, 4, 2)
  plain = str(jax.make_jaxpr(lambda a: nf.fused_moe(a, nf.prepare(w13), nf.prepare(w2),
                                                    topk_weights=tw, topk_ids=ti))(x))
  assert "nvfp4_moe_pair" not in plain and plain.count("nvfp4_moe_gemm") == 2
  ckpt = str(jax.make_jaxpr(lambda a: nf.fused_moe(a, w13, w2, topk_weights=tw, topk_ids=ti,
                                                   backend="reference"))(x))
  assert "nvfp4_moe_pair" not in ckpt


def _two_gemms(x, p13, p2, al, *, k, tw, activation, limit, b13, b2, zero_unwritten):
  rows = x.shape[0] * k
  mid = nf.nvfp4_moe_gemm(x, p13, al, gather_div=k, num_rows_out=rows, bias=b13,
                          zero_unwritten=False, activation=activation, limit=limit)
  return nf.nvfp4_moe_gemm(mid, p2, al, gather_div=1, num_rows_out=rows, topk_weights=tw,
                           bias=b2, zero_unwritten=zero_unwritten)


@pytest.mark.parametrize("block_m", [8, 16, 64])
def test_primitive_rows_and_unwritten_rows(rng, block_m):
  """Dropped pairs (ids out of range, an expert map's -1 experts) are zero rows with
  zero_unwritten=True; every other row is the two GEMMs' row, bit for bit."""
  m, h, i, e, k = 23, 64, 48, 5, 2
  x, w13, w2, b13, b2 = _weights(rng, m, h, i, e, gated=True, dtype=jnp.float16)
  # Six global experts, five local (global 2 is held elsewhere); id 6 is out of range.
  tw, ti = _distinct_topk(rng, m, 7, k)
  emap = jnp.asarray([0, 1, -1, 2, 3, 4], jnp.int32)
  p13, p2 = nf.prepare(w13, gate_up_pairs=True), nf.prepare(w2)
  al = nf.align_tokens(jnp.asarray(ti), 6, block_m, emap)
  tw_flat = jnp.asarray(tw.reshape(-1), jnp.float32)
  got = jax.jit(lambda a: moe_pair.nvfp4_moe_pair(
      a, p13, p2, al, top_k=k, topk_weights=tw_flat, activation="swiglu", w13_bias=b13,
      w2_bias=b2))(x)
  want = jax.jit(lambda a: _two_gemms(a, p13, p2, al, k=k, tw=tw_flat, activation="swiglu",
                                      limit=None, b13=b13, b2=b2, zero_unwritten=True))(x)
  assert got.shape == (m * k, h) and got.dtype == jnp.float16
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  ids = np.asarray(ti).reshape(-1)
  dropped = (ids >= 6) | (ids == 2)
  assert dropped.any() and (~dropped).any()
  assert not np.asarray(got)[dropped].any()
  assert np.abs(np.asarray(got, np.float32)[~dropped]).sum(axis=1).min() > 0


def test_vmap_over_tokens_equals_a_loop(rng):
  m, h, i, e, k = 5, 64, 32, 4, 2
  x, w13, w2, _, _ = _weights(rng, m, h, i, e, gated=False)
  p13, p2 = nf.prepare(w13), nf.prepare(w2)
  tw, ti = _distinct_topk(rng, m, e, k)
  al = nf.align_tokens(jnp.asarray(ti), e, 8)
  tw_flat = jnp.asarray(tw.reshape(-1), jnp.float32)
  f = lambda a: moe_pair.nvfp4_moe_pair(a, p13, p2, al, top_k=k, topk_weights=tw_flat,
                                        activation="relu2")
  xs = jnp.stack([x, -x, 2 * x])
  got = jax.vmap(f)(xs)
  for j in range(3):
    np.testing.assert_array_equal(np.asarray(got[j]), np.asarray(f(xs[j])))
  with pytest.raises(NotImplementedError, match="vmap over the expert weights"):
    jax.vmap(lambda gs: moe_pair.nvfp4_moe_pair(
        x, dataclasses.replace(p13, global_scale=gs), p2, al, top_k=k, topk_weights=tw_flat,
        activation="relu2"))(jnp.stack([p13.global_scale] * 2))


def test_bad_input_is_refused_at_trace_time(rng):
  m, h, i, e, k = 4, 64, 32, 4, 2
  x, w13, w2, _, _ = _weights(rng, m, h, i, e, gated=True)
  tw, ti = _distinct_topk(rng, m, e, k)
  al = nf.align_tokens(jnp.asarray(ti), e, 8)
  tw_flat = jnp.asarray(tw.reshape(-1), jnp.float32)
  pairs, plain, p2 = nf.prepare(w13, gate_up_pairs=True), nf.prepare(w13), nf.prepare(w2)
  call = lambda w13_, w2_, **kw: moe_pair.nvfp4_moe_pair(
      x, w13_, w2_, al, top_k=k, topk_weights=tw_flat, **{"activation": "swiglu", **kw})
  with pytest.raises(TypeError, match="w13 must be a stacked PreparedNVFP4Weight"):
    call(w13, p2)
  with pytest.raises(ValueError, match="gate_up_pairs=True"):
    call(plain, p2)
  with pytest.raises(ValueError, match="gate_up_pairs=False"):
    call(pairs, p2, activation="relu2")
  with pytest.raises(ValueError, match="GEMM 1's fused activation"):
    call(plain, p2, activation="none")
  with pytest.raises(ValueError, match="needs limit"):
    call(pairs, p2, activation="gptoss")
  fewer = nf.prepare(jax.tree.map(lambda a: a[:3], w2))
  with pytest.raises(ValueError, match="same experts"):
    call(pairs, fewer)
  wide = nf.prepare(_weights(rng, m, h, 2 * i, e, gated=True)[2])  # [E, H, 2I]
  with pytest.raises(ValueError, match="GEMM 1's output columns"):
    call(pairs, wide)
  with pytest.raises(ValueError, match="backend must be"):
    call(pairs, p2, backend="kernel")


def _abstract_prepared(e, n, k, gate_up_pairs=False):
  """A stacked PreparedNVFP4Weight of shapes only: lowering needs no data (Mixtral-sized
  weights would take minutes to quantize and prepare on a CPU)."""
  from jax_nvfp4.prepare import kernel_shapes
  (w_shape, s_shape) = kernel_shapes(n, k)
  return nf.PreparedNVFP4Weight(jax.ShapeDtypeStruct((e, *w_shape), jnp.uint32),
                                jax.ShapeDtypeStruct((e, *s_shape), jnp.uint8),
                                jax.ShapeDtypeStruct((e,), jnp.float32), n=n, k=k,
                                gate_up_pairs=gate_up_pairs)


def _attributes(line: str) -> dict[str, str]:
  config = re.search(r"mhlo.backend_config = \{([^}]*)\}", line).group(1)
  return {kv.split(" = ")[0]: kv.split(" = ")[1].split(" :")[0] for kv in config.split(", ")}


@pytest.mark.parametrize("m, k_sliced, dtype", [(1, True, jnp.bfloat16), (1, False, jnp.float16),
                                                (2, False, jnp.bfloat16)])
def test_cuda_lowering_gives_each_gemm_its_own_launch(monkeypatch, m, k_sliced, dtype):
  """Cross-lowered for cuda (an H100's SM count and occupancy patched in): one custom call to
  the pair's handler, no grouped-GEMM call, and each GEMM's launch attributes and workspace as
  ``moe_launch_spec`` picks them for that GEMM alone. The Mixtral-like layer's two GEMMs get
  different launches here (N tiles per block at one token; without k-slices, split K through
  tickets against none, and a cluster against none at two tokens), so a mix-up shows."""
  registered = nf._ffi.REGISTERED | {moe_ops.CUDA_TARGET, moe_pair.CUDA_TARGET}
  monkeypatch.setattr(nf._ffi, "REGISTERED", registered)
  monkeypatch.setattr(moe_ops._ffi, "sm_count", lambda: 132)
  monkeypatch.setattr(moe_ops._ffi, "moe_blocks_per_sm", lambda *a, **kw: 2)
  monkeypatch.setattr(moe_ops._ffi, "blocks_per_sm", lambda *a, **kw: 2)
  monkeypatch.setattr(moe_ops._ffi, "cluster_limit", lambda *a, **kw: 8)
  if not k_sliced:
    monkeypatch.setattr(moe_ops, "choose_moe_k_slices", lambda *a, **kw: 1)
  monkeypatch.setenv(moe_pair.ENV, "1")
  e, h, i, k = 8, 4096, 14336, 2
  w13, w2 = _abstract_prepared(e, 2 * i, h, gate_up_pairs=True), _abstract_prepared(e, h, i)
  x = jax.ShapeDtypeStruct((m, h), dtype)
  tw, ti = jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((m, k), jnp.int32)
  lower = lambda backend: jax.jit(lambda *a: nf.fused_moe(
      a[0], a[1], a[2], topk_weights=a[3], topk_ids=a[4], backend=backend)).trace(
          x, w13, w2, tw, ti).lower(lowering_platforms=("cuda",)).as_text()
  text = lower("auto")
  assert text.count(moe_pair.CUDA_TARGET) == 1 and moe_ops.CUDA_TARGET not in text
  line = next(ln for ln in text.splitlines() if moe_pair.CUDA_TARGET in ln)
  got = _attributes(line)
  block_m = nf.choose_block_m(m, k, e)
  num_slots = capacity(m * k, e, block_m)
  specs = [moe_ops.moe_launch_spec(num_slots, n, kk, block_m, m, dtype == jnp.bfloat16)
           for n, kk in ((2 * i, h), (h, i))]
  assert specs[0] != specs[1]  # the case tells the GEMMs apart
  workspaces = []
  for g, (ks, splits, cluster, tiles) in zip((1, 2), specs):
    assert got[f"k_slices{g}"] == str(ks) and got[f"splits{g}"] == str(splits)
    assert got[f"tiles_per_block{g}"] == str(tiles)
    assert got[f"cluster{g}"] == ("true" if cluster else "false")
    n = 2 * i if g == 1 else h
    workspaces.append(moe_ops.moe_workspace_bytes(num_slots, n, block_m, splits, cluster))
  assert got["block_m"] == str(block_m) and got["activation"] == "1"
  assert got["num_rows_out"] == str(m * k) and got["top_k"] == str(k)
  assert got["n1"] == str(2 * i) and got["k1"] == str(h) and got["n2"] == str(h)
  x_type = "bf16" if dtype == jnp.bfloat16 else "f16"
  results = line.split("->")[-1]
  assert (f"tensor<{m * k}x{h}x{x_type}>, tensor<{m * k}x{i}x{x_type}>, "
          f"tensor<{workspaces[0]}xui8>, tensor<{workspaces[1]}xui8>") in results
  # backend="reference" never reaches a kernel.
  text = lower("reference")
  assert moe_pair.CUDA_TARGET not in text and moe_ops.CUDA_TARGET not in text


def test_pair_is_off_by_default(monkeypatch):
  monkeypatch.delenv(moe_pair.ENV, raising=False)
  assert not moe_pair.pair_enabled()
  monkeypatch.setenv(moe_pair.ENV, "1")
  assert moe_pair.pair_enabled()

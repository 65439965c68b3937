"""Token alignment: every documented invariant, checked against an independent NumPy layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.moe import capacity
from jax_nvfp4.ops import moe_align
from tests import numpy_moe_reference as ref


def _check(topk_ids, e, block_m, expert_map=None):
  al = jax.jit(nf.align_tokens, static_argnums=(1, 2))(jnp.asarray(topk_ids), e, block_m,
                                                       expert_map)
  assert al.sorted_ids.dtype == al.block_expert.dtype == al.num_padded.dtype == jnp.int32
  assert al.num_padded.shape == (1,) and al.block_m == block_m
  ref.check_alignment(al.sorted_ids, al.block_expert, al.num_padded, topk_ids, e, block_m,
                      expert_map)
  return al


def _distinct_topk(rng, m, e, k):
  return np.stack([rng.choice(e, k, replace=False) for _ in range(m)]).astype(np.int32)


@pytest.mark.parametrize("block_m", [8, 16, 32, 64])
@pytest.mark.parametrize("m, e, k", [(1, 8, 2), (1, 256, 8), (13, 5, 2), (123, 12, 3),
                                     (666, 64, 4)])
def test_invariants_random(rng, m, e, k, block_m):
  _check(_distinct_topk(rng, m, e, k), e, block_m)


def test_empty_experts_and_all_on_one_expert(rng):
  ids = np.full((37, 1), 3, np.int32)                # every token on expert 3
  al = _check(ids, 8, 16)
  assert int(al.num_padded[0]) == 48
  np.testing.assert_array_equal(np.asarray(al.block_expert)[:3], [3, 3, 3])
  np.testing.assert_array_equal(np.asarray(al.sorted_ids)[:37], np.arange(37))
  ids = np.stack([np.full(20, 1), np.full(20, 6)], 1).astype(np.int32)  # experts 1 and 6 only
  al = _check(ids, 8, 8)
  np.testing.assert_array_equal(np.asarray(al.block_expert)[:6], [1, 1, 1, 6, 6, 6])


def test_hand_computed_layout():
  ids = np.array([[2, 0], [0, 1], [2, 1]], np.int32)  # pairs: 0->2 1->0 2->0 3->1 4->2 5->1
  al = nf.align_tokens(ids, 3, 8)
  s = 6  # sentinel = M * top_k
  want = [1, 2] + [s] * 6 + [3, 5] + [s] * 6 + [0, 4] + [s] * 6
  assert al.sorted_ids.shape == (capacity(6, 3, 8),) == (32,)
  np.testing.assert_array_equal(np.asarray(al.sorted_ids)[:24], want)
  np.testing.assert_array_equal(np.asarray(al.sorted_ids)[24:], [s] * 8)
  np.testing.assert_array_equal(np.asarray(al.block_expert), [0, 1, 2, -1])
  assert int(al.num_padded[0]) == 24


def test_expert_map_marks_non_local_blocks(rng):
  e = 12
  ids = _distinct_topk(rng, 50, e, 3)
  expert_map = np.full(e, -1, np.int32)
  expert_map[[1, 4, 5, 11]] = [0, 1, 2, 3]
  al = _check(ids, e, 16, expert_map)
  be = np.asarray(al.block_expert)
  assert (be == -1).any() and set(be[be >= 0]) <= {0, 1, 2, 3}


def test_out_of_range_ids_are_dropped():
  ids = np.array([[0, -1], [7, 1], [1, 0]], np.int32)  # -1 and 7 (E = 4) never appear
  al = _check(ids, 4, 8)
  used = np.asarray(al.sorted_ids)[:int(al.num_padded[0])]
  assert 1 not in used and 2 not in used and sorted(used[used < 6]) == [0, 3, 4, 5]


def test_capacity_and_block_m_choice():
  assert capacity(8, 256, 8) == 64             # decode: 8 pairs, at most 8 non-empty experts
  assert capacity(32768, 256, 64) == 32768 + 256 * 64 - 256  # 256 * 63 rounded to 64
  assert capacity(0, 8, 16) == 0
  assert [nf.choose_block_m(t, 8, 128) for t in (1, 16, 64, 256, 1024, 4096)] == \
      [8, 8, 8, 16, 64, 64]
  assert nf.choose_block_m(1, 2, 8) == 8 and nf.choose_block_m(4096, 2, 8) == 64
  assert nf.choose_block_m(40, 3, 12) == 16


def test_static_shapes_under_eval_shape():
  out = jax.eval_shape(lambda i: nf.align_tokens(i, 64, 32),
                       jax.ShapeDtypeStruct((100, 6), jnp.int32))
  p = capacity(600, 64, 32)
  assert out.sorted_ids.shape == (p,) and out.block_expert.shape == (p // 32,)
  assert p <= -(-(600 + 64 * 31) // 32) * 32


def test_m_zero():
  al = nf.align_tokens(jnp.zeros((0, 2), jnp.int32), 4, 8)
  assert al.sorted_ids.shape == (0,) and int(al.num_padded[0]) == 0


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="block_m"):
    nf.align_tokens(jnp.zeros((2, 2), jnp.int32), 4, 12)
  with pytest.raises(ValueError, match=r"\[M, top_k\]"):
    nf.align_tokens(jnp.zeros((4,), jnp.int32), 4, 8)
  with pytest.raises(TypeError, match="integer"):
    nf.align_tokens(jnp.zeros((2, 2), jnp.float32), 4, 8)
  with pytest.raises(ValueError, match="expert_map"):
    nf.align_tokens(jnp.zeros((2, 2), jnp.int32), 4, 8, expert_map=jnp.zeros(3, jnp.int32))


# ----------------------------------------------------------------------------- the primitive

def test_vmap_aligns_each_element(rng):
  ids = np.stack([_distinct_topk(rng, 9, 16, 2) for _ in range(3)])       # [3, 9, 2]
  emap = np.where(np.arange(16) % 3 == 0, -1, np.arange(16) // 2).astype(np.int32)
  f = lambda i: nf.align_tokens(i, 16, 8, emap)
  batched = jax.vmap(f)(jnp.asarray(ids))
  for b in range(3):
    one = f(jnp.asarray(ids[b]))
    for got, want in ((batched.sorted_ids[b], one.sorted_ids),
                      (batched.block_expert[b], one.block_expert),
                      (batched.num_padded[b], one.num_padded)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ref.check_alignment(batched.sorted_ids[b], batched.block_expert[b], batched.num_padded[b],
                        ids[b], 16, 8, emap)


def test_backend_errors():
  ids = jnp.zeros((2, 2), jnp.int32)
  with pytest.raises(ValueError, match="backend must be"):
    nf.align_tokens(ids, 4, 8, backend="kernel")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="cannot lower"):
      jax.jit(lambda i: nf.align_tokens(i, 4, 8, backend="cuda").sorted_ids)(ids)
  with pytest.raises(TypeError, match="topk_ids must be int32"):
    moe_align.moe_align_p.bind(ids.astype(jnp.int16), jnp.zeros((0,), jnp.int32),
                               num_experts=4, block_m=8, backend="auto")


def _export_for_cuda(e, monkeypatch, backend="auto", m=5):
  monkeypatch.setattr(nf._ffi, "REGISTERED", nf._ffi.REGISTERED | {moe_align.CUDA_TARGET})
  f = jax.jit(lambda i, mp: nf.align_tokens(i, e, 16, mp, backend=backend).sorted_ids)
  exp = jax.export.export(f, platforms=["cuda"], disabled_checks=[
      jax.export.DisabledSafetyCheck.custom_call(moe_align.CUDA_TARGET)])(
          jax.ShapeDtypeStruct((m, 4), jnp.int32), jax.ShapeDtypeStruct((e,), jnp.int32))
  return [l for l in exp.mlir_module().split("\n")
          if f"custom_call @{moe_align.CUDA_TARGET}" in l]


def test_cuda_lowering_emits_one_ffi_call(monkeypatch):
  """Lowered for cuda (no GPU needed): one call, operands and results as the handler binds
  them (the last result the kernel's scratch: one int32 for a single block, [blocks * E] above
  1024 pairs); more experts than the kernel's shared memory holds go to the reference."""
  for m, scratch in ((5, 1), (256, 1), (257, 2 * 64), (5000, 20 * 64), (40000, 64 * 64)):
    calls = _export_for_cuda(64, monkeypatch, m=m)
    p = capacity(4 * m, 64, 16)
    assert len(calls) == 1
    assert "num_experts = 64 : i64" in calls[0] and "block_m = 16 : i64" in calls[0]
    assert (f"(tensor<{m}x4xi32>, tensor<64xi32>) -> (tensor<{p}xi32>, tensor<{p // 16}xi32>, "
            f"tensor<1xi32>, tensor<{scratch}xi32>)") in calls[0]
  assert _export_for_cuda(moe_align.ALIGN_MAX_EXPERTS + 1, monkeypatch) == []
  with pytest.raises(ValueError, match="at most"):
    _export_for_cuda(moe_align.ALIGN_MAX_EXPERTS + 1, monkeypatch, backend="cuda")

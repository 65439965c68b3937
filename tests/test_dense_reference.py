"""nvfp4_matmul through the reference lowering (any platform) against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.ops import dense
from tests import numpy_reference as npref


def _random_weight(rng, n, k, lead=()):
  """A weight from random codes (all 16, incl. +-0 and +-6) and random positive block scales."""
  packed = rng.integers(0, 256, size=(*lead, n, k // 2), dtype=np.uint8)
  scales = rng.uniform(2.0**-6, 8.0, size=(*lead, n, k // 16)).astype(jnp.float8_e4m3fn)
  gs = rng.uniform(0.5, 2.0, size=lead).astype(np.float32)
  return nf.NVFP4Weight(jnp.asarray(packed), jnp.asarray(scales), jnp.asarray(gs))


def _rel_l2(a, b):
  a = np.asarray(a, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("k", [16, 48, 1664])
@pytest.mark.parametrize("n", [1, 100, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_float64_numpy(rng, m, k, n, dtype):
  w = _random_weight(rng, n, k)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  bias = rng.standard_normal(n).astype(np.float32)
  out = jax.jit(nf.nvfp4_matmul)(x, w, bias)
  assert out.shape == (m, n) and out.dtype == dtype
  ref = np.asarray(x, np.float64) @ npref.dequantize(w.packed, w.scales, w.global_scale).T + bias
  # Only the output cast rounds: bf16 has 8 significant bits, fp16 11.
  assert _rel_l2(out, ref) < (4e-3 if dtype == jnp.bfloat16 else 6e-4)


def test_leading_dims_fold_into_m(rng):
  w = _random_weight(rng, 40, 32)
  x = jnp.asarray(rng.standard_normal((2, 3, 5, 32)), jnp.bfloat16)
  out = nf.nvfp4_matmul(x, w)
  assert out.shape == (2, 3, 5, 40)
  np.testing.assert_array_equal(np.asarray(out).reshape(30, 40),
                                np.asarray(nf.nvfp4_matmul(x.reshape(30, 32), w)))


def test_m_zero_gives_empty(rng):
  w = _random_weight(rng, 24, 32)
  out = jax.jit(nf.nvfp4_matmul)(jnp.zeros((0, 32), jnp.bfloat16), w)
  assert out.shape == (0, 24) and out.dtype == jnp.bfloat16


def test_vmap_over_x_and_over_weights(rng):
  w = _random_weight(rng, 24, 32, lead=(3,))
  x = jnp.asarray(rng.standard_normal((3, 4, 32)), jnp.bfloat16)
  by_vmap = jax.vmap(nf.nvfp4_matmul)(x, w)
  for e in range(3):
    we = jax.tree.map(lambda a: a[e], w)
    np.testing.assert_array_equal(np.asarray(by_vmap[e]), np.asarray(nf.nvfp4_matmul(x[e], we)))
  w0 = jax.tree.map(lambda a: a[0], w)
  by_x = jax.vmap(nf.nvfp4_matmul, in_axes=(1, None))(x, w0)
  np.testing.assert_array_equal(np.asarray(by_x), np.asarray(nf.nvfp4_matmul(x, w0)).swapaxes(0, 1))
  # The kernel-layout primitive batches the same way (one prepared weight per batch entry).
  p = nf.prepare(w)
  by_vmap_p = jax.vmap(nf.nvfp4_matmul)(x, p)
  for e in range(3):
    pe = jax.tree.map(lambda a: a[e], p)
    np.testing.assert_array_equal(np.asarray(by_vmap_p[e]), np.asarray(nf.nvfp4_matmul(x[e], pe)))
  by_x_p = jax.vmap(nf.nvfp4_matmul, in_axes=(1, None))(x, nf.prepare(w0))
  np.testing.assert_array_equal(np.asarray(by_x_p), np.asarray(by_x))


def test_eval_shape(rng):
  w = _random_weight(rng, 24, 32)
  out = jax.eval_shape(nf.nvfp4_matmul, jax.ShapeDtypeStruct((9, 32), jnp.float16), w)
  assert out.shape == (9, 24) and out.dtype == jnp.float16


def test_bad_inputs_raise_clear_errors(rng):
  w = _random_weight(rng, 24, 32)
  with pytest.raises(TypeError, match="bfloat16 or float16"):
    nf.nvfp4_matmul(jnp.zeros((2, 32), jnp.float32), w)
  with pytest.raises(ValueError, match="K = 32"):
    nf.nvfp4_matmul(jnp.zeros((2, 48), jnp.bfloat16), w)
  with pytest.raises(ValueError, match=r"bias must have shape \(24,\)"):
    nf.nvfp4_matmul(jnp.zeros((2, 32), jnp.bfloat16), w, jnp.zeros(23))
  with pytest.raises(TypeError, match="NVFP4Weight"):
    nf.nvfp4_matmul(jnp.zeros((2, 32), jnp.bfloat16), jnp.zeros((24, 32)))
  bad_scales = nf.NVFP4Weight(w.packed, w.scales.astype(jnp.float32), w.global_scale)
  with pytest.raises(TypeError, match="float8_e4m3fn"):
    jax.jit(nf.nvfp4_matmul)(jnp.zeros((2, 32), jnp.bfloat16), bad_scales)
  stacked = _random_weight(rng, 24, 32, lead=(2,))
  with pytest.raises(ValueError, match="single"):
    nf.nvfp4_matmul(jnp.zeros((2, 32), jnp.bfloat16), stacked)


def test_bad_prepared_weights_raise_clear_errors(rng):
  x = jnp.zeros((2, 32), jnp.bfloat16)
  w = _random_weight(rng, 32, 32)
  # An MoE w13 row order would permute the output columns silently.
  with pytest.raises(ValueError, match="gate_up_pairs=True"):
    nf.nvfp4_matmul(x, nf.prepare(w, gate_up_pairs=True))
  with pytest.raises(ValueError, match="no leading dims"):
    nf.nvfp4_matmul(x, nf.prepare(_random_weight(rng, 32, 32, lead=(2,))))
  p = nf.prepare(_random_weight(rng, 32, 64))
  with pytest.raises(ValueError, match="K a multiple of 16"):
    nf.nvfp4_matmul(jnp.zeros((2, 40), jnp.bfloat16),
                    nf.PreparedNVFP4Weight(p.qweight, p.qscales, p.global_scale, n=32, k=40))


def test_vmap_keeps_the_prefill_dispatch(rng, monkeypatch):
  """A batch of decode-sized calls can be prefill-sized: vmap over x takes the dequantize +
  XLA GEMM path above KERNEL_MAX_M rows in all, as one call of that size does."""
  monkeypatch.setattr(dense, "_kernel_wanted", lambda: True)  # as on a GPU with the kernels
  p = nf.prepare(_random_weight(rng, 48, 64))
  rows = dense.KERNEL_MAX_M // 4 + 1
  x = jnp.asarray(rng.standard_normal((4, rows, 64)), jnp.bfloat16)
  prims = lambda f: {str(e.primitive) for e in jax.make_jaxpr(f)(x).eqns}
  batched = jax.vmap(lambda a: nf.nvfp4_matmul(a, p))
  assert "nvfp4_dequantize" in prims(batched) and "nvfp4_gemm" not in prims(batched)
  small = jax.vmap(lambda a: nf.nvfp4_matmul(a, p))
  assert "nvfp4_gemm" in prims(lambda a: small(a[:, :dense.KERNEL_MAX_M // 4]))
  np.testing.assert_array_equal(np.asarray(batched(x)), np.asarray(nf.nvfp4_matmul(x, p)))


# ----------------------------------------------------------------------------- launch choice

@pytest.mark.parametrize("m, n, k, kslice_blocks, cluster_limit, want", [
    (1, 4096, 14336, 2, 16, 4),    # would be 8 ticket splits (a memset per call); 128 pairs
    (1, 14336, 4096, 2, 16, 4),    # would be a 2-block cluster; 4 tiles or 2 pairs per block
    (1, 28672, 8192, 2, 16, 8),    # would be unsplit, 224 blocks: a ragged second wave;
                                   # 7 tiles, or 4 pairs (8 tiles) per block
    (8, 4096, 4096, 2, 16, 4),     # still m_tile 1
    (1, 4096, 4096, 1, 16, 4),     # one k-sliced block per SM (an A100's shared memory)
    (1, 4096, 4096, 0, 16, 1),     # a k-sliced block does not fit an SM (an L4's)
    (1, 256, 4096, 2, 16, 1),      # 16 N tiles: too few blocks without the cross-block split
    (1, 4096, 1024, 2, 16, 1),     # K shorter than one k-sliced unit (2048 at m_tile 1)
    (16, 4096, 14336, 2, 16, 8),   # m_tile 2: instead of 8 ticket splits
    (9, 4096, 1024, 2, 16, 8),     # a unit is 1024 at m_tile 2; K's 2 unsliced units would
                                   # cap the splits at a 2-block cluster of 64 blocks
    (16, 4096, 512, 2, 16, 1),
    (16, 14336, 4096, 2, 16, 1),   # m_tile 2: a 2-block cluster stays
    (16, 14336, 4096, 2, 0, 8),    # ... unless the splits would reduce through tickets
    (16, 28672, 8192, 2, 16, 1),   # m_tile 2 unsplit stays
    (17, 4096, 14336, 2, 16, 1),   # m_tile 4: never
])
def test_k_slices_at_decode(monkeypatch, m, n, k, kslice_blocks, cluster_limit, want):
  from jax_nvfp4.ops import dense
  monkeypatch.setattr(dense, "_sm_count", lambda: 132)
  monkeypatch.setattr(dense, "_blocks_per_sm", lambda m_tile: 4)
  monkeypatch.setattr(dense, "_cluster_limit", lambda m_tile: cluster_limit)
  monkeypatch.setattr(dense, "k_sliced_blocks_per_sm",
                      lambda moe=False, m_tile=1, rows=0, k_slices=8: kslice_blocks)
  assert dense.choose_k_slices(m, n, k) == want
  if want > 1 and m > 8:  # what it replaces at m_tile 2: a wave that needs ticket splits
    splits = dense._wave_splits(m, n)
    assert splits > 1 and not dense.use_cluster(splits, 2)


@pytest.mark.parametrize("n, blocks_per_sm, want", [
    (14336, 2, 4),   # 896 N tiles: 224 blocks <= 264 resident
    (28672, 2, 7),   # 1792: 256 blocks
    (4096, 2, 1),    # 256 blocks
    (14336, 1, 7),   # one block per SM: 128 blocks
    (4200, 2, 1),    # 263 N tiles
    (4240, 2, 2),    # 265 N tiles: 133 blocks, the last one short
])
def test_k_sliced_tiles_per_block_make_one_wave(monkeypatch, n, blocks_per_sm, want):
  from jax_nvfp4.ops import dense
  monkeypatch.setattr(dense, "_sm_count", lambda: 132)
  monkeypatch.setattr(dense, "k_sliced_blocks_per_sm",
                      lambda moe=False, m_tile=1, rows=0, k_slices=8: blocks_per_sm)
  tpb = dense.choose_tiles_per_block(n, dense.DECODE_K_SLICES)
  assert tpb == want
  blocks = -(-(-(-n // 16)) // tpb)
  assert blocks <= 132 * blocks_per_sm and (tpb == 1 or -(-n // 16) > 132 * blocks_per_sm)
  assert dense.choose_tiles_per_block(n, 1) == 1


@pytest.mark.parametrize("n, want_pairs_per_block, want", [
    (14336, 2, 4),   # 448 pairs: 224 blocks; 8 slices: 4 tiles per block as well
    (28672, 4, 8),   # 896 pairs: 4 per block (8 tiles) against 8 slices' 7 tiles
    (57344, 7, 4),   # 1792 pairs: 7 per block, as 8 slices' 14 tiles
    (4096, 1, 4),    # 128 pairs (one block per two SMs) against 256 one-tile blocks
    (2048, 1, 8),    # 64 pairs: fewer blocks than half the SMs
    (4112, 1, 4),    # 257 N tiles: 129 pairs, the last one a single tile
])
def test_four_slices_where_they_keep_the_tiles_per_block(monkeypatch, n, want_pairs_per_block,
                                                         want):
  """4 slices of 2 N tiles (the tile of tiles_per_block is then a pair) where a block gets no
  more N tiles than with 8 slices, or where every 8-slice block has one tile and the pairs
  still give at least one block per two SMs. 132 SMs, 2 blocks each (hand-computed)."""
  from jax_nvfp4.ops import dense
  monkeypatch.setattr(dense, "_sm_count", lambda: 132)
  monkeypatch.setattr(dense, "k_sliced_blocks_per_sm",
                      lambda moe=False, m_tile=1, rows=0, k_slices=8: 2)
  assert dense.choose_tiles_per_block(n, dense.PAIR_K_SLICES) == want_pairs_per_block
  assert dense.choose_slice_count(n) == want
  assert dense.choose_k_slices(1, n, 4096) == (want if -(-n // 16) >= 132 else 1)
  # Without room for a 4-slice block (its own occupancy query), 8 slices.
  monkeypatch.setattr(dense, "k_sliced_blocks_per_sm",
                      lambda moe=False, m_tile=1, rows=0, k_slices=8: 0 if k_slices == 4 else 2)
  assert dense.choose_slice_count(n) == dense.DECODE_K_SLICES


@pytest.mark.parametrize("m_tile, k_slices, rows, k, moe, want", [
    (1, 8, 0, 0, False, 8 * 4 * 64),       # 8 slices of 4 k64 chunks
    (1, 8, 1, 0, False, 8 * 4 * 64),       # K unknown: the 4-chunk slices
    (1, 8, 1, 8192, False, 8 * 8 * 64),    # 1 row, K two long units: long slices
    (1, 8, 2, 4096, False, 8 * 8 * 64),
    (1, 8, 2, 14336, False, 8 * 4 * 64),   # 3.5 long units: 4-chunk slices
    (1, 8, 1, 8176, False, 8 * 8 * 64),    # 128 k64 chunks (the last one short): long
    (1, 8, 4, 8192, False, 8 * 4 * 64),    # the 4-row tile: 4-chunk slices
    (1, 8, 0, 8192, False, 8 * 4 * 64),    # the 8-row tile
    (1, 8, 1, 8192, True, 8 * 4 * 64),     # the grouped GEMM: 4-chunk slices
    (2, 8, 0, 0, False, 8 * 2 * 64),       # m_tile 2: slices of 2 chunks
    (1, 4, 0, 0, False, 4 * 4 * 64),       # the 8-row tile's pairs: 4 chunks
    (1, 4, 5, 0, False, 4 * 4 * 64),       # 5 rows run the 8-row tile
    (1, 4, 1, 0, False, 4 * 8 * 64),       # the 1-, 2- and 4-row tiles' pairs: 8 chunks
    (1, 4, 2, 0, True, 4 * 8 * 64),
    (1, 4, 3, 2048, False, 4 * 8 * 64),    # 3 rows run the 4-row tile
    (1, 4, 4, 0, False, 4 * 8 * 64),
])
def test_k_sliced_unit_k_mirrors_the_kernels_slices(m_tile, k_slices, rows, k, moe, want):
  """csrc/nvfp4_tile.cuh kChunksPerSlice and nvfp4_kernel.cuh long_slices, hand-counted."""
  from jax_nvfp4.ops import dense
  assert dense.k_sliced_unit_k(m_tile, k_slices, rows, k, moe) == want


@pytest.mark.parametrize("m, want", [(1, (4, 2)), (2, (4, 4)), (8, (4, 4))])
def test_k_sliced_wave_counts_the_launched_tiles_occupancy(rng, monkeypatch, m, want):
  """The wave that sizes tiles_per_block is that of the block the launch runs: at M = 1 the
  1-row tile (here 4 resident per SM), at M = 2 the 2-row one, at M = 8 the 8-row one (2).
  64 N tiles: 8 slices would take 64 / 16 = 4 tiles per block at M = 1, 4 slices 32 / 16 = 2
  pairs (4 tiles as well): 4 slices, 2 pairs per block; at M = 2 and 8, 32 / 8 = 4 pairs."""
  from jax_nvfp4.ops import dense
  occupancy = {1: 4}
  monkeypatch.setattr(dense, "_sm_count", lambda: 4)
  monkeypatch.setattr(dense, "k_sliced_blocks_per_sm",
                      lambda moe=False, m_tile=1, rows=0, k_slices=8: occupancy.get(rows, 2))
  n, k = 64 * 16, 2048  # 64 N tiles over waves of 16 (1 row) or 8 blocks
  w = nf.prepare(nf.quantize(jnp.asarray(rng.standard_normal((n, k)), jnp.float32)))
  x = jnp.ones((m, k), jnp.bfloat16)
  eqns = [e for e in jax.make_jaxpr(nf.nvfp4_matmul)(x, w).jaxpr.eqns
          if e.primitive is dense.nvfp4_gemm_p]
  assert len(eqns) == 1
  assert (eqns[0].params["k_slices"], eqns[0].params["tiles_per_block"]) == want


def test_k_slices_launch_is_validated_at_trace_time(rng):
  from jax_nvfp4.ops import dense
  w = nf.prepare(nf.quantize(jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)))
  x = jnp.zeros((1, 128), jnp.bfloat16)
  args = (x, w.qweight, w.qscales, w.global_scale, jnp.zeros((1,), jnp.float32))
  base = dict(n=64, k=128, has_bias=False, splits=1, m_tile=1, cluster=False)
  for bad in (dict(k_slices=3), dict(k_slices=8, splits=2), dict(k_slices=8, m_tile=4),
              dict(k_slices=8, cluster=True), dict(k_slices=4, m_tile=2),
              dict(k_slices=4, splits=2)):
    with pytest.raises(ValueError, match="k_slices"):
      jax.eval_shape(lambda *a, p={**base, **bad}: dense.nvfp4_gemm_p.bind(*a, **p), *args)
  for bad in (dict(tiles_per_block=0), dict(tiles_per_block=2, splits=2),
              dict(tiles_per_block=2, cluster=True, splits=2), dict(tiles_per_block=1 << 16)):
    with pytest.raises(ValueError, match="tiles_per_block"):
      jax.eval_shape(lambda *a, p={**base, **bad}: dense.nvfp4_gemm_p.bind(*a, **p), *args)
  for k_slices in (8, 4):
    out, ws = jax.eval_shape(
        lambda *a, ks=k_slices: dense.nvfp4_gemm_p.bind(*a, **base, k_slices=ks), *args)
    assert out.shape == (1, 64) and ws.shape == (256,)


def test_weights_beyond_the_kernels_32_bit_addressing_are_refused():
  # tile_mainloop counts one weight's 16-byte pieces, ceil(N/16) * ceil(K/64) * 32, in 32 bits.
  from jax_nvfp4.ops import dense
  dense.check_kernel_weight_size("op", 16 * (2**27 - 1), 64)  # 2^32 - 32 pieces: fits
  dense.check_kernel_weight_size("op", 4096, 14336)
  with pytest.raises(ValueError, match=r"op: a weight of \[N, K\] = \[131072, 1048576\] is "
                     r"4294967296 16-byte pieces"):
    dense.check_kernel_weight_size("op", 131072, 1048576)  # 8192 * 16384 * 32 = 2^32
  with pytest.raises(ValueError, match="split N"):
    dense.check_kernel_weight_size("op", 16 * 2**27, 64)


def _fits_below(largest_m_tile):
  """An occupancy query of a GPU where unsliced blocks up to ``largest_m_tile`` launch."""
  return lambda mt, bf16=True, k_slices=1, rows=0: (
      2 if k_slices == 1 and mt <= largest_m_tile else 0)


def test_a_gpu_without_room_for_large_tiles_runs_smaller_ones(monkeypatch):
  """Where a block gets 99 KB of shared memory (sm_86 / sm_89: A10, L4) only m_tile 1's
  unsliced block (44 KB) launches: every M runs in 8-row tiles, unsliced, and a launch asked
  for with a larger tile is refused at lowering. Where no GPU answers (the CPU's
  cross-lowering), the tile M asks for."""
  from jax_nvfp4.ops import dense
  monkeypatch.setattr(dense._ffi, "sm_count", lambda: 58)
  monkeypatch.setattr(dense._ffi, "blocks_per_sm", _fits_below(1))
  monkeypatch.setattr(dense._ffi, "moe_blocks_per_sm", _fits_below(1))
  monkeypatch.setattr(dense, "_sm_count", lambda: 58)
  monkeypatch.setattr(dense, "k_sliced_blocks_per_sm", lambda *a, **kw: 0)  # cached: patched
  for m in (1, 8, 9, 16, 17, 33, 64, 512):
    assert dense.choose_launch(m, 4096, 4096)[1] == 1
    assert dense.choose_k_slices(m, 4096, 4096) == 1
  assert [dense.fitting_m_tile(mt, moe) for moe in (False, True) for mt in (1, 2, 4, 8)] == [1] * 8
  monkeypatch.setattr(dense._ffi, "blocks_per_sm", _fits_below(4))
  assert [dense.fitting_m_tile(mt) for mt in (1, 2, 4, 8)] == [1, 2, 4, 4]
  assert [dense.choose_launch(m, 4096, 4096)[1] for m in (16, 32, 33, 300)] == [2, 4, 4, 4]
  monkeypatch.setattr(dense._ffi, "sm_count", lambda: 0)
  assert [dense.fitting_m_tile(mt) for mt in (1, 2, 4, 8)] == [1, 2, 4, 8]


def test_an_unlaunchable_tile_is_refused_at_lowering(monkeypatch):
  from jax_nvfp4.ops import dense
  if "jax_nvfp4_gemm_cuda" not in nf._ffi.REGISTERED:
    pytest.skip("the dense kernel is not built (its lowering rule is registered with it)")
  monkeypatch.setattr(dense._ffi, "sm_count", lambda: 58)
  monkeypatch.setattr(dense._ffi, "blocks_per_sm", _fits_below(1))
  from jax_nvfp4.prepare import kernel_shapes
  n, k, m = 256, 512, 64
  w_shape, s_shape = kernel_shapes(n, k)
  args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct(w_shape, jnp.uint32),
          jax.ShapeDtypeStruct(s_shape, jnp.uint8), jax.ShapeDtypeStruct((), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.float32))
  def gemm(m_tile):
    return lambda *a: dense.nvfp4_gemm_p.bind(*a, n=n, k=k, has_bias=False, splits=1,
                                              m_tile=m_tile, cluster=False)[0]
  text = jax.jit(gemm(1)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "jax_nvfp4_gemm_cuda" in text
  with pytest.raises(ValueError, match=r"m_tile = 8 needs more shared memory .* m_tile <= 1 fits"):
    jax.jit(gemm(8)).trace(*args).lower(lowering_platforms=("cuda",))
  # One launch takes 65535 token tiles (the grid's z dimension): 8 * 65535 rows at m_tile 1.
  for rows, fits in ((8 * 65535, True), (8 * 65535 + 1, False)):
    big = (jax.ShapeDtypeStruct((rows, k), jnp.bfloat16), *args[1:])
    lower = lambda: jax.jit(gemm(1)).trace(*big).lower(lowering_platforms=("cuda",))
    if fits:
      lower()
    else:
      with pytest.raises(ValueError, match="more than 65535 token tiles of 8"):
        lower()

"""The CUDA dense kernel against float64 / float32 references (skipped without a GPU)."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_nvfp4 as nf
from jax_nvfp4.ops import dense
from jax_nvfp4.ops import moe as moe_ops
from tests import numpy_reference as npref
from tests._cuda_arch import arch_the_driver_loads

pytestmark = pytest.mark.gpu


def random_weight(rng, n, k, *, scale_range=(2.0**-6, 8.0), global_scale=None):
  """Random codes (all 16, incl. +-0, +-6) and random E4M3 block scales."""
  packed = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
  scales = rng.uniform(*scale_range, size=(n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  gs = np.float32(global_scale if global_scale is not None else rng.uniform(0.01, 0.1))
  return nf.NVFP4Weight(jnp.asarray(packed), jnp.asarray(scales), jnp.asarray(gs))


def poisoned_call(fn, *args, out_shape, dtype):
  """Fills freshly freed device memory of the output's size with NaN first, so that an output
  element the kernel forgets to write shows up as NaN (the allocator reuses the freed block)."""
  poison = jnp.full(out_shape, jnp.nan, dtype).block_until_ready()
  del poison
  return fn(*args)


def rel_l2(a, b):
  a = np.asarray(a, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


_gemm = jax.jit(nf.nvfp4_matmul)


@pytest.fixture(autouse=True)
def kernel_at_every_m(request, monkeypatch):
  """The kernel is forced at every M here (the default policy hands M > KERNEL_MAX_M to
  dequantize + XLA GEMM; test_default_dispatch_* covers that path)."""
  if "default_dispatch" not in request.node.name:
    monkeypatch.setattr(dense, "KERNEL_MAX_M", 1 << 40)

PEER_SHAPES = [(1, 64, 128), (1, 256, 1024), (26, 2368, 1664), (257, 832, 1408),
               (257, 3328, 1408), (32, 2048, 1024)]
SMALL_M = [1, 2, 7, 16, 17, 64, 255]


def _check_f64(rng, m, n, k, dtype, with_bias, **wkw):
  w = random_weight(rng, n, k, **wkw)
  p = nf.prepare(w)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32) if with_bias else None
  out = poisoned_call(_gemm, x, p, bias, out_shape=(m, n), dtype=dtype)
  assert out.shape == (m, n) and out.dtype == dtype
  ref = np.asarray(x, np.float64) @ npref.dequantize(w.packed, w.scales, w.global_scale).T
  if with_bias:
    ref = ref + np.asarray(bias, np.float64)
  out = np.asarray(out, np.float64)
  assert np.isfinite(out).all(), "unwritten (NaN-poisoned) or overflowed outputs"
  return rel_l2(out, ref)


@pytest.mark.parametrize("m, n, k", PEER_SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_peer_shapes(rng, m, n, k, dtype):
  assert _check_f64(rng, m, n, k, dtype, with_bias=(m == 32)) <= 5e-3


@pytest.mark.parametrize("m", SMALL_M + [1024])
@pytest.mark.parametrize("n, k", [(100, 1664), (4000, 1664), (2368, 4096)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_m_sweep_odd_n(rng, m, n, k, dtype):
  assert _check_f64(rng, m, n, k, dtype, with_bias=True) <= 5e-3


@pytest.mark.parametrize("k, n", [(4096, 14336), (14336, 4096), (8192, 28672)])
@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 64, 255, 1024, 4096])
def test_llm_shapes_vs_fp32(rng, k, n, m):
  key = jax.random.key(int(rng.integers(1 << 30)))
  kp, ks, kx = jax.random.split(key, 3)
  packed = jax.random.randint(kp, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
  scales = jax.random.uniform(ks, (n, k // 16), jnp.float32, 2.0**-6, 8.0)
  w = nf.NVFP4Weight(packed, scales.astype(jnp.float8_e4m3fn), jnp.float32(0.02))
  x = jax.random.normal(kx, (m, k), jnp.bfloat16)
  out = poisoned_call(_gemm, x, nf.prepare(w), out_shape=(m, n), dtype=jnp.bfloat16)
  ref = jax.jit(lambda x, w: jnp.dot(x.astype(jnp.float32), nf.dequantize(w, jnp.float32).T,
                                     precision=jax.lax.Precision.HIGHEST))(x, w)
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  assert np.isfinite(out).all()
  assert rel_l2(out, ref) <= 2e-3


def test_global_scale_one_with_tiny_block_scales(rng):
  # E4M3 subnormal block scales (2^-9 .. 2^-7) and global_scale = 1 (DESIGN §5 regression).
  for dtype in (jnp.bfloat16, jnp.float16):
    assert _check_f64(rng, 5, 200, 256, dtype, False, scale_range=(2.0**-9, 2.0**-6),
                      global_scale=1.0) <= 5e-3


def test_fp16_large_global_scale_does_not_overflow(rng):
  # W values up to 6 * 448 * 8 = 21504: the product overflows fp16 unless the global scale is
  # applied to the fp32 accumulator; the true outputs stay below 65504.
  n, k = 64, 64
  w = random_weight(rng, n, k, scale_range=(300.0, 448.0), global_scale=8.0)
  x = jnp.asarray(rng.uniform(-1, 1, (3, k)) * 0.05, jnp.float16)
  out = np.asarray(_gemm(x, nf.prepare(w)), np.float64)
  ref = np.asarray(x, np.float64) @ npref.dequantize(w.packed, w.scales, w.global_scale).T
  assert np.abs(ref).max() < 60000 and np.abs(ref).max() > 1000
  assert np.isfinite(out).all()
  assert rel_l2(out, ref) <= 5e-3


def test_bitwise_deterministic_with_split_k(rng):
  m, n, k = 3, 512, 8192
  assert dense.choose_launch(m, n, k)[0] > 1  # the split-K path is exercised
  w = nf.prepare(random_weight(rng, n, k))
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  first = np.asarray(_gemm(x, w))
  for _ in range(5):
    np.testing.assert_array_equal(np.asarray(_gemm(x, w)), first)


def _forced_launch(x, p, *, splits, m_tile, cluster, bias=None):
  """The kernel with a forced (splits, m_tile, cluster) launch."""
  b = jnp.zeros((1,), jnp.float32) if bias is None else bias
  f = jax.jit(lambda xx, q, s, g, bb: dense.nvfp4_gemm_p.bind(
      xx, q, s, g, bb, n=p.n, k=p.k, has_bias=bias is not None, splits=splits, m_tile=m_tile,
      cluster=cluster)[0])
  return f(x, p.qweight, p.qscales, p.global_scale, b)


needs_cluster = pytest.mark.skipif(
    not dense.use_cluster(2, 1), reason="no thread-block cluster path on this GPU (sm_90 only)")


def device_arch() -> int:
  major, _, minor = str(jax.devices()[0].compute_capability).partition(".")
  return int(major) * 10 + int(minor or 0)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "f16"])
@pytest.mark.parametrize("m_tile", [1, 2, 4, 8])
def test_launch_features_follow_the_code_loaded(m_tile, bf16, moe):
  """Overlapped launches (programmatic dependent launch) and clusters need code compiled for
  sm_90: griddepcontrol.wait, the cluster barrier. Where a build has no SASS for the GPU the
  driver compiles older PTX for it, and the device's arch then says nothing about the code. The
  host must decide by the code's arch, which is CUDA's pick among the build's."""
  from jax_nvfp4 import _ffi
  code = _ffi.loaded_code(m_tile, bf16, moe)
  archs = _ffi.cuda_architectures()
  if all(a[:2].isdigit() for a in archs):  # not "native" / "all": CUDA's pick is known
    want = arch_the_driver_loads(archs, device_arch())
    assert code["arch"] == want, (code, archs, device_arch())
  want = code["arch"]
  assert 80 <= want <= device_arch()
  assert code["pdl"] == (want >= 90 and os.environ.get("JAX_NVFP4_PDL") != "0")
  if want < 90 or device_arch() // 10 != 9:
    assert code["cluster_limit"] == 0
  else:
    assert code["cluster_limit"] >= 2


def test_hopper_has_the_cluster_path():
  """The cluster tests skip by the library's own probe: on sm_90 that probe must say yes, or
  they would all skip instead of failing."""
  from jax_nvfp4 import _ffi
  cc = getattr(jax.devices()[0], "compute_capability", "")
  if not str(cc).startswith("9."):
    pytest.skip(f"not an sm_90 GPU (compute capability {cc!r})")
  if _ffi.loaded_code(1)["arch"] < 90:
    pytest.skip(f"this build has no sm_90 code ({_ffi.cuda_architectures()}): sm_80 code runs")
  assert dense.use_cluster(2, 1)
  assert moe_ops.moe_cluster_limit(8) >= 2 and moe_ops.moe_cluster_limit(16) >= 2


@needs_cluster
@pytest.mark.parametrize("m, n, k, splits", [(1, 4096, 14336, 16), (3, 1000, 4160, 7),
                                             (16, 520, 2560, 5), (9, 2056, 1088, 3),
                                             (1, 136, 16384, 13)])
def test_cluster_split_k_matches_reference_and_ticket_path(rng, m, n, k, splits):
  """The cluster reduction (DSMEM reduce-scatter) against float64, and bit for bit against the
  global-workspace ticket path: both sum the splits in order 0..S-1 in fp32. At m_tile 2 a
  unit is 8 k64 chunks: K = 2560 gives each of 5 splits one unit, K = 1088 leaves the last of
  3 a single chunk."""
  m_tile = dense._m_tile(m)
  if splits > dense._cluster_limit(m_tile):
    pytest.skip(f"clusters of {splits} do not fit here")
  w = random_weight(rng, n, k)
  p = nf.prepare(w)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  got = poisoned_call(lambda: _forced_launch(x, p, splits=splits, m_tile=m_tile, cluster=True,
                                             bias=bias), out_shape=(m, n), dtype=jnp.bfloat16)
  got = np.asarray(got, np.float64)
  assert np.isfinite(got).all(), "unwritten (NaN-poisoned) outputs"
  ref = (np.asarray(x, np.float64) @ npref.dequantize(w.packed, w.scales, w.global_scale).T
         + np.asarray(bias, np.float64))
  assert rel_l2(got, ref) <= 5e-3
  tickets = _forced_launch(x, p, splits=splits, m_tile=m_tile, cluster=False, bias=bias)
  np.testing.assert_array_equal(got, np.asarray(tickets, np.float64))


@needs_cluster
def test_default_launch_uses_the_cluster_without_workspace():
  n, k = 14336, 4096  # 112 N blocks: two splits at M = 1 on an H100
  splits, m_tile = dense.choose_launch(1, n, k)
  assert dense.use_cluster(splits, m_tile), (splits, m_tile)
  x = jax.ShapeDtypeStruct((1, k), jnp.bfloat16)
  p = jax.eval_shape(nf.prepare, jax.eval_shape(lambda: nf.quantize(jnp.zeros((n, k)))))
  compiled = jax.jit(nf.nvfp4_matmul).lower(x, p).compile()
  assert "jax_nvfp4_gemm_cuda" in compiled.as_text()
  # No split-K workspace: the fp32 partials alone would be splits * N * 4 bytes.
  assert compiled.memory_analysis().temp_size_in_bytes < splits * n * 4


def test_cluster_request_beyond_the_device_is_a_clear_error(rng):
  p = nf.prepare(random_weight(rng, 256, 8192))  # 32 k-units: room for 17 splits
  x = jnp.asarray(rng.standard_normal((1, 8192)), jnp.bfloat16)
  limit = dense._cluster_limit(1)
  with pytest.raises(Exception, match="cluster split-K with"):
    jax.block_until_ready(_forced_launch(x, p, splits=max(limit + 1, 2) if limit else 2,
                                         m_tile=1, cluster=True))


@pytest.mark.parametrize("bad, message", [
    (dict(), None),                                           # consistent: runs
    (dict(splits=5), "splits out of range"),                  # K = 1024: 4 pipeline units
    (dict(splits=2, m_tile=2), None),                         # m_tile 2: 2 units of 8 chunks
    (dict(splits=3, m_tile=2), "splits out of range"),
    (dict(k_slices=4), None),                                 # 4 slices at m_tile 1: runs
    (dict(k_slices=3), "k_slices must be 1, 4 or 8"),
    (dict(k_slices=4, m_tile=2), "k_slices 4 needs m_tile 1"),
    (dict(k_slices=8, m_tile=4), "k_slices > 1 needs m_tile 1 or 2"),
    (dict(k_slices=8, splits=2), "k_slices > 1 needs m_tile 1 or 2, splits 1"),
    (dict(splits=2, tiles_per_block=2), "tiles_per_block must be in"),
    (dict(tiles_per_block=0), "tiles_per_block must be in"),
])
def test_handler_rejects_inconsistent_launch_attributes(rng, bad, message):
  """The FFI handler checks the launch attributes itself (the primitive's own checks never let
  such a launch through, so the target is called directly here)."""
  p = nf.prepare(random_weight(rng, 256, 1024))
  x = jnp.asarray(rng.standard_normal((1, 1024)), jnp.bfloat16)
  attrs = dict(splits=1, m_tile=1, cluster=False, k_slices=1, tiles_per_block=1) | bad
  call = jax.ffi.ffi_call("jax_nvfp4_gemm_cuda",
                          (jax.ShapeDtypeStruct((1, 256), jnp.bfloat16),
                           jax.ShapeDtypeStruct((1 << 20,), jnp.uint8)))
  f = jax.jit(lambda *a: call(*a, n=np.int64(256), k=np.int64(1024), has_bias=False,
                              **{name: v if isinstance(v, bool) else np.int64(v)
                                 for name, v in attrs.items()})[0])
  args = (x, p.qweight, p.qscales, p.global_scale, jnp.zeros((1,), jnp.float32))
  if message is None:
    want = _forced_launch(x, p, splits=1, m_tile=1, cluster=False)  # the same launch
    np.testing.assert_array_equal(np.asarray(f(*args)), np.asarray(want))
    return
  with pytest.raises(Exception, match=message):
    jax.block_until_ready(f(*args))


def test_dependent_chain_reads_each_input_complete(rng):
  """Back-to-back dependent calls in one program. With programmatic dependent launch (sm_90) a
  call's blocks may start before the previous call ends; each must still read its input only
  once that is complete. At M = 1 the stages cover the k-sliced launch (4096 x 4096,
  14336 x 4096), the cluster split-K (4096 x 14336), the ticket split-K with its memset
  (4096 x 256) and an unsplit launch (256 x 4096); one stage's weight is written by an XLA
  kernel right before the call (the L2 prefetch issued before the wait is a hint, not a read).
  Each stage is checked against float64 on the kernel's own previous output."""
  shapes = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 256), (256, 4096), (4096, 4096)]
  ws = [random_weight(rng, n, k) for k, n in shapes]
  ps = [nf.prepare(w) for w in ws]
  written_in_program = 3

  def chain(x, ps, mask):
    outs = []
    for i, p in enumerate(ps):
      if i == written_in_program:  # a fresh buffer, written by the kernel before this call
        p = dataclasses.replace(p, qweight=p.qweight ^ mask)
      x = nf.nvfp4_matmul(x, p)
      outs.append(x)
    return outs

  for m in (1, 16):
    x = jnp.asarray(rng.standard_normal((m, shapes[0][0])), jnp.bfloat16)
    mask = jnp.zeros((), jnp.uint32)
    outs = poisoned_call(jax.jit(chain), x, ps, mask, out_shape=(m, 14336), dtype=jnp.bfloat16)
    inp = np.asarray(x, np.float64)
    for i, (w, out) in enumerate(zip(ws, outs)):
      out = np.asarray(out, np.float64)
      assert np.isfinite(out).all(), (m, i)
      ref = inp @ npref.dequantize(w.packed, w.scales, w.global_scale).T
      assert rel_l2(out, ref) <= 5e-3, (m, i, rel_l2(out, ref))
      inp = out


_K_SLICED_LAUNCHES = [
    (1, 4096, 14336, 1), (7, 1000, 4160, 1), (3, 2056, 1088, 1), (1, 136, 16384, 1),
    (5, 520, 80, 1), (8, 24, 2064, 1),
    (1, 4096, 4096, 4), (2, 1000, 4160, 3), (6, 520, 80, 5), (1, 8200, 2048, 7),
    (2, 1000, 8176, 3)]  # K 8176: 128 k64 chunks, long slices at 8 with the last one short


@pytest.mark.parametrize("m, n, k, tiles_per_block, k_slices", [
    *[(*launch, 8) for launch in _K_SLICED_LAUNCHES],
    (16, 4096, 14336, 1, 8), (9, 1000, 4160, 1, 8), (13, 520, 80, 3, 8), (16, 2056, 1088, 2, 8),
    *[(*launch, 4) for launch in _K_SLICED_LAUNCHES],
    (1, 1032, 1088, 2, 4)])  # 65 N tiles: the last block's pair has one tile
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_k_sliced_launch_matches_reference(rng, m, n, k, tiles_per_block, k_slices, dtype):
  """The launch whose 8 warps split K inside the block (8 slices of one N tile at a time, or
  4 slices of a pair of N tiles; tiles_per_block of them in a row, the last block short when
  they do not divide the N tiles), at m_tile 1 (M <= 8) and 2 (M <= 16, 8 slices of 2 chunks),
  against float64: N not a multiple of the tile (an odd N-tile count leaves a pair half
  empty), K ranges that leave slices empty (K = 80: 2 of 8 slices have a chunk) or end
  mid-unit, with bias; bitwise repeatable."""
  w = random_weight(rng, n, k)
  p = nf.prepare(w)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  f = jax.jit(lambda xx, q, s, g, bb: dense.nvfp4_gemm_p.bind(
      xx, q, s, g, bb, n=p.n, k=p.k, has_bias=True, splits=1, m_tile=1 if m <= 8 else 2,
      cluster=False, k_slices=k_slices, tiles_per_block=tiles_per_block)[0])
  args = (x, p.qweight, p.qscales, p.global_scale, bias)
  got = np.asarray(poisoned_call(f, *args, out_shape=(m, n), dtype=dtype), np.float64)
  assert np.isfinite(got).all(), "unwritten (NaN-poisoned) outputs"
  ref = (np.asarray(x, np.float64) @ npref.dequantize(w.packed, w.scales, w.global_scale).T
         + np.asarray(bias, np.float64))
  assert rel_l2(got, ref) <= 5e-3
  np.testing.assert_array_equal(np.asarray(f(*args), np.float64), got)


@pytest.mark.parametrize("n, k, tiles_per_block", [
    (4096, 14336, 4), (1000, 4160, 3), (520, 80, 1), (136, 16384, 1), (8200, 2048, 7),
    (24, 2064, 2), (1000, 8192, 3)])
@pytest.mark.parametrize("k_slices", [8, 4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_short_token_blocks_match_bitwise(rng, n, k, tiles_per_block, k_slices, dtype):
  """M = 1, 2, 3-4 run k-sliced blocks whose x tile holds 1, 2, 4 rows (the other MMA rows read
  row 0 again, never stored; a deeper ring or longer slices); M = 8 the 8-row tile; with 8 slices and with 4.
  Tiles whose slices split K the same way (``k_sliced_unit_k``: the 4-slice short tiles and the
  8-slice 1- and 2-row tiles at K % 4096 == 0 take longer slices) make the same sums in the
  same order: their common rows are bitwise equal. Each within 5e-3 of float64 (N not a
  multiple of the tile, K = 80 leaving slices empty, K ending mid-unit, ragged last block,
  bias)."""
  w = random_weight(rng, n, k)
  p = nf.prepare(w)
  x8 = jnp.asarray(rng.standard_normal((8, k)), dtype)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  f = jax.jit(lambda xx, q, s, g, bb: dense.nvfp4_gemm_p.bind(
      xx, q, s, g, bb, n=p.n, k=p.k, has_bias=True, splits=1, m_tile=1, cluster=False,
      k_slices=k_slices, tiles_per_block=tiles_per_block)[0])
  args = (p.qweight, p.qscales, p.global_scale, bias)
  ref = (np.asarray(x8, np.float64) @ npref.dequantize(w.packed, w.scales, w.global_scale).T
         + np.asarray(bias, np.float64))
  outs, units = {}, {}
  for m in (1, 2, 3, 4, 8):
    got = np.asarray(poisoned_call(f, x8[:m], *args, out_shape=(m, n), dtype=dtype), np.float64)
    assert np.isfinite(got).all(), f"unwritten (NaN-poisoned) outputs at M = {m}"
    assert rel_l2(got, ref[:m]) <= 5e-3, f"M = {m}"
    outs[m], units[m] = got, dense.k_sliced_unit_k(1, k_slices, m, p.k)
  pairs = [(a, b) for a in outs for b in outs if a < b and units[a] == units[b]]
  assert (1, 2) in pairs and (3, 4) in pairs  # every case compares something
  for a, b in pairs:
    np.testing.assert_array_equal(outs[a], outs[b][:a], err_msg=f"M = {a} vs M = {b}")


@pytest.mark.parametrize("m, n, k", [(1, 4096, 14336), (1, 14336, 4096), (16, 4096, 14336)])
def test_default_decode_launch_uses_k_slices_without_workspace(m, n, k):
  assert dense.choose_k_slices(m, n, k) in (dense.PAIR_K_SLICES, dense.DECODE_K_SLICES)
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  p = jax.eval_shape(nf.prepare, jax.eval_shape(lambda: nf.quantize(jnp.zeros((n, k)))))
  compiled = jax.jit(nf.nvfp4_matmul).lower(x, p).compile()
  assert "jax_nvfp4_gemm_cuda" in compiled.as_text()
  assert compiled.memory_analysis().temp_size_in_bytes < n * 4  # no fp32 partials


def test_unprepared_weight_runs_the_kernel_too(rng):
  w = random_weight(rng, 96, 128)
  x = jnp.asarray(rng.standard_normal((4, 128)), jnp.bfloat16)
  hlo = jax.jit(nf.nvfp4_matmul).lower(x, w).as_text()  # M = 4: always the kernel
  assert "jax_nvfp4_gemm_cuda" in hlo
  np.testing.assert_array_equal(np.asarray(_gemm(x, w)), np.asarray(_gemm(x, nf.prepare(w))))


def test_m_zero(rng):
  w = nf.prepare(random_weight(rng, 48, 64))
  out = _gemm(jnp.zeros((0, 64), jnp.bfloat16), w)
  assert out.shape == (0, 48)


def test_no_bf16_weight_materialized(rng):
  n, k, m = 4096, 4096, 16
  w = nf.prepare(random_weight(rng, n, k))
  x = jnp.zeros((m, k), jnp.bfloat16)
  compiled = jax.jit(nf.nvfp4_matmul).lower(x, w).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  splits, m_tile = dense.choose_launch(m, n, k)
  workspace = dense.workspace_bytes(m, n, splits, m_tile)
  # The only temporary is the split-K workspace (fp32 partials); a bf16 copy of W is 32 MiB.
  assert temp <= workspace + (64 << 10), f"temp {temp} bytes > workspace {workspace}"
  assert temp < n * k * 2 // 4, f"temp {temp} bytes: looks like a dequantized weight copy"
  assert "jax_nvfp4_gemm_cuda" in compiled.as_text()


def test_inside_cuda_graph_command_buffer(rng):
  # A fresh process, since XLA flags are read once at backend start.
  code = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, jax_nvfp4 as nf
    w = nf.quantize(jax.random.normal(jax.random.key(0), (300, 512)))
    p = nf.prepare(w)
    x = jax.random.normal(jax.random.key(1), (5, 512), jnp.bfloat16)
    f = jax.jit(lambda x, p: nf.nvfp4_matmul(nf.nvfp4_matmul(x, p)[:, :256].astype(x.dtype)
                                             .repeat(2, axis=1), p))
    a = np.asarray(f(x, p), np.float32); b = np.asarray(f(x, p), np.float32)
    r = jax.jit(lambda x, w: nf.reference_matmul(
        nf.reference_matmul(x, w)[:, :256].repeat(2, axis=1), w))(x, w)
    assert np.array_equal(a, b)
    err = np.linalg.norm(a - np.asarray(r, np.float32)) / np.linalg.norm(np.asarray(r, np.float32))
    print("ERR", err)
    assert err < 1e-2, err
  """)
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=+CUSTOM_CALL"
                      " --xla_gpu_graph_min_graph_size=1")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stdout + res.stderr
  assert "ERR" in res.stdout


@pytest.mark.parametrize("m", [255, 600, 4096])
@pytest.mark.parametrize("n, k", [(4000, 1664), (14336, 4096)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_default_dispatch_large_m(rng, m, n, k, dtype):
  assert 255 <= dense.KERNEL_MAX_M < 600  # both sides of the dispatch are covered
  w = random_weight(rng, n, k)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  # A jit of its own: traces made with the kernel forced must not be reused here.
  default_gemm = jax.jit(lambda x, w, b: nf.nvfp4_matmul(x, w, b))
  out = poisoned_call(default_gemm, x, nf.prepare(w), bias, out_shape=(m, n), dtype=dtype)
  ref = jax.jit(lambda x, w, b: jnp.dot(x.astype(jnp.float32), nf.dequantize(w, jnp.float32).T,
                                        precision=jax.lax.Precision.HIGHEST) + b)(x, w, bias)
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  assert np.isfinite(out).all()
  assert rel_l2(out, ref) <= 5e-3


@pytest.mark.parametrize("m", [1, 16, 64])
def test_every_gpu_of_the_process_runs_the_kernels(rng, m):
  """The kernels' function attributes (the shared-memory opt-in above 48 KB, clusters) are per
  device: a launch on the second GPU of a process must not rely on the first GPU's opt-in.
  Each device runs the same product (k-sliced at M = 1, clusters at 16, 8-row tiles at 64)
  after the first one did, bit for bit, and right against float64."""
  gpus = jax.devices("gpu")
  if len(gpus) < 2:
    pytest.skip("needs two GPUs in this process")
  n, k = 4096, 4096
  w = random_weight(rng, n, k)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  want = np.asarray(x, np.float64) @ np.asarray(nf.dequantize(w, jnp.float32), np.float64).T
  outs = []
  for gpu in gpus[:2]:
    xd, wd = jax.device_put((x, nf.prepare(w)), gpu)
    out = jax.jit(nf.nvfp4_matmul)(xd, wd)
    assert out.devices() == {gpu}
    outs.append(np.asarray(out))
  np.testing.assert_array_equal(outs[1], outs[0])
  assert rel_l2(outs[1], want) <= 5e-3

"""``nvfp4_matmul``: ``y = x @ W.T (+ bias)`` with an NVFP4 weight ``W[N, K]`` (W4A16).

Reading order: argument checks -> primitive and abstract eval -> lowerings -> batching.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_nvfp4 import _ffi
from jax_nvfp4.ops._batching import batch_dim_first
from jax_nvfp4.format import NVFP4Weight, check_weight
from jax_nvfp4.ops.dequantize import dequantize_blocks
from jax_nvfp4.prepare import PreparedNVFP4Weight, kernel_shapes, prepare, unprepare
from jax_nvfp4.reference import reference_matmul

ACTIVATION_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


# ----------------------------------------------------------------------------- checks

def _check(x_aval, packed_aval, scales_aval, gs_aval, bias_aval):
  if np.dtype(x_aval.dtype) not in ACTIVATION_DTYPES:
    raise TypeError(f"nvfp4_matmul: x must be bfloat16 or float16 [..., K], got {x_aval.dtype}")
  if len(x_aval.shape) < 1:
    raise ValueError("nvfp4_matmul: x must have rank >= 1 ([..., K]), got a scalar")
  check_weight(packed_aval, scales_aval, gs_aval)
  if len(packed_aval.shape) != 2:
    raise ValueError("nvfp4_matmul: w must be a single [N, K] weight (no leading dims), got "
                     f"logical shape {(*packed_aval.shape[:-1], 2 * packed_aval.shape[-1])}")
  n, k = packed_aval.shape[0], 2 * packed_aval.shape[1]
  if x_aval.shape[-1] != k:
    raise ValueError(f"nvfp4_matmul: x's last dim is {x_aval.shape[-1]} but w has K = {k} "
                     f"(w is [N, K] = [{n}, {k}])")
  if bias_aval is not None:
    if tuple(bias_aval.shape) != (n,):
      raise ValueError(f"nvfp4_matmul: bias must have shape ({n},), got {tuple(bias_aval.shape)}")
    if np.dtype(bias_aval.dtype) != np.float32:
      raise TypeError(f"nvfp4_matmul: bias must be float32 here, got {bias_aval.dtype}")
  return n, k


# ----------------------------------------------------------------------------- primitive

nvfp4_matmul_p = Primitive("nvfp4_matmul")


def _abstract_eval(x, packed, scales, global_scale, *bias, has_bias):
  n, _ = _check(x, packed, scales, global_scale, bias[0] if has_bias else None)
  return jax.core.ShapedArray((*x.shape[:-1], n), x.dtype)


nvfp4_matmul_p.def_abstract_eval(_abstract_eval)
nvfp4_matmul_p.def_impl(lambda *args, **params: jax.jit(
    lambda *a: nvfp4_matmul_p.bind(*a, **params))(*args))


# ----------------------------------------------------------------------------- lowering

def _reference_impl(x, packed, scales, global_scale, *bias, has_bias):
  w = NVFP4Weight(packed, scales, global_scale)
  return reference_matmul(x, w, bias[0] if has_bias else None)


# Every platform gets the reference; the CUDA kernel lowering overrides it where it is built.
mlir.register_lowering(nvfp4_matmul_p, mlir.lower_fun(_reference_impl, multiple_results=False))


# ----------------------------------------------------------------------------- batching

def _batched(args, dims, call):
  """vmap of ``call(x, *weight_ops)``, batch dim of the result at 0. Leading dims of x fold
  into M, so only a batched weight needs a loop (``lax.map`` over the batch)."""
  x, *weight_ops = args
  x_dim, *weight_dims = dims
  if all(d is None for d in weight_dims):
    return call(jnp.moveaxis(x, x_dim, 0), *weight_ops)
  _, args = batch_dim_first(args, dims)
  return jax.lax.map(lambda ops: call(*ops), tuple(args))


def _batch(args, dims, *, has_bias):
  return _batched(args, dims, lambda *ops: nvfp4_matmul_p.bind(*ops, has_bias=has_bias)), 0


batching.primitive_batchers[nvfp4_matmul_p] = _batch


# ----------------------------------------------------------------------------- kernel layout
#
# nvfp4_gemm_p: the same product with a PreparedNVFP4Weight. Two results: the output and the
# kernel's workspace (split-K tickets and fp32 partials), which the public wrapper drops.

nvfp4_gemm_p = Primitive("nvfp4_gemm")
nvfp4_gemm_p.multiple_results = True

_WARPS_PER_BLOCK = 8  # csrc/nvfp4_gemm.cu kWarps


def _m_tile(m: int) -> int:
  return fitting_m_tile(1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8)


def fitting_m_tile(m_tile: int, moe: bool = False) -> int:
  """The largest token tile up to ``m_tile`` whose unsliced block fits an SM of this GPU: the
  blocks of m_tile 2, 4 and 8 take 100-104 KB of shared memory, above the 99 KB a block may have
  on sm_86 / sm_89 (A10, L4), where m_tile 1 (44 KB) runs the M rows in more token tiles.
  ``m_tile`` itself where no GPU can be asked (no kernels, no device: the CPU's
  cross-lowering)."""
  if not _ffi.sm_count():
    return m_tile
  query = _ffi.moe_blocks_per_sm if moe else _ffi.blocks_per_sm
  while m_tile > 1 and query(m_tile, True) < 1:
    m_tile //= 2
  return m_tile


@functools.lru_cache(maxsize=None)
def _sm_count() -> int:
  return _ffi.sm_count() or 132


@functools.lru_cache(maxsize=None)
def _blocks_per_sm(m_tile: int) -> int:
  return _ffi.blocks_per_sm(m_tile, True) or 2


@functools.lru_cache(maxsize=None)
def _cluster_limit(m_tile: int) -> int:
  return _ffi.cluster_limit(m_tile, True, False)


_CHUNKS_PER_UNIT = 4  # csrc/nvfp4_tile.cuh kChunksPerStage: K is split in units of 4 k64 chunks
#: csrc/nvfp4_tile.cuh JAX_NVFP4_CHUNKS_PER_STAGE_MT2: the unsliced m_tile-2 block's units are
#: 8 chunks long (kernel_lab on an H200 at M = 16: 8192x28672 52.3 -> 49.9 us; NOTES_dense.md v24).
_MT2_CHUNKS_PER_UNIT = 8


def unsliced_unit_chunks(m_tile: int) -> int:
  """k64 chunks per pipeline unit of the unsliced block at ``m_tile`` (csrc/nvfp4_tile.cuh
  ``unsliced_unit_chunks``): what a K split is counted in, each split at least one unit."""
  return _MT2_CHUNKS_PER_UNIT if m_tile == 2 else _CHUNKS_PER_UNIT


# Splits that reduce in a thread-block cluster (sm_90) rather than through the workspace: on the
# H100 the cluster reduction saved 1.5-4 us per call at 2, 3 (and 6) splits, but launching
# clusters of 4, 8, 12 or 16 cost 3-6 us more than it saved (NOTES_dense.md v7).
CLUSTER_MAX_SPLITS = 3


def choose_launch(m: int, n: int, k: int) -> tuple[int, int]:
  """(splits, m_tile) for the dense kernel.

  K is split so that the grid holds about two blocks per SM for m_tile <= 2 (fewer if fewer
  are resident) and one for m_tile >= 4, each split at least one k-unit (a pipeline stage of
  ``unsliced_unit_chunks`` k64 chunks) long, at most 64 splits. Every split adds reduction work at the end of the kernel, so more blocks
  than that were slower on an H100 (benchmarks/sweep_launch.py, kernel_lab.cu; NOTES_dense.md
  v2 for m_tile >= 4 and v7 for m_tile <= 2).
  """
  mt = _m_tile(m)
  units = -(-(-(-k // 64)) // unsliced_unit_chunks(mt))
  return int(max(1, min(_wave_splits(m, n), units, 64))), mt


def _wave_splits(m: int, n: int) -> int:
  """The K splits that fill one wave of the unsliced launch, before K's units cap them."""
  mt = _m_tile(m)
  n_blocks = -(-(-(-n // 16)) // _WARPS_PER_BLOCK)
  m_tiles = max(1, -(-m // (8 * mt)))
  slots = _sm_count() * (min(2, _blocks_per_sm(mt)) if mt <= 2 else 1)
  return slots // (n_blocks * m_tiles)


#: csrc/nvfp4_kernel.cuh kDecodeKSlices: at m_tile 1 and 2 the block's 8 warps can split K
#: among themselves (one N tile of 16 rows per block, partial sums added in shared memory).
DECODE_K_SLICES = 8
#: csrc/nvfp4_kernel.cuh kPairKSlices: at m_tile 1 also 4 slices of 2 N tiles (a block's pair
#: of N tiles shares one hand-off and epilogue).
PAIR_K_SLICES = 4


#: csrc/nvfp4_tile.cuh kLongSliceChunks: the k64 chunks of a long k-slice.
LONG_SLICE_CHUNKS = 8


def k_sliced_unit_k(m_tile: int, k_slices: int = DECODE_K_SLICES, rows: int = 0,
                    k: int = 0, moe: bool = False) -> int:
  """K covered by one k-sliced unit (csrc/nvfp4_tile.cuh kChunksPerSlice): ``k_slices``
  slices of 4 k64 chunks at m_tile 1, of 2 at m_tile 2 (half the x tile, two blocks per SM).
  The launch picks longer slices by its x tile (``rows`` 1 to 4, as ``k_sliced_blocks_per_sm``)
  and K (``k``; 0: unknown): the 4-slice block's 1-, 2- and 4-row tiles take 8 chunks (its unit
  as long as the 8-slice one), and so does the dense 8-slice block's 1- and 2-row tiles where
  K is a whole number of such units (csrc/nvfp4_kernel.cuh long_slices)."""
  long_chunks = k_slices * LONG_SLICE_CHUNKS
  if m_tile == 1 and 1 <= rows <= 4:
    if k_slices == PAIR_K_SLICES:
      return long_chunks * 64
    # The kernel counts K in k64 chunks.
    if rows <= 2 and not moe and k > 0 and -(-k // 64) % long_chunks == 0:
      return long_chunks * 64
  return k_slices * (_CHUNKS_PER_UNIT if m_tile == 1 else _CHUNKS_PER_UNIT // 2) * 64


#: K is split among the warps only where it fills at least one 8-slice unit: at K = 768 (12
#: of a unit's 32 chunks) the k-sliced MoE GEMM took 1.7x the unsliced one's time
#: (NOTES_moe.md v7).
K_SLICES_MIN_K = k_sliced_unit_k(1)


@functools.lru_cache(maxsize=None)
def k_sliced_blocks_per_sm(moe: bool = False, m_tile: int = 1, rows: int = 0,
                           k_slices: int = DECODE_K_SLICES) -> int:
  """Resident k-sliced blocks per SM (about 100 KB of shared memory at m_tile 1, 90 KB at 2):
  2 on an H100, 1 on an A100, 0 where one does not fit an SM (e.g. an L4: no k-slices there).
  ``rows``: the x rows the launch picks its m_tile-1 tile by (the dense M, the grouped GEMM's
  ``expert_rows``; 0: the 8-row tile), since the 1-, 2- and 4-row tiles have rings of their own.
  Where no device can be asked (lowering for cuda from a host without one) an H100's 2."""
  if not _ffi.sm_count():
    return 2
  query = _ffi.moe_blocks_per_sm if moe else _ffi.blocks_per_sm
  return query(m_tile, True, k_slices, rows if m_tile == 1 else 0)


def choose_k_slices(m: int, n: int, k: int) -> int:
  """1, ``DECODE_K_SLICES`` or ``PAIR_K_SLICES``: the block's 8 warps split K among
  themselves instead of the grid splitting K across blocks (no workspace, memset, tickets or
  cluster), and each block streams ``choose_tiles_per_block`` consecutive N tiles of 16 rows,
  one wave of blocks in all. Needs at least one N tile per SM and K of at least one 8-slice
  unit (``k_sliced_unit_k``).

  * m_tile 1 (M <= 8): always. On an H100 at M = 1 this beat the block-split launches on all
    four benchmark shapes (kernel_lab: 4096x14336 18.4 vs 20.1 us and 8192x28672 53.1 vs
    57.8 for a 2-block cluster, 14336x4096 16.5 vs 22.6 for 8 ticket splits; in the benchmark
    8192x28672 went from 55.7 us unsplit to 53.4; NOTES_dense.md v8-v9). 8 or 4 slices as
    ``choose_slice_count`` says.
  * m_tile 2 (M <= 16): where a wave of the unsliced launch needs its K splits reduced
    through the workspace (tickets and a memset per call): 14336x4096 25.0 vs 30.6 us,
    4096x4096 9.3 vs 19.4; where it runs unsplit or in a cluster, k-slices lost (8192x28672
    93 vs 69 us).
  """
  mt = _m_tile(m)
  if mt > 2 or k < k_sliced_unit_k(mt) or -(-n // 16) < _sm_count():
    return 1
  if mt == 1 and m > 8:  # m_tile 1 for more rows: fitting_m_tile's fallback, unsliced
    return 1
  if mt == 2:
    # Not K's units: the comparison is with a wave of unsliced blocks, and a K of few 8-chunk
    # units would otherwise cap the splits to a cluster that leaves most SMs idle.
    splits = min(_wave_splits(m, n), 64)
    if splits <= 1 or use_cluster(splits, mt):
      return 1
  if k_sliced_blocks_per_sm(m_tile=mt) < 1:
    return 1
  return DECODE_K_SLICES if mt == 2 else choose_slice_count(n, rows=m)


def choose_slice_count(n: int, moe: bool = False, token_tiles: int = 1, rows: int = 0) -> int:
  """``PAIR_K_SLICES`` or ``DECODE_K_SLICES`` for an m_tile-1 k-sliced launch: 4 slices (one
  hand-off per pair of N tiles) unless that gives a block more N tiles than 8 slices do (N
  tiles come in pairs then, so one wave can be less even); where 8 slices give every block
  one N tile, 4 slices as long as the pairs number at least half the SMs.
  Measured in kernel_lab on an H200 at M = 1, 8 -> 4 slices (NOTES_dense.md v21,
  benchmarks/results/ab_four_k_slices_h200_2026-12-04.txt): 4096x14336 14.8 -> 14.4 us,
  4096x57344 44.3 -> 42.2, 2048x57344 25.1 -> 23.4 (the same tiles per block), 4096x4096
  7.2 -> 6.5 and 14336x4096 14.7 -> 14.6 (1 tile -> 1 pair); 8192x28672 42.6 -> 47.0
  (7 tiles -> 4 pairs: the rule keeps 8 slices). The slices' length is the launch's own choice
  (``k_sliced_unit_k``), with the same occupancy either way."""
  if k_sliced_blocks_per_sm(moe, 1, rows, PAIR_K_SLICES) < 1:
    return DECODE_K_SLICES
  eight = choose_tiles_per_block(n, DECODE_K_SLICES, moe, token_tiles, rows=rows)
  four = 2 * choose_tiles_per_block(n, PAIR_K_SLICES, moe, token_tiles, rows=rows)
  pairs = -(-(-(-n // 16)) // 2)
  if four <= eight or (eight == 1 and 2 * pairs >= _sm_count()):
    return PAIR_K_SLICES
  return DECODE_K_SLICES


def choose_tiles_per_block(n: int, k_slices: int, moe: bool = False, token_tiles: int = 1,
                           m_tile: int = 1, rows: int = 0) -> int:
  """Tiles per block of a k-sliced launch (1 otherwise), each tile ``8 // k_slices`` N tiles of
  16 rows: the fewest that make the grid one wave of resident blocks (``token_tiles`` blocks
  share each tile), spread evenly; ``rows`` as ``k_sliced_blocks_per_sm``.
  More than one wave cost up to 25 % on an H100 (8192x28672: 7 tiles per block, 256 blocks,
  53.1 us; 4 tiles, 448 blocks, 60.9 us; NOTES_dense.md v9)."""
  if k_slices == 1:
    return 1
  tiles = -(-(-(-n // 16)) // (_WARPS_PER_BLOCK // k_slices))
  wave = _sm_count() * max(1, k_sliced_blocks_per_sm(moe, m_tile, rows, k_slices))
  per_token_tile = max(1, min(tiles, wave // max(1, token_tiles)))  # blocks per token tile
  return -(-tiles // per_token_tile)


def use_cluster(splits: int, m_tile: int) -> bool:
  """Whether the ``splits`` of a tile reduce inside a thread-block cluster (distributed shared
  memory, sm_90 only) instead of through the global workspace with tickets and a memset:
  for 2 to ``CLUSTER_MAX_SPLITS`` splits where the device launches such clusters."""
  return 1 < splits <= min(CLUSTER_MAX_SPLITS, _cluster_limit(m_tile))


def workspace_bytes(m: int, n: int, splits: int, m_tile: int, cluster: bool = False) -> int:
  if splits <= 1 or m == 0 or cluster:
    return 256
  m_tiles = -(-m // (8 * m_tile))
  n_blocks = -(-(-(-n // 16)) // _WARPS_PER_BLOCK)
  tickets = -(-(m_tiles * n_blocks * 4) // 256) * 256
  return tickets + splits * m * n * 4


#: The kernels address one weight (one expert's) in 32-bit counts of 16-byte pieces:
#: ceil(N/16) * ceil(K/64) * 32 of them, so N * K must stay below about 2^37 (a 64 GB weight).
MAX_WEIGHT_PIECES = 2**32 - 1


def check_kernel_weight_size(op: str, n: int, k: int) -> None:
  """Raises where one [N, K] weight is beyond the CUDA kernels' 32-bit weight addressing."""
  pieces = -(-n // 16) * -(-k // 64) * 32
  if pieces > MAX_WEIGHT_PIECES:
    raise ValueError(f"{op}: a weight of [N, K] = [{n}, {k}] is {pieces} 16-byte pieces, more "
                     f"than the CUDA kernel addresses ({MAX_WEIGHT_PIECES}); split N")


def _check_prepared(x_aval, qweight_aval, qscales_aval, gs_aval, bias_aval, n, k):
  if np.dtype(x_aval.dtype) not in ACTIVATION_DTYPES:
    raise TypeError(f"nvfp4_matmul: x must be bfloat16 or float16 [..., K], got {x_aval.dtype}")
  if len(x_aval.shape) < 1 or x_aval.shape[-1] != k:
    raise ValueError(f"nvfp4_matmul: x must be [..., K] with K = {k}, got {x_aval.shape}")
  want_w, want_s = kernel_shapes(n, k)
  if tuple(qweight_aval.shape) != want_w or np.dtype(qweight_aval.dtype) != np.uint32:
    raise ValueError(f"nvfp4_matmul: qweight must be uint32 {want_w} for [N, K] = [{n}, {k}], "
                     f"got {qweight_aval.dtype} {tuple(qweight_aval.shape)}")
  if tuple(qscales_aval.shape) != want_s or np.dtype(qscales_aval.dtype) != np.uint8:
    raise ValueError(f"nvfp4_matmul: qscales must be uint8 {want_s}, got "
                     f"{qscales_aval.dtype} {tuple(qscales_aval.shape)}")
  if tuple(gs_aval.shape) != () or np.dtype(gs_aval.dtype) != np.float32:
    raise ValueError("nvfp4_matmul: global_scale must be a float32 scalar")
  if bias_aval is not None and (tuple(bias_aval.shape) != (n,)
                                or np.dtype(bias_aval.dtype) != np.float32):
    raise ValueError(f"nvfp4_matmul: bias must be float32 ({n},), got {bias_aval.dtype} "
                     f"{tuple(bias_aval.shape)}")


def _gemm_abstract_eval(x, qweight, qscales, global_scale, bias, *, n, k, has_bias, splits,
                        m_tile, cluster, k_slices=1, tiles_per_block=1):
  _check_prepared(x, qweight, qscales, global_scale, bias if has_bias else None, n, k)
  if k_slices not in (1, PAIR_K_SLICES, DECODE_K_SLICES) or (
      k_slices != 1 and (m_tile > 2 or splits != 1 or cluster)) or (
      k_slices == PAIR_K_SLICES and m_tile != 1):
    raise ValueError(f"nvfp4_gemm: k_slices must be 1, or {DECODE_K_SLICES} with m_tile 1 or "
                     f"2, or {PAIR_K_SLICES} with m_tile 1, and then splits 1 and no cluster; "
                     f"got k_slices={k_slices}, m_tile={m_tile}, splits={splits}, "
                     f"cluster={cluster}")
  if not 1 <= tiles_per_block <= 65535 or (tiles_per_block > 1 and (splits != 1 or cluster)):
    raise ValueError(f"nvfp4_gemm: tiles_per_block must be in [1, 65535], and 1 when K is "
                     f"split across blocks; got tiles_per_block={tiles_per_block}, "
                     f"splits={splits}, cluster={cluster}")
  m = int(np.prod(x.shape[:-1]))
  return (jax.core.ShapedArray((*x.shape[:-1], n), x.dtype),
          jax.core.ShapedArray((workspace_bytes(m, n, splits, m_tile, cluster),), jnp.uint8))


nvfp4_gemm_p.def_abstract_eval(_gemm_abstract_eval)
nvfp4_gemm_p.def_impl(lambda *args, **params: jax.jit(
    lambda *a: nvfp4_gemm_p.bind(*a, **params))(*args))


def _gemm_reference(x, qweight, qscales, global_scale, bias, *, n, k, has_bias, splits, m_tile,
                    cluster, k_slices=1, tiles_per_block=1):
  w = unprepare(PreparedNVFP4Weight(qweight, qscales, global_scale, n=n, k=k))
  out = reference_matmul(x, w, bias if has_bias else None)
  m = int(np.prod(x.shape[:-1]))
  return out, jnp.zeros((workspace_bytes(m, n, splits, m_tile, cluster),), jnp.uint8)


mlir.register_lowering(nvfp4_gemm_p, mlir.lower_fun(_gemm_reference, multiple_results=True))

if "jax_nvfp4_gemm_cuda" in _ffi.REGISTERED:
  _cuda_gemm = jax.ffi.ffi_lowering("jax_nvfp4_gemm_cuda")

  def _gemm_cuda_lowering(ctx, x, qweight, qscales, global_scale, bias, *, n, k, has_bias,
                          splits, m_tile, cluster, k_slices=1, tiles_per_block=1):
    check_kernel_weight_size("nvfp4_matmul", n, k)
    m = int(np.prod(ctx.avals_in[0].shape[:-1]))
    if -(-m // (8 * m_tile)) > 65535:  # the grid's z dimension (csrc/nvfp4_gemm.cu)
      raise ValueError(f"nvfp4_gemm: M = {m} rows are more than 65535 token tiles of "
                       f"{8 * m_tile}; split x (nvfp4_matmul runs M > {KERNEL_MAX_M} "
                       "through dequantize + dot)")
    fits = fitting_m_tile(m_tile)
    if k_slices == 1 and fits < m_tile:
      raise ValueError(f"nvfp4_gemm: m_tile = {m_tile} needs more shared memory per block than "
                       f"this GPU allows; m_tile <= {fits} fits (nvfp4_matmul chooses it by "
                       "itself)")
    return _cuda_gemm(ctx, x, qweight, qscales, global_scale, bias, n=np.int64(n),
                      k=np.int64(k), splits=np.int64(splits), m_tile=np.int64(m_tile),
                      has_bias=bool(has_bias), cluster=bool(cluster),
                      k_slices=np.int64(k_slices), tiles_per_block=np.int64(tiles_per_block))

  mlir.register_lowering(nvfp4_gemm_p, _gemm_cuda_lowering, platform="cuda")


def _gemm_batch(args, dims, **params):
  # The launch (splits, m_tile) is chosen again for the batched M, and so is nvfp4_matmul's
  # prefill dispatch (a batch of decode-sized calls can be a prefill-sized one); the workspace
  # is dropped.
  out = _batched(args, dims, lambda *ops: _gemm_or_dequant_dot(
      *ops, n=params["n"], k=params["k"], has_bias=params["has_bias"]))
  return (out, jnp.zeros((256,), jnp.uint8)), (0, None)


def _gemm_or_dequant_dot(x, qweight, qscales, global_scale, bias, *, n, k, has_bias):
  """nvfp4_matmul's choice for a prepared weight: above ``KERNEL_MAX_M`` tokens, where the
  kernel would run, dequantize + XLA GEMM; else the kernel primitive."""
  if int(np.prod(x.shape[:-1])) > KERNEL_MAX_M and _kernel_wanted():
    w = PreparedNVFP4Weight(qweight, qscales, global_scale, n=n, k=k)
    return _dequant_dot(x, w, bias if has_bias else None)
  return _bind_gemm(x, qweight, qscales, global_scale, bias, n=n, k=k, has_bias=has_bias)


batching.primitive_batchers[nvfp4_gemm_p] = _gemm_batch


def _bind_gemm(x, qweight, qscales, global_scale, bias, *, n, k, has_bias):
  m = int(np.prod(x.shape[:-1]))
  splits, m_tile = choose_launch(m, n, k)
  k_slices = choose_k_slices(m, n, k)
  if k_slices > 1:
    splits = 1
  out, _ = nvfp4_gemm_p.bind(x, qweight, qscales, global_scale, bias, n=n, k=k,
                             has_bias=has_bias, splits=splits, m_tile=m_tile,
                             cluster=use_cluster(splits, m_tile), k_slices=k_slices,
                             tiles_per_block=choose_tiles_per_block(n, k_slices,
                                                                    m_tile=m_tile, rows=m))
  return out


# ----------------------------------------------------------------------------- public API

def nvfp4_matmul(x: jax.Array, w: NVFP4Weight | PreparedNVFP4Weight,
                 bias: jax.Array | None = None) -> jax.Array:
  """``x @ dequantize(w).T + bias`` with the weight kept in NVFP4.

  Args:
    x: ``[..., K]`` bfloat16 or float16 activations (any leading dims, including M = 0).
    w: an ``NVFP4Weight`` (checkpoint layout) or a ``PreparedNVFP4Weight`` (kernel layout, from
      ``prepare``) with logical shape ``[N, K]``, K a multiple of 16. On a CUDA GPU with the
      kernels built, a prepared weight runs the NVFP4 kernel; an unprepared one is prepared on
      the fly inside the computation (call ``prepare`` once to avoid that cost). Elsewhere the
      reference lowering runs.
    bias: optional ``[N]`` float bias, added in float32 before the cast to ``x.dtype``.

  Returns:
    ``[..., N]`` in ``x.dtype``. Accumulation is float32; the result equals
    ``reference_matmul`` up to accumulation order, for block scales that are finite and >= 0
    (what the quantization tools write, and what the checkpoint loaders accept): a NaN block
    scale makes its block NaN on the checkpoint path but zero in a prepared weight (``prepare``
    zeroes it, the kernel cannot carry a NaN scale).
  """
  if not isinstance(w, (NVFP4Weight, PreparedNVFP4Weight)):
    raise TypeError("nvfp4_matmul: w must be an NVFP4Weight or PreparedNVFP4Weight, got "
                    f"{type(w).__name__}")
  if isinstance(w, PreparedNVFP4Weight):
    if w.gate_up_pairs:
      raise ValueError("nvfp4_matmul: w was prepared with gate_up_pairs=True (an MoE w13 row "
                       "order for fused_moe); prepare the [N, K] weight without it")
    if w.qweight.ndim != 4:
      raise ValueError(f"nvfp4_matmul: w must be one [N, K] weight (no leading dims), got a "
                       f"stacked PreparedNVFP4Weight of shape {w.shape}")
    if w.k % 16 or w.n < 1:
      raise ValueError(f"nvfp4_matmul: need N >= 1 and K a multiple of 16, got [N, K] = "
                       f"[{w.n}, {w.k}]")
  x = jnp.asarray(x)
  if bias is not None:
    bias = jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"nvfp4_matmul: bias must be floating, got {bias.dtype}")
    bias = bias.astype(jnp.float32)
  # Multi-device: custom_partitioning rules (jax_nvfp4/parallel/dense.py) run the rest per shard.
  from jax_nvfp4.parallel import dense as _parallel  # pylint: disable=import-outside-toplevel
  # One device: nothing to partition (and the partitioned wrapper's single-device lowering has
  # not been exercised on GPUs with the prefill dispatch).
  if _parallel.routing() and jax.device_count() > 1:
    return _parallel.partitioned_matmul(x, w, bias)
  if isinstance(w, NVFP4Weight) and _kernel_wanted():
    if len(w.shape) == 2:
      _check(x, w.packed, w.scales, w.global_scale, bias)
      w = prepare(w)
  if isinstance(w, PreparedNVFP4Weight):
    _check_prepared(x, w.qweight, w.qscales, w.global_scale, bias, w.n, w.k)
    return _gemm_or_dequant_dot(x, w.qweight, w.qscales, w.global_scale,
                                bias if bias is not None else jnp.zeros((0,), jnp.float32),
                                n=w.n, k=w.k, has_bias=bias is not None)
  ops = [x, w.packed, w.scales, w.global_scale] + ([bias] if bias is not None else [])
  return nvfp4_matmul_p.bind(*ops, has_bias=bias is not None)


#: Above this many tokens the GPU path dequantizes the weight to a temporary (e2m1 * block
#: scale, exact in bf16/fp16) and uses XLA's GEMM, applying the global scale to the fp32
#: result: the mma.sync kernel is tuned for decode and loses to cuBLAS at prefill sizes. The
#: crossover measured on an H100 lies between M = 512 and 1024 on the four benchmark shapes
#: (4096x14336: kernel 171 us vs 301 at M = 256, 554 vs 426 at M = 1024; NOTES_dense.md).
#: Tests lower it to exercise the kernel at large M.
KERNEL_MAX_M = 512


def _dequant_dot(x, w: PreparedNVFP4Weight, bias):
  """Prefill path: same semantics as the kernel (global scale and bias on the fp32 result)."""
  # Exact (a 2-bit-mantissa code times an E4M3 scale); csrc/nvfp4_dequant.cu on the GPU.
  w16 = dequantize_blocks(w, x.dtype)
  out = jnp.einsum("...k,nk->...n", x, w16, preferred_element_type=jnp.float32)
  out = out * w.global_scale
  if bias is not None:
    out = out + bias
  return out.astype(x.dtype)


def _kernel_wanted() -> bool:
  """Whether the default backend would run the CUDA kernel (decided at trace time)."""
  return "jax_nvfp4_gemm_cuda" in _ffi.REGISTERED and jax.default_backend() == "gpu"

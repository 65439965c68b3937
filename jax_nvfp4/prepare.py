"""``prepare()``: NVFP4 weights from checkpoint layout into the CUDA kernel's layout (pure JAX).

Run once per weight (it is jit-able, and cheap next to a forward pass, but not free). The layout
is described in csrc/nvfp4_tile.cuh; in short, for ``W[N, K]`` padded to ``N16 = ceil(N/16)``
tiles of 16 rows and ``K64 = ceil(K/64)`` chunks of 64 columns:

* ``qweight`` uint32 ``[N16, K64, 32, 4]``: for lane ``l = 4g + t`` and k16 step ``j`` of a
  chunk, one word holds the 8 codes of the mma.m16n8k16 A fragment: pair ``i = h + 2c`` is
  ``W[16*n16 + 8h + g][64*k64 + 16j + 8c + 2t + e]`` for ``e = 0, 1``. Code bit ``b`` (0: the
  mantissa, 1 and 2: the exponent, 3: the sign) of element ``e`` of pair ``i`` sits at word bit
  ``CODE_BIT_POSITIONS[i][e][b]``; the table is chosen so that three pairs decode to bf16 with
  one rotate and one mask each (csrc/nvfp4_tile.cuh explains it).
* ``qscales`` uint8 ``[N16, K64, 64]`` = ``[.., 8 g, 2 h, 4 j]``: the block scale of row
  ``16*n16 + 8h + g`` and k16 block ``4*k64 + j``, as UE5M3 (unsigned; 5 exponent bits, bias
  10; 3 mantissa bits): every E4M3 magnitude, subnormals included, is exact.
* ``global_scale`` float32: unchanged (the kernel folds its own exponent-bias constant).

Padding rows/columns hold code 0 with scale 1. Block scales that are zero, negative or NaN
(never written by the reference tools, but legal bytes) are made exact too: a zero/NaN-scale
block gets code 0 everywhere, a negative scale flips the sign bits of its block's codes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_nvfp4.format import BLOCK_SIZE, NVFP4Weight, pack_fp4, unpack_fp4

TILE_N = 16
CHUNK_K = 64
UE5M3_BIAS = 10
UE5M3_ONE = UE5M3_BIAS << 3

#: Word bit of code bit b (mantissa, exponent low, exponent high, sign) of element e of pair i:
#: CODE_BIT_POSITIONS[i][e][b]. Pairs 0-2 keep {m, e0, e1} contiguous and the sign 9 bits above
#: (mod 32), the pattern of a bf16 subnormal's bits 6, 7, 8 and 15: one rotate and one mask
#: decode them (pair 2's signs are swapped between the halves, which the rotate undoes). The
#: remaining 8 bits hold pair 3: exponent and sign already in place, the mantissa 8 bits up.
CODE_BIT_POSITIONS = (
    ((0, 1, 2, 9), (16, 17, 18, 25)),
    ((4, 5, 6, 13), (20, 21, 22, 29)),
    ((10, 11, 12, 19), (26, 27, 28, 3)),
    ((14, 7, 8, 15), (30, 23, 24, 31)),
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreparedNVFP4Weight:
  """An NVFP4 weight ``[N, K]`` in the dense kernel's layout (see the module docstring).

  Stacked (expert) weights carry leading dims ``[...]`` on all three arrays.

  Attributes:
    qweight: uint32 ``[..., ceil(N/16), ceil(K/64), 32, 4]``.
    qscales: uint8 ``[..., ceil(N/16), ceil(K/64), 64]`` (UE5M3 block scales).
    global_scale: float32 ``[...]`` (``[]`` for a single weight).
    n, k: the logical shape (static).
    dtype: default dtype of ``dequantize`` (static).
    gate_up_pairs: (static) the rows of a gated MoE w13 ``[gate; up]`` are stored in pairs of
      8 per 16-row tile (``prepare(w13, gate_up_pairs=True)``): tile t holds gate rows
      8t..8t+7 then up rows 8t..8t+7, so that the grouped GEMM applies the activation in its
      epilogue. ``unprepare`` restores ``[gate; up]``; ``n`` is the logical ``2I`` either way.
  """

  qweight: jax.Array
  qscales: jax.Array
  global_scale: jax.Array
  n: int = dataclasses.field(metadata=dict(static=True))
  k: int = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(default=jnp.bfloat16, metadata=dict(static=True))
  gate_up_pairs: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    """Logical shape ``(N, K)``, or ``(..., N, K)`` for stacked (expert) weights."""
    return (*self.qweight.shape[:-4], self.n, self.k)

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for a in (self.qweight, self.qscales, self.global_scale))


def kernel_shapes(n: int, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  n16, k64 = -(-n // TILE_N), -(-k // CHUNK_K)
  return (n16, k64, 32, 4), (n16, k64, 64)


def _e4m3_to_ue5m3(scales: jax.Array):
  """float8_e4m3fn -> (UE5M3 uint8 of |s|, sign flip mask, zero mask)."""
  # Barrier: scales made in the same jit must be read as rounded to E4M3 (see quantize).
  f = jax.lax.optimization_barrier(scales).astype(jnp.float32)
  bad = (f == 0) | jnp.isnan(f)
  mag = jnp.where(bad, 1.0, jnp.abs(f))
  bits = jax.lax.bitcast_convert_type(mag, jnp.uint32)
  exponent = (bits >> 23).astype(jnp.int32) - 127 + UE5M3_BIAS  # 1..18 for E4M3 magnitudes
  mantissa = (bits >> 20) & 7
  u = ((exponent.astype(jnp.uint32) << 3) | mantissa).astype(jnp.uint8)
  return u, f < 0, bad


def _ue5m3_to_float(u: jax.Array) -> jax.Array:
  u = u.astype(jnp.int32)
  return jnp.ldexp(1.0 + (u & 7).astype(jnp.float32) / 8.0, (u >> 3) - UE5M3_BIAS)


#: Rows per half of a gate/up pair in ``gate_up_pairs`` order: half a 16-row tile, so that the
#: grouped GEMM's m16n8k16 accumulator puts gate row g and its up row (g + 8) in one thread.
GATE_UP_PAIR_ROWS = TILE_N // 2


def interleave_gate_up(a: jax.Array, axis: int, pieces: int, inverse: bool = False) -> jax.Array:
  """Rows ``[gate; up]`` along ``axis`` -> ``[gate_0; up_0; gate_1; up_1; ...]`` in ``pieces``
  equal pieces (``inverse``: back). ``pieces = rows // 16`` gives ``gate_up_pairs`` order; the
  tensor-parallel split uses ``pieces = tp``."""
  shape = a.shape
  if shape[axis] % (2 * pieces):
    raise ValueError(f"gate/up reordering: {shape[axis]} rows (or tiles) of [gate; up] do not "
                     f"split into 2 x {pieces} equal pieces")
  order = (pieces, 2) if inverse else (2, pieces)
  blocks = a.reshape(*shape[:axis], *order, shape[axis] // (2 * pieces), *shape[axis + 1:])
  return jnp.swapaxes(blocks, axis, axis + 1).reshape(shape)


def prepare(w: NVFP4Weight, *, gate_up_pairs: bool = False) -> PreparedNVFP4Weight:
  """Repacks a checkpoint-layout ``NVFP4Weight`` ``[N, K]`` for the CUDA kernel. Exact.

  Returns a ``PreparedNVFP4Weight`` with ``qweight`` uint32 ``[N16, K64, 32, 4]``, ``qscales``
  uint8 ``[N16, K64, 64]`` (UE5M3) and ``global_scale`` float32 (unchanged), where
  ``N16 = ceil(N/16)`` and ``K64 = ceil(K/64)``: rows and columns are padded with code 0 (layout:
  the module docstring). Exact: ``dequantize(unprepare(prepare(w)))`` equals
  ``dequantize(w)`` (blocks with a NaN scale become zeros). Pure JAX and jit-able; do it once
  per weight, not per call.

  Stacked weights ``[..., N, K]`` (e.g. MoE experts ``[E, N, K]``) are prepared one by one (vmap):
  ``qweight [..., N16, K64, 32, 4]``, ``qscales [..., N16, K64, 64]``, ``global_scale [...]``.

  ``gate_up_pairs=True`` (a gated MoE w13 ``[..., 2I, H]`` with rows ``[gate; up]``, ``I`` a
  multiple of 8) stores the rows in gate/up pairs of 8 per tile (``PreparedNVFP4Weight``
  docstring): ``fused_moe`` then applies the activation inside GEMM 1 on the CUDA kernel.
  """
  if not isinstance(w, NVFP4Weight):
    raise TypeError(f"prepare expects an NVFP4Weight, got {type(w).__name__}")
  w.validate()
  if gate_up_pairs:
    n = w.shape[-2]
    if n % TILE_N:
      raise ValueError(f"prepare: gate_up_pairs needs [gate; up] rows N = 2I with I a multiple "
                       f"of {GATE_UP_PAIR_ROWS} (N % {TILE_N} == 0), got N = {n}")
    axis = len(w.shape) - 2
    paired = dataclasses.replace(w, packed=interleave_gate_up(w.packed, axis, n // TILE_N),
                                 scales=interleave_gate_up(w.scales, axis, n // TILE_N))
    return dataclasses.replace(prepare(paired), gate_up_pairs=True)
  if len(w.shape) > 2:
    fn = _prepare_2d
    for _ in w.shape[:-2]:
      fn = jax.vmap(fn)
    return fn(w)
  return _prepare_2d(w)


# Reshapes that change one group of dims at a time. A weight sharded over Explicit mesh axes
# (jax.make_mesh's default) carries its sharding in its type, and jnp.reshape can only infer the
# result's sharding when a single run of dims is split or merged; the tile layout regroups both
# N and K, so each is done in its own reshape.

def _split(a: jax.Array, axis: int, sizes: tuple[int, ...]) -> jax.Array:
  """``a`` with dim ``axis`` split into ``sizes`` (major first)."""
  return a.reshape(*a.shape[:axis], *sizes, *a.shape[axis + 1:])


def _merge(a: jax.Array, start: int, stop: int) -> jax.Array:
  """``a`` with dims ``start..stop-1`` merged into one."""
  return a.reshape(*a.shape[:start], int(np.prod(a.shape[start:stop])), *a.shape[stop:])


def _bit_positions(pair: jax.Array, elem: jax.Array) -> list[jax.Array]:
  """Word bit of each code bit (list over b) for broadcastable uint32 pair / element indices."""
  table = jnp.asarray(CODE_BIT_POSITIONS, jnp.uint32)                  # [pair, elem, bit]
  return [table[pair, elem, b] for b in range(4)]


def _prepare_2d(w: NVFP4Weight) -> PreparedNVFP4Weight:
  n, k = w.shape
  n16, k64 = -(-n // TILE_N), -(-k // CHUNK_K)
  codes = unpack_fp4(w.packed).astype(jnp.uint32)                      # [N, K]
  u, negative, bad = _e4m3_to_ue5m3(w.scales)                          # [N, K/16]
  # Each block's flag on its 16 elements (a broadcast and a merge: jnp.repeat cannot infer the
  # sharding of a dim split over Explicit axes, see _split).
  per_elem = lambda b: _merge(jnp.broadcast_to(b[..., None], (*b.shape, BLOCK_SIZE)), 1, 3)
  codes = jnp.where(per_elem(bad), 0, codes ^ (per_elem(negative).astype(jnp.uint32) << 3))
  codes = jnp.pad(codes, ((0, n16 * TILE_N - n), (0, k64 * CHUNK_K - k)))
  u = jnp.pad(u, ((0, n16 * TILE_N - n), (0, k64 * 4 - k // BLOCK_SIZE)),
              constant_values=UE5M3_ONE)

  # codes[n16, h, g, k64, j, c, t, e]
  c8 = _split(_split(codes, 1, (k64, 4, 2, 4, 2)), 0, (n16, 2, 8))
  h = jnp.arange(2, dtype=jnp.uint32).reshape(1, 2, 1, 1, 1, 1, 1, 1)
  c = jnp.arange(2, dtype=jnp.uint32).reshape(1, 1, 1, 1, 1, 2, 1, 1)
  e = jnp.arange(2, dtype=jnp.uint32).reshape(1, 1, 1, 1, 1, 1, 1, 2)
  pos = _bit_positions(h + 2 * c, e)
  bits = sum(((c8 >> b) & 1) << pos[b] for b in range(4))
  words = bits.sum(axis=(1, 5, 7), dtype=jnp.uint32)                   # [n16, g, k64, j, t]
  qweight = words.transpose(0, 2, 1, 4, 3).reshape(n16, k64, 32, 4)

  u = _split(_split(u, 1, (k64, 4)), 0, (n16, 2, 8))                    # [n16, h, g, k64, j]
  qscales = u.transpose(0, 3, 2, 1, 4).reshape(n16, k64, 64)
  return PreparedNVFP4Weight(qweight, qscales, w.global_scale.astype(jnp.float32), n=n, k=k,
                             dtype=w.dtype)


def unprepare(p: PreparedNVFP4Weight) -> NVFP4Weight:
  """Inverse of ``prepare`` (up to the normalisations of zero/negative/NaN block scales).

  Returns an ``NVFP4Weight`` ``[N, K]`` (padding dropped): packed uint8 ``[N, K/2]``, scales
  float8_e4m3fn ``[N, K/16]``, the same float32 global scale and ``dtype``. Stacked prepared
  weights (``qweight [..., N16, K64, 32, 4]``) give ``NVFP4Weight [..., N, K]``. A
  ``gate_up_pairs`` weight comes back in ``[gate; up]`` row order.
  """
  if p.gate_up_pairs:
    w = unprepare(dataclasses.replace(p, gate_up_pairs=False))
    axis = len(w.shape) - 2
    pieces = p.n // TILE_N
    return dataclasses.replace(w, packed=interleave_gate_up(w.packed, axis, pieces, True),
                               scales=interleave_gate_up(w.scales, axis, pieces, True))
  if p.qweight.ndim > 4:
    fn = _unprepare_2d
    for _ in p.qweight.shape[:-4]:
      fn = jax.vmap(fn)
    return fn(p)
  return _unprepare_2d(p)


def _unprepare_2d(p: PreparedNVFP4Weight) -> NVFP4Weight:
  n16, k64 = p.qweight.shape[:2]
  words = p.qweight.reshape(n16, k64, 8, 4, 4).transpose(0, 2, 1, 4, 3)  # [n16, g, k64, j, t]
  words = words[:, None, :, :, :, None, :, None]
  h = jnp.arange(2, dtype=jnp.uint32).reshape(1, 2, 1, 1, 1, 1, 1, 1)
  c = jnp.arange(2, dtype=jnp.uint32).reshape(1, 1, 1, 1, 1, 2, 1, 1)
  e = jnp.arange(2, dtype=jnp.uint32).reshape(1, 1, 1, 1, 1, 1, 1, 2)
  pos = _bit_positions(h + 2 * c, e)
  codes = sum(((words >> pos[b]) & 1) << b for b in range(4))
  codes = _merge(_merge(codes, 3, 8), 0, 3)[:p.n, :p.k]                # [N, K]
  u = p.qscales.reshape(n16, k64, 8, 2, 4).transpose(0, 3, 2, 1, 4)    # [n16, h, g, k64, j]
  u = _merge(_merge(u, 3, 5), 0, 3)                                    # [N16*16, K64*4]
  scales = _ue5m3_to_float(u[:p.n, :p.k // BLOCK_SIZE]).astype(jnp.float8_e4m3fn)
  return NVFP4Weight(pack_fp4(codes.astype(jnp.uint8)), scales, p.global_scale, dtype=p.dtype)

// The NVFP4 W4A16 kernels: one template for the dense GEMM and the grouped MoE GEMM. The main
// loop (layout, dequant, pipeline) is in nvfp4_tile.cuh; this file maps blocks to rows and
// experts and holds the epilogue and the split-K reduction.
//
// Dense: block (x, y, z) = (N block of 128 rows, K split, token tile of 8*MT rows); token slot
// r of tile z is output row z*8*MT + r (rows past M are skipped).
//
// MoE: the token tile z is one block of the aligned (sorted, padded) row list: slot r holds
// sorted_ids[z*8*MT + r]; an id >= rows_out is padding. The tile's expert is block_expert[z]
// (-1: not local, skip the tile); tiles at or past num_padded[0] are empty. x rows are read at
// id / gather_div (gather_div = top_k for the first GEMM, which reads each token once per
// choice; 1 for the second), results are written to row id, times topk_weights[id] when given.
//
// Split K. At small M there are too few N tiles to fill the SMs, so K is split over gridDim.y.
// Each split writes an fp32 partial [split][slot][N]; the last block to finish a tile (atomic
// ticket) sums the partials in split order 0..S-1, so the result is bitwise deterministic.
// Workspace: tickets (int32, one per (token tile, N block), padded to 256 B), then the partials.
//
// Split K in a cluster (sm_90, p.cluster): the splits of a tile are one thread-block cluster
// along y and reduce through distributed shared memory instead. The ticket path costs several
// dependent global round trips at the end of every block (store partials, fence, atomic, load
// partials) at a time when the memory queues are full, plus a memset before the launch: 4-9 us
// per call on the H100 (benchmarks/NOTES_dense.md v7). In the cluster, once every block is done
// with its pipeline ring, thread i of each block writes its accumulators into the ring of block
// i % S (a reduce-scatter); after a second cluster barrier each block sums its share in split
// order 0..S-1 with the same fp32 additions as the ticket path (identical bits) and stores it.
// No workspace, no memset, no atomics.
#pragma once

#include <cmath>
#include <cstdlib>
#include <mutex>
#include <string>

#include "nvfp4_tile.cuh"

namespace jax_nvfp4 {

struct GemmParams {
  const void *x;              // [x_rows, K]
  const uint4 *qweight;       // [E][N16][K64][32] uint4 (E = 1 for dense)
  const uint4 *qscales;       // [E][N16][K64][4] uint4
  const float *global_scale;  // [E]
  const float *bias;          // [E][N] or null
  void *out;                  // [rows_out, N]
  float *partials;            // [splits][slots][N] when splits > 1
  int *tickets;               // one per (token tile, N block) when splits > 1
  int rows_out, n, k, n16, k64;
  int splits;                 // K splits per tile (gridDim.y)
  int tiles_per_block;        // consecutive N blocks per block (> 1 only with splits = 1)
  int slots;                  // token slots in all tiles: M (dense) or the padded length (MoE)
  bool cluster;               // splits > 1 reduce in a cluster of the splits (sm_90 only)
  // MoE only.
  const int *sorted_ids;      // [slots]
  const int *block_expert;    // [slots / (8*MT)]
  const int *num_padded;      // [1]
  const float *topk_weights;  // [rows_out] or null
  int gather_div;
  // The activation fused into the epilogue (MoE GEMM 1; kActNone elsewhere). Gated ones read
  // gate and up from the two halves of each 16-row N tile (rows g and g + 8: the same thread
  // holds both) and write out[row, tile * 8 + g], so out is [rows_out, N / 2]; see below.
  int act;
  float act_limit;            // the clamp L of kActSwiglu (+inf: none) and kActGptOss
  float act_alpha;            // kActGptOss's sigmoid slope
};

// Activation codes (ops/moe.py ACTIVATION_CODES). The gated ones need N % 16 == 0 and w13's rows
// in gate/up pairs of 8 (jax_nvfp4/prepare.py gate_up_pairs): rows 16t .. 16t + 7 are gate rows
// 8t .. 8t + 7 and rows 16t + 8 .. 16t + 15 the matching up rows.
constexpr int kActNone = 0;
constexpr int kActSwiglu = 1;  // min(silu(gate), L) * clamp(up, -L, L)
constexpr int kActGptOss = 2;  // g * sigmoid(alpha g) * (clamp(up, -L, L) + 1), g = min(gate, L)
constexpr int kActRelu2 = 3;   // relu(v)^2, not gated
__host__ __device__ constexpr bool act_gated(int act) {
  return act == kActSwiglu || act == kActGptOss;
}

// A gated activation of one (gate, up) pair, in fp32 after the global scale and the bias, with
// the same formulas as jax_nvfp4/moe/activations.py (which the reference applies). The sigmoid
// uses the fast exp and division (a few ulp of fp32, far below the bf16/fp16 result's
// rounding): a k-sliced block's first warp runs this for every tile it finishes while the
// other warps go on, and the IEEE versions slowed the Mixtral-like GEMM 1 at T = 1 by 5 %.
__device__ __forceinline__ float sigmoid_times(float v, float slope) {
  return __fdividef(v, 1.f + __expf(-slope * v));  // v * sigmoid(slope * v); 0 as v -> -inf
}
__device__ __forceinline__ float gated_act(const GemmParams &p, float gate, float up) {
  const float lim = p.act_limit;
  if (p.act == kActGptOss) {
    const float g = fminf(gate, lim);
    return sigmoid_times(g, p.act_alpha) * (fminf(fmaxf(up, -lim), lim) + 1.f);
  }
  const float a = sigmoid_times(gate, 1.f);
  if (lim < INFINITY) return fminf(a, lim) * fminf(fmaxf(up, -lim), lim);
  return a * up;
}

// Largest cluster the reduction supports (non-portable above 8; the H100 schedules 16).
constexpr int kMaxClusterSplits = 16;

// Barrier over every thread of the cluster; release/acquire orders shared-memory accesses
// (local and remote) before it against those after it.
__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n"
               "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();  // the host launches the cluster path only for code built for sm_90
#endif
}

// Stores v at shared address `addr` of the cluster's block `rank`.
__device__ __forceinline__ void st_cluster_f32x4(uint32_t addr, uint32_t rank, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(rank));
  asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n"
               :: "r"(remote), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
#else
  __trap();
#endif
}

// Lab knob (benchmarks/moe_pair_lab.cu, NOTES_moe.md v27): the grouped GEMM reads its tile's
// expert before waiting for the previous grid and warms L2 with that expert's first ring.
#ifndef JAX_NVFP4_MOE_EARLY_EXPERT
#define JAX_NVFP4_MOE_EARLY_EXPERT 0
#endif

// Programmatic dependent launch (sm_90+; no-ops below). A kernel launched with programmatic
// stream serialization may start while the kernel before it in the stream is still running,
// once every block of that kernel has called allow_dependents() or exited. It must not read
// or write memory another kernel touches before wait_for_prior_grids(), which returns when the
// earlier grids have completed and their writes are visible (immediately when the launch was
// not programmatic).
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// A hint, not a read: the line is fetched into L2, the point of coherence of device memory, so
// a prefetch issued while an earlier kernel may still write the line cannot make a later load
// see stale data.
__device__ __forceinline__ void prefetch_l2(const void *p) {
  asm volatile("prefetch.global.L2 [%0];\n" :: "l"(p));
}

// Output row of token slot `slot`, or -1 when the slot holds no row.
template <bool kMoe>
__device__ __forceinline__ int slot_row(const GemmParams &p, int slot) {
  if constexpr (kMoe) {
    const int id = __ldg(p.sorted_ids + slot);
    return id >= 0 && id < p.rows_out ? id : -1;
  } else {
    return slot < p.rows_out ? slot : -1;
  }
}

// Resident blocks per SM each instantiation is compiled for (its register cap). The unsliced
// m_tile-1 block is small enough for three: left at two, ptxas took 96-116 registers once the
// epilogue grew the fused activations (80 before), and the grouped GEMM's decode launches lost
// a third of their blocks (Qwen3-like layer at T = 16: +8 %, NOTES_moe.md v17).
template <int MT, int KS>
constexpr int min_blocks_per_sm() {
  return MT == 8 ? JAX_NVFP4_MT8_BLOCKS : MT == 1 && KS == 1 ? 3 : 2;
}

// KS > 1 (k-slices inside the block, nvfp4_tile.cuh) is launched with splits = 1 only: the
// block's warps already cover the whole K range, and the cross-block reductions are compiled out.
// XR < 8 * MT (x rows held, nvfp4_tile.cuh TileConfig; k-sliced m_tile 1 only) is launched for
// dense tiles of at most XR rows (launch_typed checks), and for MoE tiles of any content: a
// grouped-GEMM block runs its tile in passes of XR slots, one pass per group of slots that holds
// a row. At decode with T tokens an expert's tile holds at most T rows (top-k experts of a token
// are distinct; the alignment puts an expert's rows first in its tile), so the launch picks XR
// from T and one pass runs; a tile with more rows (repeated expert ids in a caller's top-k) costs
// more passes, never a lost row.
template <typename T, int MT, bool kMoe, int KS = 1, int XR = 8 * MT, int SC = 0>
__global__ void __launch_bounds__(kThreads, (min_blocks_per_sm<MT, KS>())) nvfp4_kernel(const GemmParams p) {
  constexpr bool kShortMoe = kMoe && XR < 8 * MT;
  using Tr = Half2Traits<T>;
  using Cfg = TileConfig<MT, KS, XR, SC>;
  constexpr int NT = Cfg::kTilesPerBlock;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int sub = warp % NT, slice = warp / NT;
  const int g = lane >> 2;
  const int t = lane & 3;
  JAX_NVFP4_LAB_MARK(0, p.n16);
  const int units_per_tile = (p.k64 + Cfg::kChunksPerUnit - 1) / Cfg::kChunksPerUnit;
  const int slot0 = blockIdx.z * 8 * MT;

  // This block's units (see tile_mainloop): split blockIdx.y of tile blockIdx.x, or with
  // tiles_per_block > 1 (splits = 1) the whole K range of that many consecutive tiles, one
  // pipeline running across them (a block's fixed costs are paid once for several tiles).
  const int tile_base = blockIdx.x * p.tiles_per_block * units_per_tile;
  int u_begin, u_end;
  if (p.tiles_per_block > 1) {
    const int tiles = (p.n16 + NT - 1) / NT;
    u_begin = tile_base;
    u_end = min(tiles, (blockIdx.x + 1) * p.tiles_per_block) * units_per_tile;
  } else {
    u_begin = tile_base +
              static_cast<int>((static_cast<int64_t>(units_per_tile) * blockIdx.y) / p.splits);
    u_end = tile_base +
            static_cast<int>((static_cast<int64_t>(units_per_tile) * (blockIdx.y + 1)) / p.splits);
  }

  // Launched early (programmatic dependent launch), the block warms L2 with the weights of
  // its first ring of units while the previous kernel finishes. Each N tile's run of k64
  // chunks is contiguous; its KS warps take 32 lines of 128 bytes each, then the scale lines.
  auto warm_first_ring = [&](int64_t expert_off) {
    const int tile_n = (u_begin / units_per_tile) * NT + sub;
    if (tile_n < p.n16) {
      const int chunk0 = (u_begin % units_per_tile) * Cfg::kChunksPerUnit;
      const int chunks = min((u_end - u_begin) * Cfg::kChunksPerUnit,
                             min(Cfg::kStages * Cfg::kChunksPerUnit, p.k64 - chunk0));
      const int64_t at = expert_off + static_cast<int64_t>(tile_n) * p.k64 + chunk0;
      const int line = slice * 32 + lane;
      if (line * 128 < chunks * 512) prefetch_l2(p.qweight + at * 32 + line * 8);
      if (line * 128 < chunks * 64) prefetch_l2(p.qscales + at * 4 + line * 8);
    }
  };
  if constexpr (!kMoe) {
    warm_first_ring(0);
  } else if constexpr (JAX_NVFP4_MOE_EARLY_EXPERT) {
    // Lab knob (moe_pair_lab.cu): the tile's expert read before the wait, so that its weights
    // warm L2 too. Safe only where the alignment was complete before the previous grid's
    // blocks passed their own wait (GEMM 2 after GEMM 1 in one handler), which a custom call
    // cannot know: off in the library.
    const int expert = __ldg(p.block_expert + blockIdx.z);
    if (slot0 < __ldg(p.num_padded) && expert >= 0)
      warm_first_ring(static_cast<int64_t>(expert) * p.n16 * p.k64);
  }
  wait_for_prior_grids();

  // The token rows of this thread's x pieces (short MoE tiles: none here, each pass sets its
  // own below). For MoE these loads, the padded length and the tile's expert are independent
  // (every index is in bounds), so all go out together: a block's start is one global round
  // trip, not three in a row.
  int piece_row[Cfg::kXPerThread];
#pragma unroll
  for (int i = 0; i < Cfg::kXPerThread; ++i) {
    const int piece = Cfg::kRowGroups ? Cfg::grouped_x_piece(threadIdx.x, i)
                                     : threadIdx.x + i * kThreads;
    piece_row[i] = !kShortMoe && piece < Cfg::kXPieces
                       ? slot_row<kMoe>(p, slot0 + piece / Cfg::kXPiecesPerRow)
                       : -1;
  }
  // Short MoE tiles: every slot's row (threads 0-7), for the passes, in the same round trip.
  int own_row = -1;
  if constexpr (kShortMoe) {
    if (threadIdx.x < 8 * MT) own_row = slot_row<kMoe>(p, slot0 + threadIdx.x);
  }
  int expert = 0;
  if constexpr (kMoe) {
    const int padded = __ldg(p.num_padded);
    expert = __ldg(p.block_expert + blockIdx.z);
    // Whole block leaves together (before any barrier).
    if (slot0 >= padded || expert < 0) return;
  }

  // The output row of each token slot of the tile, for the epilogue: the rows are already in
  // the registers of the threads holding each row's first x piece (no second load), and the
  // mainloop's first barrier orders these writes before any epilogue.
  __shared__ int tile_rows[8 * MT];
  // Where output row `row` reads its x row (null: no token).
  auto x_row = [&](int row) -> const T * {
    const int xrow = kMoe ? row / p.gather_div : row;
    return row >= 0 ? static_cast<const T *>(p.x) + static_cast<int64_t>(xrow) * p.k : nullptr;
  };
  const T *xsrc[Cfg::kXPerThread];
#pragma unroll
  for (int i = 0; i < Cfg::kXPerThread; ++i) {
    const int row = piece_row[i];
    xsrc[i] = x_row(row);
    const int piece = Cfg::kRowGroups ? Cfg::grouped_x_piece(threadIdx.x, i)
                                     : threadIdx.x + i * kThreads;
    if (!kShortMoe && piece < Cfg::kXPieces && piece % Cfg::kXPiecesPerRow == 0)
      tile_rows[piece / Cfg::kXPiecesPerRow] = row;
  }
  if constexpr (kShortMoe) {
    if (threadIdx.x < 8 * MT) tile_rows[threadIdx.x] = own_row;
  }
  // The tile slot that MMA column (x tile row) 0 stands for: 0, or a short MoE tile's pass.
  int row_base = 0;
  // Output row of MMA column `slot` (0 .. 8 * MT - 1) of the tile, or -1.
  auto column_row = [&](int slot) -> int {
    if constexpr (kShortMoe) {
      return slot < XR ? tile_rows[row_base + slot] : -1;
    } else if constexpr (kMoe) {
      return tile_rows[slot];
    } else {
      return slot_row<false>(p, slot0 + slot);
    }
  };

  const float gscale = __ldg(p.global_scale + expert) * Tr::kUnbias;
  const float *bias = p.bias != nullptr ? p.bias + static_cast<int64_t>(expert) * p.n : nullptr;
  // A gated activation halves the output row: out is [rows_out, N / 2] (N % 16 == 0 then).
  const bool gated = act_gated(p.act);
  const int out_n = gated ? p.n >> 1 : p.n;
  // The value of N row n before any activation: scaled, plus the bias.
  auto scaled = [&](float v, int n) {
    v *= gscale;
    if (bias != nullptr) v += __ldg(bias + n);
    return v;
  };
  auto plain_act = [&](float v) {
    if (p.act == kActRelu2) {
      v = fmaxf(v, 0.f);
      v *= v;
    }
    return v;
  };
  auto store = [&](int row, int n, float v) {
    v = plain_act(scaled(v, n));
    if constexpr (kMoe) {
      if (p.topk_weights != nullptr) v *= __ldg(p.topk_weights + row);
    }
    static_cast<T *>(p.out)[static_cast<int64_t>(row) * p.n + n] = static_cast<T>(v);
  };
  // Gated: the gate at N row n_gate (tile row g < 8) and its up at n_gate + 8 give output column
  // tile * 8 + g.
  auto store_gated = [&](int row, int n_gate, float gate, float up) {
    float v = gated_act(p, scaled(gate, n_gate), scaled(up, n_gate + 8));
    if constexpr (kMoe) {
      if (p.topk_weights != nullptr) v *= __ldg(p.topk_weights + row);
    }
    const int col = (n_gate >> 4) * 8 + (n_gate & 7);
    static_cast<T *>(p.out)[static_cast<int64_t>(row) * out_n + col] = static_cast<T>(v);
  };
  // Columns n and n + 1 of one row (the same arithmetic as store, per value, kept apart from it:
  // the shared per-value helpers tried added branches per value, up to 344 more SASS lines);
  // one 4-byte store where both are in range and the row stride keeps it aligned.
  const bool even_n = (p.n & 1) == 0;
  auto store_pair = [&](int row, int n, float v0, float v1, float weight) {
    v0 *= gscale;
    v1 *= gscale;
    if (bias != nullptr) {
      if (n < p.n) v0 += __ldg(bias + n);
      if (n + 1 < p.n) v1 += __ldg(bias + n + 1);
    }
    v0 = plain_act(v0);
    v1 = plain_act(v1);
    if constexpr (kMoe) {
      if (p.topk_weights != nullptr) {
        v0 *= weight;
        v1 *= weight;
      }
    }
    T *dst = static_cast<T *>(p.out) + static_cast<int64_t>(row) * p.n + n;
    if (even_n && n + 1 < p.n) {
      *reinterpret_cast<typename Tr::T2 *>(dst) = Tr::pack(v0, v1);
    } else {
      if (n < p.n) dst[0] = static_cast<T>(v0);
      if (n + 1 < p.n) dst[1] = static_cast<T>(v1);
    }
  };
  // Gated, the whole-K path: gate rows n and n + 1 (n even, in the tile's first half) and their
  // up rows n + 8, n + 9 make output columns col, col + 1 of one row: one 4-byte store (N / 2
  // is a multiple of 8).
  auto store_gated_pair = [&](int row, int n, float g0, float g1, float u0, float u1,
                              float weight) {
    float v0 = gated_act(p, scaled(g0, n), scaled(u0, n + 8));
    float v1 = gated_act(p, scaled(g1, n + 1), scaled(u1, n + 9));
    if constexpr (kMoe) {
      if (p.topk_weights != nullptr) {
        v0 *= weight;
        v1 *= weight;
      }
    }
    const int col = (n >> 4) * 8 + (n & 7);
    *reinterpret_cast<typename Tr::T2 *>(static_cast<T *>(p.out) +
                                         static_cast<int64_t>(row) * out_n + col) =
        Tr::pack(v0, v1);
  };
  __shared__ int is_last;

  // Accumulator (mt, r) of tile `tile` is output column (token slot) slot0 + mt*8 + 2t + (r & 1),
  // N row n_lo or n_hi (r >= 2).
  auto epilogue = [&](int tile, float (&acc)[MT][4]) {
    // Every load of the block is issued: the next kernel in the stream may start its blocks
    // (they wait for this grid to complete before they touch its memory).
    allow_dependents();
    const int tile_n = tile * NT + sub;
    const bool active = tile_n < p.n16 && slice == 0;  // slice 0 holds the block's sums
    const int n_lo = tile_n * 16 + g;
    const int n_hi = n_lo + 8;
    const int tile_begin = tile * units_per_tile;
    if (u_begin <= tile_begin && u_end >= tile_begin + units_per_tile) {  // the whole K range
      if (!active) return;  // warp-uniform: the shuffles below see all 32 lanes
      // Lanes g and g ^ 1 (lane ^ 4) swap one row's values, so that each holds one row at two
      // adjacent columns: even g keeps slot 2t (columns g, g + 1 and g + 8, g + 9), odd g slot
      // 2t + 1. Half the stores of one value each, and half the row / top-k weight lookups.
      // The top-k weights are loaded first, all MT at once: one round trip per tile.
      const bool even = (g & 1) == 0;
      const int n0 = tile_n * 16 + (g & ~1);
      float weight[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        weight[mt] = 1.f;
        if constexpr (kMoe) {
          const int row = column_row(mt * 8 + 2 * t + (even ? 0 : 1));
          if (p.topk_weights != nullptr && row >= 0) weight[mt] = __ldg(p.topk_weights + row);
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const float got_lo = __shfl_xor_sync(0xffffffffu, even ? acc[mt][1] : acc[mt][0], 4);
        const float got_hi = __shfl_xor_sync(0xffffffffu, even ? acc[mt][3] : acc[mt][2], 4);
        const int slot = mt * 8 + 2 * t + (even ? 0 : 1);
        const int row = column_row(slot);
        if (row < 0) continue;
        const float lo0 = even ? acc[mt][0] : got_lo, lo1 = even ? got_lo : acc[mt][1];
        const float hi0 = even ? acc[mt][2] : got_hi, hi1 = even ? got_hi : acc[mt][3];
        if (gated) {
          store_gated_pair(row, n0, lo0, lo1, hi0, hi1, weight[mt]);
          continue;
        }
        store_pair(row, n0, lo0, lo1, weight[mt]);
        store_pair(row, n0 + 8, hi0, hi1, weight[mt]);
      }
      return;
    }
    if constexpr (KS > 1) {
      return;  // launched with splits = 1 only (never reached)
    } else {
    if (p.cluster) {
      // Every thread of every block of the cluster gets here exactly once (one tile per block).
      constexpr int V = MT * 4;
      const int splits = p.splits;
      const int per = (kThreads + splits - 1) / splits;  // source threads per owner block
      cp_async_wait<0>();
      cluster_barrier();  // all blocks are done with their rings: reuse them as receive buffers
      extern __shared__ __align__(1024) unsigned char smem[];
      const uint32_t slot_addr =
          smem_addr(smem) + ((blockIdx.y * per + threadIdx.x / splits) * V) * 4;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        st_cluster_f32x4(slot_addr + mt * 16, threadIdx.x % splits,
                         make_float4(acc[mt][0], acc[mt][1], acc[mt][2], acc[mt][3]));
      cluster_barrier();
      // This block owns source thread src = i * splits + blockIdx.y of every split.
      const int i = threadIdx.x;
      const int src = i * splits + blockIdx.y;
      if (i >= per || src >= kThreads) return;
      const int src_warp = src >> 5, src_g = (src & 31) >> 2, src_t = src & 3;
      const int src_tile_n = tile * kWarps + src_warp;
      if (src_tile_n >= p.n16) return;
      const int s_lo = src_tile_n * 16 + src_g, s_hi = s_lo + 8;
      const float *recv = reinterpret_cast<const float *>(smem) + i * V;
      auto sum_of = [&](int mt, int r) {
        float sum = 0.f;
#pragma unroll 1
        for (int s = 0; s < splits; ++s) sum += recv[s * per * V + mt * 4 + r];
        return sum;
      };
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if (gated) {  // r = e is the gate (s_lo), r = 2 + e its up (s_hi)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int row = slot_row<kMoe>(p, slot0 + mt * 8 + 2 * src_t + e);
            if (row >= 0) store_gated(row, s_lo, sum_of(mt, e), sum_of(mt, 2 + e));
          }
          continue;
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = slot_row<kMoe>(p, slot0 + mt * 8 + 2 * src_t + (r & 1));
          const int n = r < 2 ? s_lo : s_hi;
          if (row < 0 || n >= p.n) continue;
          store(row, n, sum_of(mt, r));
        }
      }
      return;
    }

    // Part of the K range: an fp32 partial [split][slot][N], then the last split to finish
    // the tile (atomic ticket) sums all parts in split order: bitwise deterministic.
    const int64_t sn = static_cast<int64_t>(p.slots) * p.n;
    float *mine = p.partials + blockIdx.y * sn;
    if (active) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int slot = slot0 + mt * 8 + 2 * t + e;
          if (slot_row<kMoe>(p, slot) < 0) continue;
          if (n_lo < p.n) __stcg(mine + static_cast<int64_t>(slot) * p.n + n_lo, acc[mt][e]);
          if (n_hi < p.n) __stcg(mine + static_cast<int64_t>(slot) * p.n + n_hi, acc[mt][2 + e]);
        }
      }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      const int ticket = atomicAdd(p.tickets + blockIdx.z * gridDim.x + tile, 1);
      is_last = ticket == p.splits - 1;
    }
    __syncthreads();
    if (!is_last || !active) return;
    __threadfence();
    auto reduce = [&](int slot, int n) {
      const int64_t off = static_cast<int64_t>(slot) * p.n + n;
      float sum = 0.f;
      for (int i = 0; i < p.splits; ++i) sum += __ldcg(p.partials + i * sn + off);
      return sum;
    };
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int slot = slot0 + mt * 8 + 2 * t + e;
        const int row = slot_row<kMoe>(p, slot);
        if (row < 0) continue;
        if (gated) {
          store_gated(row, n_lo, reduce(slot, n_lo), reduce(slot, n_hi));
          continue;
        }
        if (n_lo < p.n) store(row, n_lo, reduce(slot, n_lo));
        if (n_hi < p.n) store(row, n_hi, reduce(slot, n_hi));
      }
    }
    }  // KS == 1
  };

  const int64_t expert_off = static_cast<int64_t>(expert) * p.n16 * p.k64;
  if constexpr (!kShortMoe) {
    tile_mainloop<T, MT, KS, XR, SC>(p.qweight + expert_off * 32, p.qscales + expert_off * 4,
                                     p.n16, p.k64, xsrc, p.x, p.k, units_per_tile, u_begin, u_end,
                                     epilogue);
  } else {
    // One pass over the block's units per group of XR slots that holds a row (see above).
    __syncthreads();  // tile_rows, written above by threads 0-7, is read by all
    bool ran = false;
#pragma unroll 1
    for (row_base = 0; row_base < 8 * MT; row_base += XR) {
      bool any = false;
#pragma unroll
      for (int r = 0; r < XR; ++r) any |= tile_rows[row_base + r] >= 0;
      if (!any) continue;  // block-uniform: every thread reads the same slots
      if (ran) __syncthreads();  // the last pass's ring reads and epilogue are done
#pragma unroll
      for (int i = 0; i < Cfg::kXPerThread; ++i) {
        const int piece = Cfg::kRowGroups ? Cfg::grouped_x_piece(threadIdx.x, i)
                                     : threadIdx.x + i * kThreads;
        xsrc[i] = x_row(piece < Cfg::kXPieces ? tile_rows[row_base + piece / Cfg::kXPiecesPerRow]
                                              : -1);
      }
      tile_mainloop<T, MT, KS, XR, SC>(p.qweight + expert_off * 32, p.qscales + expert_off * 4,
                                       p.n16, p.k64, xsrc, p.x, p.k, units_per_tile, u_begin,
                                       u_end, epilogue);
      ran = true;
    }
  }
  JAX_NVFP4_LAB_MARK(3, p.n16);
}

inline int64_t ticket_bytes(int64_t token_tiles, int64_t n_blocks) {
  return (token_tiles * n_blocks * 4 + 255) / 256 * 256;
}

// Function attributes (the shared-memory and cluster opt-ins) and what the loaded code can do
// belong to one device: the runtime applies them in the current device's context, so a process
// driving several GPUs must set them on each. `compute()` runs once per device (up to
// kMaxDevices; beyond, on every call) and its answer is kept. Each call site's lambda type
// gives it its own table.
constexpr int kMaxDevices = 64;

template <typename F>
auto per_device(F compute) -> decltype(compute()) {
  using V = decltype(compute());
  static std::once_flag done[kMaxDevices];
  static V value[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();  // not the next launch's error
    return compute();
  }
  if (device < 0 || device >= kMaxDevices) return compute();
  std::call_once(done[device], [&] { value[device] = compute(); });
  return value[device];
}

// An attribute of the current device, 0 where there is none (no device, or the query failed).
inline int device_attribute(cudaDeviceAttr what) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&value, what, device) != cudaSuccess) {
    cudaGetLastError();  // not the next launch's error
    return 0;
  }
  return value;
}

// The most shared memory (static and dynamic) one block may have on the current device:
// 227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86 / sm_89 (A10, L4), where the unsliced blocks
// of m_tile 2-8 (100-104 KB) do not fit and ops/dense.py falls back to smaller tiles. Lowered
// by JAX_NVFP4_SMEM_LIMIT_KB, so that a larger GPU runs a smaller one's launch choices (the GPU
// test of the fallback).
inline int smem_limit() {
  return per_device([] {
    int limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    if (const char *env = std::getenv("JAX_NVFP4_SMEM_LIMIT_KB")) {
      const long kb = std::strtol(env, nullptr, 10);
      if (kb > 0 && kb < limit / 1024) limit = static_cast<int>(kb) * 1024;
    }
    return limit;
  });
}

// Above 48 KB of dynamic shared memory a kernel must opt in, once per process and device. A
// block whose dynamic and static shared memory exceed smem_limit() cannot launch here (the
// runtime's own refusal on such a GPU, or the test limit's). A refusal is answered, not left as
// the thread's last CUDA error: the occupancy queries ask about blocks that cannot launch, and
// the dequantize and alignment handlers read the last error after their launches.
template <typename T, int MT, bool kMoe, int KS = 1, int XR = 8 * MT, int SC = 0>
cudaError_t allow_shared_memory() {
  return per_device([] {
    cudaFuncAttributes attr{};
    cudaError_t e = cudaFuncGetAttributes(&attr, nvfp4_kernel<T, MT, kMoe, KS, XR, SC>);
    if (e == cudaSuccess) {
      if (TileConfig<MT, KS, XR, SC>::kSmemBytes + static_cast<int>(attr.sharedSizeBytes) >
          smem_limit())
        return cudaErrorInvalidValue;
      e = cudaFuncSetAttribute(nvfp4_kernel<T, MT, kMoe, KS, XR, SC>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                               TileConfig<MT, KS, XR, SC>::kSmemBytes);
    }
    if (e != cudaSuccess) cudaGetLastError();
    return e;
  });
}

// The architecture the loaded code of this instantiation was compiled for (90 for sm_90a code),
// 0 if the runtime cannot say. Not binaryVersion alone: where the build holds no SASS for the
// device, the driver compiles the PTX of an older architecture for it (a build for 80 only on
// an H100; the default build's compute_89 on a GPU newer than sm_90), and binaryVersion then
// names the device, while the code is the older architecture's: no griddepcontrol.wait, no
// cluster barrier (a cluster launch of it traps, and an overlapped launch of it could read its
// inputs before the previous kernel's writes are visible). ptxVersion names the source's.
template <typename T, int MT, bool kMoe, int KS, int XR = 8 * MT, int SC = 0>
int loaded_code_arch() {
  return per_device([] {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, nvfp4_kernel<T, MT, kMoe, KS, XR, SC>) != cudaSuccess) {
      cudaGetLastError();  // not the next launch's error
      return 0;
    }
    if (attr.ptxVersion > 0 && attr.ptxVersion < attr.binaryVersion) return attr.ptxVersion;
    return attr.binaryVersion;
  });
}

// The current device's compute capability major version, 0 if unknown.
inline int device_major() {
  return per_device([] { return device_attribute(cudaDevAttrComputeCapabilityMajor); });
}

// Clusters of more than 8 blocks are non-portable: opted in once per device, only where sm_90
// code runs.
template <typename T, int MT, bool kMoe>
cudaError_t allow_large_clusters() {
  return per_device([] {
    return cudaFuncSetAttribute(nvfp4_kernel<T, MT, kMoe>,
                                cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  });
}

// The largest split count the cluster reduction can launch for this instantiation on the
// current device: 0 where the loaded code was not compiled for sm_90 (the cluster path traps
// there), the device is not an sm_90 one (the only GPUs it was measured and tested on), or no
// cluster fits. One answer per device.
template <typename T, int MT, bool kMoe>
int cluster_limit_typed() {
  return per_device([] {
    const int version = loaded_code_arch<T, MT, kMoe, 1>();
    if (version < 90 || version >= 100 || device_major() != 9) return 0;
    if (allow_shared_memory<T, MT, kMoe>() != cudaSuccess) return 0;
    if (allow_large_clusters<T, MT, kMoe>() != cudaSuccess) return 0;
    for (int s = kMaxClusterSplits; s >= 2; --s) {
      cudaLaunchConfig_t cfg{};
      cudaLaunchAttribute at[1];
      at[0].id = cudaLaunchAttributeClusterDimension;
      at[0].val.clusterDim.x = 1;
      at[0].val.clusterDim.y = s;
      at[0].val.clusterDim.z = 1;
      cfg.gridDim = dim3(1, s, 1);
      cfg.blockDim = dim3(kThreads);
      cfg.dynamicSmemBytes = TileConfig<MT>::kSmemBytes;
      cfg.attrs = at;
      cfg.numAttrs = 1;
      int clusters = 0;
      const cudaError_t e =
          cudaOccupancyMaxActiveClusters(&clusters, nvfp4_kernel<T, MT, kMoe>, &cfg);
      if (e != cudaSuccess) {
        cudaGetLastError();  // a refused size must not surface as the next launch's error
        continue;
      }
      if (clusters > 0) return s;
    }
    return 0;
  });
}

// Whether launches of this instantiation may overlap the previous kernel in the stream
// (programmatic dependent launch): only where the loaded code was compiled for sm_90 or newer,
// so that it holds the griddepcontrol.wait that makes the overlap safe, and unless
// JAX_NVFP4_PDL=0 (an escape hatch and the A/B switch of the benchmarks). One answer per device
// (GPUs of one process may differ in architecture).
template <typename T, int MT, bool kMoe, int KS, int XR, int SC>
bool pdl_allowed() {
  return per_device([] {
    const char *env = std::getenv("JAX_NVFP4_PDL");
    if (env != nullptr && std::string(env) == "0") return false;
    return loaded_code_arch<T, MT, kMoe, KS, XR, SC>() >= 90;
  });
}

template <typename T, int MT, bool kMoe, int KS, int XR = 8 * MT, int SC = 0>
cudaError_t launch_typed(const GemmParams &p, int token_tiles, cudaStream_t stream) {
  static_assert(TileConfig<MT>::kSmemBytes >= (kThreads + kMaxClusterSplits) * MT * 16,
                "the cluster reduction reuses the pipeline ring as its receive buffer");
  if (KS > 1 && p.splits != 1) return cudaErrorInvalidConfiguration;
  if (!kMoe && XR < 8 * MT && (token_tiles != 1 || p.rows_out > XR))
    return cudaErrorInvalidConfiguration;
  if (cudaError_t e = allow_shared_memory<T, MT, kMoe, KS, XR, SC>(); e != cudaSuccess) return e;
  cudaLaunchAttribute at[2];
  unsigned n_at = 0;
  if (KS == 1 && p.cluster && p.splits > 1) {
    if (p.splits > cluster_limit_typed<T, MT, kMoe>()) return cudaErrorInvalidConfiguration;
    at[n_at].id = cudaLaunchAttributeClusterDimension;
    at[n_at].val.clusterDim.x = 1;
    at[n_at].val.clusterDim.y = p.splits;
    at[n_at].val.clusterDim.z = 1;
    ++n_at;
  }
  if (pdl_allowed<T, MT, kMoe, KS, XR, SC>()) {
    at[n_at].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[n_at].val.programmaticStreamSerializationAllowed = 1;
    ++n_at;
  }
  cudaLaunchConfig_t cfg{};
  constexpr int NT = TileConfig<MT, KS>::kTilesPerBlock;
  if (p.tiles_per_block < 1 || (p.tiles_per_block > 1 && p.splits != 1))
    return cudaErrorInvalidConfiguration;
  const int tiles = (p.n16 + NT - 1) / NT;
  cfg.gridDim = dim3((tiles + p.tiles_per_block - 1) / p.tiles_per_block, p.splits, token_tiles);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = TileConfig<MT, KS, XR, SC>::kSmemBytes;
  cfg.stream = stream;
  cfg.attrs = at;
  cfg.numAttrs = n_at;
  return cudaLaunchKernelEx(&cfg, nvfp4_kernel<T, MT, kMoe, KS, XR, SC>, p);
}

// k_slices = kDecodeKSlices exists at m_tile 1 (decode) for the dense and the grouped kernel,
// and at m_tile 2 for the dense one: one N tile at a time per block, K split over its 8 warps.
// k_slices = kPairKSlices (m_tile 1 only): 4 slices of 2 N tiles (a unit of half the K with the
// 8-row x tile, of the same K with the short ones: TileConfig), so one hand-off and epilogue
// per 2 N tiles; it wins where it gives a block no more N tiles than the 8-slice block
// (NOTES_dense.md v21, v22). ops/dense.py choose_k_slices and ops/moe.py
// choose_moe_k_slices say when.
constexpr int kDecodeKSlices = 8;
constexpr int kPairKSlices = 4;

// Decode with 1, 2 or 3-4 tokens runs the k-sliced block whose x tile holds 1, 2 or 4 rows, a
// deeper ring in the same shared memory (JAX_NVFP4_SINGLE_ROW=0 at compile time: the 8-row tile,
// for A/B timing in kernel_lab). Same sums in the same order: the outputs are bitwise those of
// the 8-row tile. Dense: the launch's M; grouped GEMM: the most rows one expert's tile is
// expected to hold (the handler's expert_rows hint: the token count).
#ifndef JAX_NVFP4_SINGLE_ROW
#define JAX_NVFP4_SINGLE_ROW 1
#endif
// The x rows of the short tile for a decode launch of `rows` tokens (0: the 8-row tile).
inline int short_tile_rows(int rows) {
  return !JAX_NVFP4_SINGLE_ROW || rows < 1 ? 0
         : rows == 1                       ? 1
         : rows == 2                       ? 2
         : rows <= 4                       ? 4
                                           : 0;
}
template <bool kMoe, int KS, int XR, int SC = 0>
cudaError_t launch_short(const GemmParams &p, bool bf16, int token_tiles, cudaStream_t stream) {
  return bf16 ? launch_typed<__nv_bfloat16, 1, kMoe, KS, XR, SC>(p, token_tiles, stream)
              : launch_typed<__half, 1, kMoe, KS, XR, SC>(p, token_tiles, stream);
}
// Whether the dense 8-slice launch of a 1- or 2-row tile takes long slices (kLongSliceChunks,
// nvfp4_tile.cuh): where K is a whole number of their units. Same occupancy as the 4-chunk
// block (2 stages of 44 / 52 KB against 4 of 22 / 26 KB), so the launch rule's wave holds.
// JAX_NVFP4_LONG_SLICES=0 at compile time: never (kernel_lab A/B).
#ifndef JAX_NVFP4_LONG_SLICES
#define JAX_NVFP4_LONG_SLICES 1
#endif
inline bool long_slices(const GemmParams &p, int xr) {
  return JAX_NVFP4_LONG_SLICES && (xr == 1 || xr == 2) &&
         p.k64 % (kDecodeKSlices * kLongSliceChunks) == 0;
}
// The k-sliced m_tile-1 block of KS slices with the x tile `rows` picks.
template <bool kMoe, int KS>
cudaError_t launch_sliced(const GemmParams &p, bool bf16, int token_tiles, cudaStream_t stream,
                          int rows) {
  const int xr = short_tile_rows(rows);
  if constexpr (!kMoe && KS == kDecodeKSlices) {
    if (long_slices(p, xr))
      return xr == 1 ? launch_short<kMoe, KS, 1, kLongSliceChunks>(p, bf16, token_tiles, stream)
                     : launch_short<kMoe, KS, 2, kLongSliceChunks>(p, bf16, token_tiles, stream);
  }
  switch (xr) {
    case 1: return launch_short<kMoe, KS, 1>(p, bf16, token_tiles, stream);
    case 2: return launch_short<kMoe, KS, 2>(p, bf16, token_tiles, stream);
    case 4: return launch_short<kMoe, KS, 4>(p, bf16, token_tiles, stream);
    default: return launch_short<kMoe, KS, 8>(p, bf16, token_tiles, stream);  // the 8-row tile
  }
}
// Whether the grouped GEMM's unsliced m_tile-1 launch takes long units (kLongUnitChunks,
// nvfp4_tile.cuh): K unsplit and at least kLongUnitMinK64 chunks. JAX_NVFP4_MOE_LONG_UNITS=0
// keeps the 4-chunk units (for A/B runs; NOTES_moe.md v23). It is read when the handler issues
// the launch; inside an XLA command buffer that is when the launch is recorded, so set it
// before the first call of a compiled function. The dense unsliced m_tile-1 launch (M <= 8
// where k-slices do not apply) keeps 4-chunk units: not measured. Unit boundaries do not change
// the order of the additions, so the outputs are bitwise those of the 4-chunk block.
inline bool moe_long_units(const GemmParams &p) {
  if (p.splits != 1 || p.k64 < kLongUnitMinK64) return false;
  const char *env = std::getenv("JAX_NVFP4_MOE_LONG_UNITS");
  return env == nullptr || std::string(env) != "0";
}
// expert_rows: the grouped GEMM's hint (most rows one expert's tile is expected to hold; 0:
// none); the dense launch takes its rows from p.rows_out.
template <bool kMoe>
cudaError_t launch(const GemmParams &p, bool bf16, int mt, int token_tiles, cudaStream_t stream,
                   int k_slices = 1, int expert_rows = 0) {
  if (mt == 1 && (k_slices == kDecodeKSlices || k_slices == kPairKSlices)) {
    const int rows = kMoe ? expert_rows : token_tiles == 1 ? p.rows_out : 0;
    return k_slices == kDecodeKSlices
               ? launch_sliced<kMoe, kDecodeKSlices>(p, bf16, token_tiles, stream, rows)
               : launch_sliced<kMoe, kPairKSlices>(p, bf16, token_tiles, stream, rows);
  }
  if constexpr (!kMoe) {  // m_tile 2 k-slices: dense only (the grouped GEMM's rule never asks)
    if (k_slices == kDecodeKSlices && mt == 2)
      return bf16 ? launch_typed<__nv_bfloat16, 2, kMoe, kDecodeKSlices>(p, token_tiles, stream)
                  : launch_typed<__half, 2, kMoe, kDecodeKSlices>(p, token_tiles, stream);
  }
  if (k_slices != 1) return cudaErrorInvalidConfiguration;
  if constexpr (kMoe) {
    if (mt == 1 && moe_long_units(p))
      return bf16 ? launch_typed<__nv_bfloat16, 1, kMoe, 1, 8, kLongUnitChunks>(p, token_tiles, stream)
                  : launch_typed<__half, 1, kMoe, 1, 8, kLongUnitChunks>(p, token_tiles, stream);
  }
#define JAX_NVFP4_LAUNCH(MT_)                                                         \
  return bf16 ? launch_typed<__nv_bfloat16, MT_, kMoe, 1>(p, token_tiles, stream)     \
              : launch_typed<__half, MT_, kMoe, 1>(p, token_tiles, stream)
  switch (mt) {
    case 1: JAX_NVFP4_LAUNCH(1);
    case 2: JAX_NVFP4_LAUNCH(2);
    case 4: JAX_NVFP4_LAUNCH(4);
    default: JAX_NVFP4_LAUNCH(8);
  }
#undef JAX_NVFP4_LAUNCH
}

// What the loaded code of the unsliced token-tile-`mt` instantiation is and may do on the current
// device (the GPU tests check these against the build's architectures and the device).
struct LoadedCode {
  int arch;           // loaded_code_arch
  bool pdl;           // pdl_allowed
  int cluster_limit;  // cluster_limit_typed
};

template <bool kMoe>
LoadedCode loaded_code(int mt, bool bf16) {
#define JAX_NVFP4_CODE(T_, MT_)                                                     \
  return LoadedCode{loaded_code_arch<T_, MT_, kMoe, 1>(),                           \
                    pdl_allowed<T_, MT_, kMoe, 1, 8 * MT_, 0>(),                    \
                    cluster_limit_typed<T_, MT_, kMoe>()}
#define JAX_NVFP4_TILE(MT_)                                                         \
  if (bf16) JAX_NVFP4_CODE(__nv_bfloat16, MT_);                                     \
  JAX_NVFP4_CODE(__half, MT_)
  switch (mt) {
    case 1: JAX_NVFP4_TILE(1);
    case 2: JAX_NVFP4_TILE(2);
    case 4: JAX_NVFP4_TILE(4);
    default: JAX_NVFP4_TILE(8);
  }
#undef JAX_NVFP4_TILE
#undef JAX_NVFP4_CODE
}

template <bool kMoe>
int cluster_limit(int mt, bool bf16) {
  return loaded_code<kMoe>(mt, bf16).cluster_limit;
}

template <typename T, int MT, bool kMoe, int KS, int XR = 8 * MT>
int blocks_per_sm_typed() {
  if (allow_shared_memory<T, MT, kMoe, KS, XR>() != cudaSuccess) return 0;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, nvfp4_kernel<T, MT, kMoe, KS, XR>,
                                                    kThreads, TileConfig<MT, KS, XR>::kSmemBytes) !=
      cudaSuccess) {
    cudaGetLastError();  // not the next launch's error
    return 0;
  }
  return blocks;
}

template <bool kMoe, int KS, int XR>
int short_blocks_per_sm(bool bf16) {
  return bf16 ? blocks_per_sm_typed<__nv_bfloat16, 1, kMoe, KS, XR>()
              : blocks_per_sm_typed<__half, 1, kMoe, KS, XR>();
}

template <bool kMoe, int KS>
int sliced_blocks_per_sm(bool bf16, int rows) {
  switch (short_tile_rows(rows)) {
    case 1: return short_blocks_per_sm<kMoe, KS, 1>(bf16);
    case 2: return short_blocks_per_sm<kMoe, KS, 2>(bf16);
    case 4: return short_blocks_per_sm<kMoe, KS, 4>(bf16);
    default: return short_blocks_per_sm<kMoe, KS, 8>(bf16);  // the 8-row tile
  }
}

// Resident blocks per SM of a launch (0 when it cannot launch here, e.g. the k-sliced
// block's ~100 KB of shared memory on a GPU with less per SM). `rows`: as launch() picks the
// k-sliced m_tile-1 block's x tile (the dense launch's M, the grouped GEMM's expert_rows hint;
// 0: the 8-row tile), whose ring and so occupancy differ.
template <bool kMoe>
int blocks_per_sm(int mt, bool bf16, int k_slices = 1, int rows = 0) {
  if (mt == 1 && k_slices == kDecodeKSlices)
    return sliced_blocks_per_sm<kMoe, kDecodeKSlices>(bf16, rows);
  if (mt == 1 && k_slices == kPairKSlices)
    return sliced_blocks_per_sm<kMoe, kPairKSlices>(bf16, rows);
  if constexpr (!kMoe) {
    if (k_slices == kDecodeKSlices && mt == 2)
      return bf16 ? blocks_per_sm_typed<__nv_bfloat16, 2, kMoe, kDecodeKSlices>()
                  : blocks_per_sm_typed<__half, 2, kMoe, kDecodeKSlices>();
  }
  if (k_slices != 1) return 0;
#define JAX_NVFP4_OCC(MT_)                                                    \
  return bf16 ? blocks_per_sm_typed<__nv_bfloat16, MT_, kMoe, 1>()            \
              : blocks_per_sm_typed<__half, MT_, kMoe, 1>()
  switch (mt) {
    case 1: JAX_NVFP4_OCC(1);
    case 2: JAX_NVFP4_OCC(2);
    case 4: JAX_NVFP4_OCC(4);
    default: JAX_NVFP4_OCC(8);
  }
#undef JAX_NVFP4_OCC
}

}  // namespace jax_nvfp4

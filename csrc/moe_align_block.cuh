// The MoE token alignment's block-level steps, shared by the alignment kernel
// (nvfp4_moe_align.cu, whose header comment states the algorithm) and the routing kernel
// (nvfp4_moe_route.cu, which aligns the ids it has just chosen without a second launch).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

namespace jax_nvfp4 {
namespace moe_align {

// Chunks of 32 ids loaded ahead per warp: 8 where the ids come from global memory (their latency
// overlaps); 1 where they sit in shared memory (the routing kernel), which also keeps the code
// small: a single-block launch reads its instructions from HBM after the GEMMs have flushed the
// caches, and a kernel of ~7000 instructions spent most of its 16 us waiting on instruction
// fetch (ncu: NOTES_moe.md v12).
constexpr int kLoadAhead = 8;

// int32 of shared memory align_place needs: total[E], before[E], start[E], num_padded,
// table[warps][E].
inline size_t align_smem_ints(int experts, int warps) {
  return size_t(experts) * (warps + 3) + 1;
}

// The static length align.py's capacity() gives: the most slots the padded runs can take.
inline int64_t align_capacity(int64_t pairs, int64_t experts, int64_t block_m) {
  const int64_t bound = pairs + std::min(experts, pairs) * (block_m - 1);
  return (bound + block_m - 1) / block_m * block_m;
}

// Checks the alignment's buffers (both handlers write one); "" when they fit the contract.
inline std::string alignment_problem(int64_t pairs, int64_t experts, int64_t block_m,
                                     int64_t map_len, int64_t slots, int64_t block_expert_len,
                                     int64_t num_padded_len) {
  if (block_m != 8 && block_m != 16 && block_m != 32 && block_m != 64)
    return "block_m must be 8, 16, 32 or 64";
  if (map_len != 0 && map_len != experts) return "expert_map must have E entries (or none)";
  if (slots % block_m != 0) return "len(sorted_ids) must be a multiple of block_m";
  if (block_expert_len != slots / block_m)
    return "block_expert must have len(sorted_ids) / block_m entries";
  if (num_padded_len != 1) return "num_padded must have one element";
  const int64_t need = align_capacity(pairs, experts, block_m);
  if (slots < need)
    return "sorted_ids has " + std::to_string(slots) + " slots, the alignment may need " +
           std::to_string(need);
  return "";
}

// [first, end) of this warp's pairs: whole chunks of 32, ranges in (block, warp) order.
struct WarpRange {
  int first, end;
};

__device__ __forceinline__ WarpRange warp_range(int num_pairs) {
  const int chunks = (num_pairs + 31) / 32;
  const int block_chunks = (chunks + gridDim.x - 1) / gridDim.x;
  const int block_first = min(int(blockIdx.x) * block_chunks * 32, num_pairs);
  const int block_end = min(block_first + block_chunks * 32, num_pairs);
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32;
  const int per_warp = (block_chunks + warps - 1) / warps * 32;
  const int first = min(block_first + warp * per_warp, block_end);
  return {first, min(first + per_warp, block_end)};
}

// The expert of pair p, or E where p is past the range or its id outside [0, E). `ids` is
// global memory (the alignment kernel) or shared memory (the routing kernel), hence no __ldg.
__device__ __forceinline__ int expert_of(const int *ids, int p, int end, int experts) {
  const int e = p < end ? ids[p] : experts;
  return e >= 0 && e < experts ? e : experts;
}

// The lanes of the warp whose v equals this lane's (v < 2^bits), one ballot per bit. Why not
// __match_any_sync: in the single-block version 2 x 32 chunks per warp of it took 73 us for
// 32768 pairs, these ballots 55 (NOTES_moe.md v9).
__device__ __forceinline__ unsigned lanes_equal(int v, int bits) {
  unsigned peers = 0xffffffffu;
#pragma unroll 1
  for (int b = 0; b < bits; ++b) {
    const bool set = (v >> b) & 1;
    const unsigned ones = __ballot_sync(0xffffffffu, set);
    peers &= set ? ones : ~ones;
  }
  return peers;
}

// Walks the warp's range chunk by chunk; for each chunk calls
// visit(pair, expert (E for none), peers, lowest lane of its group). The row updates inside
// visit are ordered by the __syncwarp after it.
template <int kAhead, class Visit>
__device__ __forceinline__ void for_each_chunk(const int *ids, WarpRange r, int experts,
                                               Visit visit) {
  const int lane = threadIdx.x % 32;
  const int id_bits = 32 - __clz(experts);   // ids and the "no expert" value E
  const unsigned lanes_below = (1u << lane) - 1u;
#pragma unroll 1
  for (int base = r.first; base < r.end; base += kAhead * 32) {
    int e[kAhead];
#pragma unroll
    for (int c = 0; c < kAhead; ++c)
      e[c] = expert_of(ids, base + c * 32 + lane, r.end, experts);
#pragma unroll
    for (int c = 0; c < kAhead; ++c) {
      if (base + c * 32 >= r.end) break;   // warp-uniform: short ranges (decode) stop early
      const unsigned peers = lanes_equal(e[c], id_bits);
      visit(base + c * 32 + lane, e[c], __popc(peers & lanes_below), __popc(peers),
            (peers & lanes_below) == 0);
      __syncwarp();
    }
  }
}

// Step 1: this warp's counts per expert into row[E].
template <int kAhead>
__device__ __forceinline__ void count_warp_range(const int *ids, WarpRange r, int experts,
                                                 int *row) {
  for (int e = threadIdx.x % 32; e < experts; e += 32) row[e] = 0;
  __syncwarp();
  for_each_chunk<kAhead>(ids, r, experts, [&](int, int e, int, int group, bool lowest) {
    if (e < experts && lowest) row[e] += group;
  });
}

// Steps 1-5 of the alignment (nvfp4_moe_align.cu's header comment) for this block's range of
// the pairs. `ids`: global or shared memory; `smem`: align_smem_ints(E, warps) int32.
template <int kAhead>
__device__ __forceinline__ void align_place(const int *ids, int num_pairs,
                                            const int *__restrict__ expert_map, int experts,
                                            int block_m, int slots,
                                            const int *__restrict__ block_counts,
                                            int *__restrict__ sorted_ids,
                                            int *__restrict__ block_expert,
                                            int *__restrict__ num_padded_out, int *smem) {
  int *total = smem;                   // pairs per expert
  int *before = smem + experts;        // pairs per expert in earlier blocks' ranges
  int *start = smem + 2 * experts;     // each expert's first slot
  int &num_padded = smem[3 * experts];
  int *table = smem + 3 * experts + 1; // [warps][E]: counts, prefixes over warps, then cursors
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int threads = blockDim.x, warps = threads / 32;
  const int g = blockIdx.x, grid = gridDim.x;
  const int sentinel = num_pairs;
  const WarpRange range = warp_range(num_pairs);
  int *row = table + warp * experts;

  // 1. Per-warp counts.
  count_warp_range<kAhead>(ids, range, experts, row);
  __syncthreads();

  // 2. Rows -> exclusive prefixes over the warps; totals and earlier blocks' counts.
#pragma unroll 1
  for (int x = tid; x < experts; x += threads) {
    int run = 0;
#pragma unroll 1
    for (int w = 0; w < warps; ++w) {
      const int count = table[w * experts + x];
      table[w * experts + x] = run;
      run += count;
    }
    int earlier = 0, all = run;
    if (grid > 1) {
      all = 0;
#pragma unroll 1
      for (int b = 0; b < grid; ++b) {
        const int count = block_counts[b * experts + x];
        earlier += b < g ? count : 0;
        all += count;
      }
    }
    total[x] = all;
    before[x] = earlier;
  }
  __syncthreads();

  // 3. Exclusive scan of the padded totals by warp 0: each lane sums a contiguous run of
  //    ceil(E / 32) experts, one warp scan of the run sums, each lane writes its run's starts.
  //    (Why not 32 experts per warp-scan step: E / 32 dependent scans, ~0.6 us at E = 256.)
  if (warp == 0) {
    const int per_lane = (experts + 31) / 32;
    const int first = min(lane * per_lane, experts), last = min(first + per_lane, experts);
    auto padded = [&](int e) { return (total[e] + block_m - 1) / block_m * block_m; };
    int run = 0;
#pragma unroll 1
    for (int e = first; e < last; ++e) run += padded(e);
    int incl = run;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    int at = incl - run;
#pragma unroll 1
    for (int e = first; e < last; ++e) {
      start[e] = at;
      at += padded(e);
    }
    if (lane == 31) num_padded = incl;
  }
  __syncthreads();

  // 4. This block's share of the padding slots, block experts and tail; rows -> cursors.
#pragma unroll 1
  for (int e = g + tid * grid; e < experts; e += threads * grid) {
    const int first = start[e], count = total[e];
    const int end = first + (count + block_m - 1) / block_m * block_m;
#pragma unroll 1
    for (int s = first + count; s < end; ++s) sorted_ids[s] = sentinel;
    const int mapped = expert_map != nullptr ? expert_map[e] : e;
#pragma unroll 1
    for (int b = first / block_m; b < end / block_m; ++b) block_expert[b] = mapped;
  }
  const int used = num_padded;
#pragma unroll 1
  for (int s = used + g * threads + tid; s < slots; s += grid * threads) sorted_ids[s] = sentinel;
#pragma unroll 1
  for (int b = used / block_m + g * threads + tid; b < slots / block_m; b += grid * threads)
    block_expert[b] = -1;
  if (g == 0 && tid == 0) *num_padded_out = used;
#pragma unroll 1
  for (int i = tid; i < warps * experts; i += threads) {
    const int x = i % experts;
    table[i] += start[x] + before[x];
  }
  __syncthreads();

  // 5. Placement, each warp over its own range in order.
  for_each_chunk<kAhead>(ids, range, experts,
                         [&](int pair, int e, int rank, int group, bool lowest) {
    const int slot = e < experts ? row[e] + rank : 0;
    __syncwarp();
    if (e < experts) {
      sorted_ids[slot] = pair;
      if (lowest) row[e] += group;
    }
  });
}

}  // namespace moe_align
}  // namespace jax_nvfp4

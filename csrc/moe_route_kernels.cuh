// The fused MoE routing + token alignment for small batches (the kernels of the XLA FFI target
// jax_nvfp4_moe_route_align_cuda, nvfp4_moe_route.cu): router logits -> top-k weights and ids
// -> the grouped GEMM's schedule, in one launch of one block. The CUDA twin of
// jax_nvfp4/ops/moe_route.py's reference (moe.routing.route, then moe.align.align_reference on
// the ids it chose).
//
// Why: at decode a layer's routing is 4-8 XLA kernels (softmax, top-k lowered to a sort, the
// renormalisation's reduce and divide, the group-limited selection's masks) and the alignment
// one more, each ~1-8 us of GPU time for a few KB of work: 14 of the Qwen3-like layer's 31 us and
// 22 of the DeepSeek-like layer's 101 us at one token (NOTES_moe.md v11, H200).
//
// Inputs: logits [M, E] (f32, bf16 or f16), correction_bias [E] or [0] (f32), expert_map [E] or
// [0] (int32). Outputs: topk_weights [M, k] f32, topk_ids [M, k] int32, and the alignment's
// sorted_ids [P], block_expert [P / block_m], num_padded [1] (nvfp4_moe_align.cu states them).
//
// Two kernels, and a third opt-in. Up to 32 tokens, 128 pairs and 256 experts (decode),
// moe_route_align_small_kernel (its comment below), or where it fits and JAX_NVFP4_ROUTE_WIDE=1,
// moe_route_align_wide_kernel (a warp per 32 experts; its comment below). Otherwise one
// block; warp w routes tokens
// w, w + warps, ...; per token, in the warp:
//   1. score = softmax over the E logits (max, exp, sum, divide) or sigmoid; the selection
//      score choice = score + correction bias is kept as an order-preserving uint32 key, so that
//      a warp max of the keys and a warp min of the indices holding it (two REDUX) pick
//      (highest choice, lowest index): the tie rule of lax.top_k, which the reference uses. Both
//      rows live in shared memory ([warps][2][E]).
//   2. n_group > 1: lane g owns group g (n_group <= 32); its score is the sum of its two largest
//      choices or its largest; topk_group rounds of the warp max pick the groups; the experts of
//      the others get key 1, below every real score (the reference's -inf; only a choice of
//      -inf or NaN inside a chosen group could then order differently).
//   3. top_k rounds of that selection over the lanes' best keys (k <= 32); the winner's key
//      becomes 0 (taken) and only its lane rescans; lane j keeps the j-th id, so ids come out
//      best first, as lax.top_k gives them.
// Code size matters more than instruction count here: a single-block launch after the GEMMs
// fetches its instructions from HBM, so loops stay rolled (NOTES_moe.md v12).
//   4. lane j < k reads score[id_j]; renormalise by the warp's sum (max with 1e-20) and scale.
// The ids also go to shared memory; after a barrier the whole block aligns them with the
// alignment kernel's steps (moe_align_block.cuh) over the same shared memory, so no id makes a
// round trip through global memory and nothing waits on a second launch.
// Floating-point results match the XLA reference to rounding (the sums run in another order);
// ids match exactly except where two experts' selection scores lie within that rounding.

#pragma once

#include <algorithm>
#include <cstddef>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <string>

#include "moe_align_block.cuh"

namespace jax_nvfp4 {
namespace moe_route {

constexpr int kRouteMaxPairs = 1024;   // mirrored by ops/moe_route.py ROUTE_MAX_PAIRS
constexpr int kRouteMaxExperts = 1024;
constexpr int kRouteMaxTopK = 32;      // one lane per selected id
constexpr int kRouteMaxGroups = 32;    // one lane per group
constexpr int kRouteMaxWarps = 32;
constexpr int kLoadBatch = 8;          // logits per lane in flight at once (all 256 of DeepSeek's)

// Lab knobs (benchmarks/route_lab.cu only): the decode kernel's exp and divisions as the fast
// approximations, and the unroll of its one-chunk alignment's 32-step loop.
#ifndef JAX_NVFP4_ROUTE_FAST_MATH
#define JAX_NVFP4_ROUTE_FAST_MATH 0
#endif
// JAX_NVFP4_ROUTE_LAB_SCORING: 1 compiles only the sigmoid scoring, 2 only the softmax (0: both,
// chosen at run time), to see what the untaken path's code costs.
#ifndef JAX_NVFP4_ROUTE_LAB_SCORING
#define JAX_NVFP4_ROUTE_LAB_SCORING 0
#endif
#ifndef JAX_NVFP4_ROUTE_ALIGN_UNROLL
#define JAX_NVFP4_ROUTE_ALIGN_UNROLL 32
#endif
constexpr int kAlignUnroll = JAX_NVFP4_ROUTE_ALIGN_UNROLL;
// JAX_NVFP4_ROUTE_LAB_CLOCK=1: thread 0 of the decode kernel records clock64() at its phase
// boundaries in route_lab_clock (route_lab.cu prints the differences).
#ifndef JAX_NVFP4_ROUTE_LAB_CLOCK
#define JAX_NVFP4_ROUTE_LAB_CLOCK 0
#endif
#if JAX_NVFP4_ROUTE_LAB_CLOCK
__device__ long long route_lab_clock[8];
#define ROUTE_LAB_STAMP(i)                                                   \
  do {                                                                       \
    long long t_;                                                            \
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(t_)::"memory");             \
    if (threadIdx.x == 0) route_lab_clock[i] = t_;                           \
  } while (0)
#else
#define ROUTE_LAB_STAMP(i) \
  do {                     \
  } while (0)
#endif
__device__ __forceinline__ float lab_exp(float x) {
#if JAX_NVFP4_ROUTE_FAST_MATH
  return __expf(x);
#else
  return expf(x);
#endif
}
__device__ __forceinline__ float lab_div(float a, float b) {
#if JAX_NVFP4_ROUTE_FAST_MATH
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

struct RouteParams {
  const void *logits;
  const float *bias;        // [E] or null
  const int *expert_map;    // [E] or null
  float *weights;           // [M, k]
  int *ids;                 // [M, k]
  int *sorted_ids, *block_expert, *num_padded;
  int tokens, experts, top_k;
  bool sigmoid, renormalize, group_max;
  int n_group, topk_group;
  float scaling;
  int block_m, slots;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Monotone map float -> uint32 (negative values reversed): a > b as floats <=> key(a) > key(b).
__device__ __forceinline__ unsigned order_key(float f) {
  const unsigned bits = __float_as_uint(f);
  return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}

__device__ __forceinline__ float key_value(unsigned key) {
  return __uint_as_float(key & 0x80000000u ? key & 0x7fffffffu : ~key);
}

// The warp's (highest key, lowest index among equal keys) over the lanes' (key, index): one
// max and one min reduction (REDUX, sm_80+) instead of five 64-bit shuffle steps. A lane with
// no candidate passes key 0 and index -1 (never the lowest: it compares as 0xffffffff).
__device__ __forceinline__ int warp_argmax(unsigned key, int index) {
  const unsigned top = __reduce_max_sync(0xffffffffu, key);
  return int(__reduce_min_sync(0xffffffffu, key == top ? unsigned(index) : 0xffffffffu));
}

// This lane's best (key, index) among its experts e = lane + 32 j: ascending e and a strict >
// keep the lowest index of equal keys; taken experts (key 0) are never a candidate. The keys
// are read kLoadBatch at a time, all loads before the compares: the winner's lane rescans
// after every selection round, and one shared-memory load after another made each rescan a
// chain of E / 32 load latencies.
__device__ __forceinline__ void lane_best(const unsigned *key, int experts, unsigned &best_key,
                                          int &best_index) {
  best_key = 0u;
  best_index = -1;
#pragma unroll 1
  for (int base = threadIdx.x % 32; base < experts; base += 32 * kLoadBatch) {
    unsigned k[kLoadBatch];
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) k[j] = base + 32 * j < experts ? key[base + 32 * j] : 0u;
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      if (k[j] > best_key) {
        best_key = k[j];
        best_index = base + 32 * j;
      }
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

__device__ __forceinline__ float warp_fmax(float v) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, d));
  return v;
}

// Keeps the two largest keys seen (first >= second); ties keep the earlier.
__device__ __forceinline__ void take_top2(unsigned k, unsigned &first, unsigned &second) {
  if (k > first) {
    second = first;
    first = k;
  } else if (k > second) {
    second = k;
  }
}

// Step 2's choice of groups from each lane's group key (lane g < n_group owns group g): a
// bit mask of the topk_group best groups, ties to the lower group.
__device__ __forceinline__ unsigned choose_groups(const RouteParams &p, unsigned first,
                                                  unsigned second, int per_group) {
  const int lane = threadIdx.x % 32;
  unsigned group_key = 0u;
  if (lane < p.n_group) {
    const float group = p.group_max || per_group == 1 ? key_value(first)
                                                       : key_value(first) + key_value(second);
    group_key = order_key(group);
  }
  unsigned chosen = 0u;
  bool taken = lane >= p.n_group;
#pragma unroll 1
  for (int r = 0; r < p.topk_group; ++r) {
    const int g = warp_argmax(taken ? 0u : group_key, taken ? -1 : lane);
    chosen |= 1u << g;
    taken = taken || lane == g;
  }
  return chosen;
}

// Step 4's end, shared by both kernels: lane k < top_k holds token t's k-th expert `id` and its
// score `w` (0 on the other lanes), renormalised over the k lanes and scaled here, and writes
// them to global memory and ids_s.
__device__ __forceinline__ void store_token_choice(const RouteParams &p, int t, int lane, int id,
                                                   float w, int *ids_s) {
  const bool selected = lane < p.top_k;
  if (p.renormalize) w = w / fmaxf(warp_sum(w), 1e-20f);
  if (p.scaling != 1.0f) w = w * p.scaling;
  if (selected) {
    const int pair = t * p.top_k + lane;
    p.weights[pair] = w;
    p.ids[pair] = id;
    ids_s[pair] = id;
  }
}

// Steps 1-4 for token t; writes its weights and ids to global memory and ids_s.
template <typename T>
__device__ __forceinline__ void route_token(const RouteParams &p, int t, float *score,
                                            unsigned *key, int *ids_s) {
  const int lane = threadIdx.x % 32, experts = p.experts;
  const T *row = static_cast<const T *>(p.logits) + size_t(t) * experts;

  // 1. Scores and selection keys. A lane's logits (and bias) are loaded kLoadBatch at a time,
  //    all of a batch issued before any is used: loaded, computed and stored to shared memory
  //    one expert after another, each load waited for the one before it (the compiler kept
  //    them behind the previous expert's shared-memory stores), one global round trip per
  //    expert a lane owns (8 for 256 experts; NOTES_moe.md v16).
  const bool has_bias = p.bias != nullptr;
  float logit[kLoadBatch], bias[kLoadBatch];
  auto load_batch = [&](int base) {
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      const int e = base + lane + 32 * j;
      logit[j] = e < experts ? to_float(row[e]) : 0.0f;
      bias[j] = has_bias && e < experts ? p.bias[e] : 0.0f;
    }
  };
  // Every expert of this lane, a batch of loads at a time: use(e, logit, bias).
  auto for_each_expert = [&](auto &&use) {
#pragma unroll 1
    for (int base = 0; base < experts; base += 32 * kLoadBatch) {
      load_batch(base);
#pragma unroll
      for (int j = 0; j < kLoadBatch; ++j) {
        const int e = base + lane + 32 * j;
        if (e < experts) use(e, logit[j], bias[j]);
      }
    }
  };
  if (p.sigmoid) {
    for_each_expert([&](int e, float lg, float b) {
      const float s = 1.0f / (1.0f + expf(-lg));
      score[e] = s;
      key[e] = order_key(has_bias ? s + b : s);
    });
  } else {
    float mx = -INFINITY;
    for_each_expert([&](int e, float lg, float b) {
      score[e] = lg;
      key[e] = __float_as_uint(b);  // the bias, parked until the keys are made
      mx = fmaxf(mx, lg);
    });
    mx = warp_fmax(mx);
    float sum = 0.0f;
#pragma unroll 1
    for (int e = lane; e < experts; e += 32) {
      score[e] = expf(score[e] - mx);
      sum += score[e];
    }
    sum = warp_sum(sum);
#pragma unroll 1
    for (int e = lane; e < experts; e += 32) {
      score[e] = score[e] / sum;
      key[e] = order_key(has_bias ? score[e] + __uint_as_float(key[e]) : score[e]);
    }
  }
  __syncwarp();

  // 2. Group-limited selection.
  if (p.n_group > 1) {
    const int per_group = experts / p.n_group;
    unsigned first = 0u, second = 0u;
    if (lane < p.n_group) {
#pragma unroll 4
      for (int e = lane * per_group; e < (lane + 1) * per_group; ++e)
        take_top2(key[e], first, second);
    }
    const unsigned chosen = choose_groups(p, first, second, per_group);
    __syncwarp();   // the group scans above read keys other lanes now overwrite
#pragma unroll 1
    for (int e = lane; e < experts; e += 32)
      if (!((chosen >> (e / per_group)) & 1u)) key[e] = 1u;
    __syncwarp();
  }

  // 3. Top-k. Lane l owns the keys of e = l + 32 j, so only the winner's lane rescans.
  unsigned best_key;
  int best_index;
  lane_best(key, experts, best_key, best_index);
  int my_id = 0;
#pragma unroll 1
  for (int r = 0; r < p.top_k; ++r) {
    const int id = warp_argmax(best_key, best_index);
    if (lane == r) my_id = id;
    if (lane == id % 32) {
      key[id] = 0u;
      lane_best(key, experts, best_key, best_index);
    }
  }

  // 4. Weights.
  store_token_choice(p, t, lane, my_id, lane < p.top_k ? score[my_id] : 0.0f, ids_s);
  __syncwarp();   // the next token reuses score and key
}

// Expert-map entries per thread: E <= 1024 over at least 128 threads.
constexpr int kMapPerThread = kRouteMaxExperts / 128;

template <typename T>
__global__ void __launch_bounds__(kRouteMaxWarps * 32, 1)
    moe_route_align_kernel(const RouteParams p) {
  extern __shared__ int smem[];
  const int pairs = p.tokens * p.top_k;
  int *ids_s = smem;
  int *map_s = smem + (pairs + 3) / 4 * 4;
  int *work = map_s + (p.experts + 3) / 4 * 4;   // routing rows, then the alignment's tables
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  // The expert map is read now, in flight while the warps route; the alignment reads it from
  // shared memory instead of making a third global round trip after the second.
  int mapped[kMapPerThread];
#pragma unroll
  for (int i = 0; i < kMapPerThread; ++i) {
    const int e = threadIdx.x + i * blockDim.x;
    mapped[i] = p.expert_map != nullptr && e < p.experts ? p.expert_map[e] : 0;
  }
  float *score = reinterpret_cast<float *>(work) + size_t(warp) * 2 * p.experts;
  unsigned *key = reinterpret_cast<unsigned *>(score + p.experts);
#pragma unroll 1
  for (int t = warp; t < p.tokens; t += warps) route_token<T>(p, t, score, key, ids_s);
#pragma unroll
  for (int i = 0; i < kMapPerThread; ++i) {
    const int e = threadIdx.x + i * blockDim.x;
    if (e < p.experts) map_s[e] = mapped[i];
  }
  __syncthreads();
  moe_align::align_place<1>(ids_s, pairs, p.expert_map != nullptr ? map_s : nullptr, p.experts,
                         p.block_m, p.slots, nullptr, p.sorted_ids, p.block_expert,
                         p.num_padded, work);
}

// ---------------------------------------------------------------------------------------------
// The decode path: at most kSmallMaxTokens tokens, kSmallMaxPairs (token, k) pairs and
// kSmallMaxExperts experts.
//
// Why a second kernel: at one token the kernel above spent most of its 4.5-9.6 us in a chain of
// dependent steps, each waiting on the one before: a shared-memory round trip per selection
// round's rescan, five block barriers of the alignment around one warp's serial work, and the
// alignment's [warps][E] tables, scans and cursors for 8 pairs (NOTES_moe.md v12, v16, v18).
// Here warp t routes token t with its keys in registers (lane l owns experts l + 32 j, j < PER),
// so a selection round is two REDUX and PER compares with no memory access; then warp 0 aligns
// the <= 128 pairs, one lane per pair, in chunks of 32 (align_chunks_warp) or, up to 32 pairs,
// in one (align_pair_lanes_warp), with no block-wide tables. One barrier in all, none for a
// single token.
// Same arithmetic in the same order as route_token: ids, weights and the alignment are bitwise
// those of the kernel above (tests/test_moe_route_align.py compares both with the reference).
constexpr int kSmallMaxTokens = 32;     // one warp per token
constexpr int kSmallMaxPairs = 128;     // the alignment warp's chunks of 32 pairs
constexpr int kSmallChunks = kSmallMaxPairs / 32;
constexpr int kSmallMaxExperts = 256;   // PER <= 8 keys per lane in registers

// The warp's token t: weights and ids to global memory, the ids to ids_s. `group_keys`: this
// warp's [E] row of shared memory for the group scans (n_group > 1 only).
template <typename T, int PER>
__device__ __forceinline__ void route_token_registers(const RouteParams &p, int t,
                                                      unsigned *group_keys, int *ids_s) {
  const int lane = threadIdx.x % 32, experts = p.experts;
  const T *row = static_cast<const T *>(p.logits) + size_t(t) * experts;
  const bool has_bias = p.bias != nullptr;
  float score[PER];
  unsigned key[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int e = lane + 32 * j;
    score[j] = e < experts ? to_float(row[e]) : 0.0f;
    key[j] = has_bias && e < experts ? __float_as_uint(p.bias[e]) : 0u;   // the bias, parked
  }

  // 1. Scores and selection keys (route_token's operations, per lane in ascending expert order).
  if (JAX_NVFP4_ROUTE_LAB_SCORING == 0 ? p.sigmoid : JAX_NVFP4_ROUTE_LAB_SCORING == 1) {
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const float s = lab_div(1.0f, 1.0f + lab_exp(-score[j]));
      const float choice = has_bias ? s + __uint_as_float(key[j]) : s;
      score[j] = s;
      key[j] = lane + 32 * j < experts ? order_key(choice) : 0u;
    }
  } else {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < PER; ++j)
      if (lane + 32 * j < experts) mx = fmaxf(mx, score[j]);
    mx = warp_fmax(mx);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      if (lane + 32 * j < experts) {
        score[j] = lab_exp(score[j] - mx);
        sum += score[j];
      }
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      score[j] = lab_div(score[j], sum);
      const float choice = has_bias ? score[j] + __uint_as_float(key[j]) : score[j];
      key[j] = lane + 32 * j < experts ? order_key(choice) : 0u;
    }
  }

  ROUTE_LAB_STAMP(1);
  // 2. Group-limited selection: lane g scans group g's keys from shared memory (a group's
  //    experts are spread over the lanes' registers).
  if (p.n_group > 1) {
    const int per_group = experts / p.n_group;
#pragma unroll
    for (int j = 0; j < PER; ++j)
      if (lane + 32 * j < experts) group_keys[lane + 32 * j] = key[j];
    __syncwarp();
    unsigned first = 0u, second = 0u;
    if (lane < p.n_group) {
      const unsigned *g = group_keys + lane * per_group;
      if (per_group % 4 == 0) {   // 16-byte aligned: E = n_group * per_group is a multiple of 4
#pragma unroll 4
        for (int i = 0; i < per_group; i += 4) {
          const uint4 q = *reinterpret_cast<const uint4 *>(g + i);
          take_top2(q.x, first, second);
          take_top2(q.y, first, second);
          take_top2(q.z, first, second);
          take_top2(q.w, first, second);
        }
      } else {
#pragma unroll 1
        for (int i = 0; i < per_group; ++i) take_top2(g[i], first, second);
      }
    }
    const unsigned chosen = choose_groups(p, first, second, per_group);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int e = lane + 32 * j;
      if (e < experts && !((chosen >> (e / per_group)) & 1u)) key[j] = 1u;
    }
  }

  ROUTE_LAB_STAMP(2);
  // 3. Top-k: every lane keeps its best (key, lowest index); the winner's key becomes 0.
  auto lane_best = [&](unsigned &best_key, int &best_index) {
    best_key = 0u;
    best_index = -1;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      if (key[j] > best_key) {
        best_key = key[j];
        best_index = lane + 32 * j;
      }
    }
  };
  unsigned best_key;
  int best_index;
  lane_best(best_key, best_index);
  int my_id = 0;
#pragma unroll 1
  for (int r = 0; r < p.top_k; ++r) {
    const int id = warp_argmax(best_key, best_index);
    if (lane == r) my_id = id;
    if (lane == id % 32) {
#pragma unroll
      for (int j = 0; j < PER; ++j) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
        // For `j == id / 32` ptxas for sm_80 made one store at a computed index, which put
        // key[] in local memory; compared by expert it stays in registers. (sm_90 keeps the
        // form its GPU runs measured and tested, NOTES_moe.md v18; both clear the same key.)
        if (lane + 32 * j == id) key[j] = 0u;
#else
        if (j == id / 32) key[j] = 0u;
#endif
      }
      lane_best(best_key, best_index);
    }
  }

  ROUTE_LAB_STAMP(3);
  // 4. Weights: lane r fetches score[id_r] from the lane that owns it.
  float w = 0.0f;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const float s = __shfl_sync(0xffffffffu, score[j], my_id % 32);
    if (j == my_id / 32) w = s;
  }
  store_token_choice(p, t, lane, my_id, lane < p.top_k ? w : 0.0f, ids_s);
  ROUTE_LAB_STAMP(4);
}

// The alignment of <= 32 pairs by one warp, lane = pair: the same outputs as align_place.
// Why a second version beside align_chunks_warp: at one token this one (no shared-memory
// counts, one shuffle loop) made the DeepSeek-like routing kernel 6.0 us, the chunked one
// 7.9 (NOTES_moe.md v18). kPairsOnly: the shuffle loop visits only the lanes that hold a pair
// (the others add nothing: no expert below theirs, no padded run); the wide kernel's form, the
// decode kernel's too once the GPU tests have run on it (NOTES_moe.md v24).
template <bool kPairsOnly = false>
__device__ __forceinline__ void align_pair_lanes_warp(const RouteParams &p, const int *ids_s,
                                                 const int *map_s) {
  const int lane = threadIdx.x % 32, experts = p.experts, block_m = p.block_m;
  const int pairs = p.tokens * p.top_k, sentinel = pairs;
  const int e = lane < pairs ? ids_s[lane] : experts;   // E: no pair
  const unsigned peers = __match_any_sync(0xffffffffu, e);
  const unsigned below = peers & ((1u << lane) - 1u);
  const int count = __popc(peers);
  const bool leader = below == 0u && e < experts;
  const int padded = leader ? (count + block_m - 1) / block_m * block_m : 0;
  // The first slot of expert e: the padded runs of the lower experts, one per leader lane.
  int start = 0;
  if (kPairsOnly) {
#pragma unroll 4
    for (int q = 0; q < pairs; ++q) {
      const int eq = __shfl_sync(0xffffffffu, e, q), pq = __shfl_sync(0xffffffffu, padded, q);
      start += eq < e ? pq : 0;
    }
  } else {
#pragma unroll kAlignUnroll
    for (int q = 0; q < 32; ++q) {
      const int eq = __shfl_sync(0xffffffffu, e, q), pq = __shfl_sync(0xffffffffu, padded, q);
      start += eq < e ? pq : 0;
    }
  }
  const int used = __reduce_add_sync(0xffffffffu, padded);
  if (e < experts) p.sorted_ids[start + __popc(below)] = lane;
  if (leader) {
#pragma unroll 1
    for (int s = start + count; s < start + padded; ++s) p.sorted_ids[s] = sentinel;
    const int mapped = map_s != nullptr ? map_s[e] : e;
#pragma unroll 1
    for (int b = start / block_m; b < (start + padded) / block_m; ++b) p.block_expert[b] = mapped;
  }
#pragma unroll 1
  for (int s = used + lane; s < p.slots; s += 32) p.sorted_ids[s] = sentinel;
#pragma unroll 1
  for (int b = used / block_m + lane; b < p.slots / block_m; b += 32) p.block_expert[b] = -1;
  if (lane == 0) *p.num_padded = used;
}

// The alignment of <= kSmallMaxPairs pairs by one warp (the same outputs as align_place), in
// chunks of 32 pairs, lane = pair:
//   1. per chunk, __match_any_sync groups equal experts; each group's lowest lane adds the
//      group's size to count_s[e] and hands the old count to its group: a pair's place among
//      its expert's pairs is the count before its chunk + the lower lanes of its group;
//   2. lane l owns experts [l * PER, (l + 1) * PER): one warp scan of their padded counts gives
//      each expert's first slot (start_s) and num_padded; the owner writes its experts'
//      padding slots and block experts, and the lanes share the tail past num_padded;
//   3. each pair goes to start_s[e] + its place.
// Every output slot is written once.
template <int PER>
__device__ __forceinline__ void align_chunks_warp(const RouteParams &p, const int *ids_s,
                                                 const int *map_s, int *count_s, int *start_s) {
  const int lane = threadIdx.x % 32, experts = p.experts, block_m = p.block_m;
  const int pairs = p.tokens * p.top_k, sentinel = pairs;
  const unsigned lanes_below = (1u << lane) - 1u;
#pragma unroll
  for (int j = 0; j < PER; ++j)
    if (lane * PER + j < experts) count_s[lane * PER + j] = 0;
  __syncwarp();

  // 1.
  int expert[kSmallChunks], place[kSmallChunks];
#pragma unroll
  for (int c = 0; c < kSmallChunks; ++c) {
    const int pair = c * 32 + lane;
    expert[c] = pair < pairs ? ids_s[pair] : experts;   // E: no pair
    place[c] = 0;
    if (c * 32 >= pairs) continue;   // warp-uniform
    const unsigned peers = __match_any_sync(0xffffffffu, expert[c]);
    const unsigned below = peers & lanes_below;
    int before = 0;
    if (below == 0u && expert[c] < experts) {
      before = count_s[expert[c]];
      count_s[expert[c]] = before + __popc(peers);
    }
    place[c] = __shfl_sync(0xffffffffu, before, __ffs(peers) - 1) + __popc(below);
    __syncwarp();
  }

  // 2.
  int count[PER], run = 0;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    count[j] = lane * PER + j < experts ? count_s[lane * PER + j] : 0;
    run += (count[j] + block_m - 1) / block_m * block_m;
  }
  int incl = run;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int v = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += v;
  }
  const int used = __shfl_sync(0xffffffffu, incl, 31);
  int at = incl - run;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int e = lane * PER + j;
    if (e >= experts) break;
    const int padded = (count[j] + block_m - 1) / block_m * block_m;
    start_s[e] = at;
#pragma unroll 1
    for (int s = at + count[j]; s < at + padded; ++s) p.sorted_ids[s] = sentinel;
    const int mapped = map_s != nullptr ? map_s[e] : e;
#pragma unroll 1
    for (int b = at / block_m; b < (at + padded) / block_m; ++b) p.block_expert[b] = mapped;
    at += padded;
  }
#pragma unroll 1
  for (int s = used + lane; s < p.slots; s += 32) p.sorted_ids[s] = sentinel;
#pragma unroll 1
  for (int b = used / block_m + lane; b < p.slots / block_m; b += 32) p.block_expert[b] = -1;
  if (lane == 0) *p.num_padded = used;
  __syncwarp();

  // 3.
#pragma unroll
  for (int c = 0; c < kSmallChunks; ++c)
    if (expert[c] < experts) p.sorted_ids[start_s[expert[c]] + place[c]] = c * 32 + lane;
}

// The decode kernels' end: once every token's ids are in ids_s (a block barrier for more than
// one token; warp 0 routed a lone token itself), warp 0 (`warp`: the caller's) aligns them: in
// chunks of 32 pairs (align_chunks_warp, PER experts per lane) where kChunked, else one pair
// per lane (align_pair_lanes_warp<kPairsOnly>).
template <int PER, bool kChunked, bool kPairsOnly = false>
__device__ __forceinline__ void align_decode_batch(const RouteParams &p, int warp,
                                                   const int *ids_s, const int *map_s,
                                                   int *count_s, int *start_s) {
  if (p.tokens > 1) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  if (warp != 0) return;
  if (kChunked) {
    align_chunks_warp<PER>(p, ids_s, map_s, count_s, start_s);
  } else {
    align_pair_lanes_warp<kPairsOnly>(p, ids_s, map_s);
  }
}

// One block of `tokens` warps. Dynamic shared memory: [warps][E] keys when n_group > 1.
// kChunked: more than 32 pairs (align_chunks_warp), else align_pair_lanes_warp.
template <typename T, int PER, bool kChunked>
__global__ void __launch_bounds__(kSmallMaxTokens * 32, 1)
    moe_route_align_small_kernel(const RouteParams p) {
  extern __shared__ unsigned group_rows[];
  __shared__ int ids_s[kSmallMaxPairs];
  __shared__ int map_s[kSmallMaxExperts], count_s[kSmallMaxExperts], start_s[kSmallMaxExperts];
  ROUTE_LAB_STAMP(0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Warp 0 reads the expert map now, in flight while it routes.
  int mapped[PER];
  const bool has_map = p.expert_map != nullptr;
  if (warp == 0 && has_map) {
#pragma unroll
    for (int j = 0; j < PER; ++j)
      mapped[j] = lane + 32 * j < p.experts ? p.expert_map[lane + 32 * j] : 0;
  }
  route_token_registers<T, PER>(p, warp, group_rows + size_t(warp) * p.experts, ids_s);
  if (warp == 0 && has_map) {
#pragma unroll
    for (int j = 0; j < PER; ++j)
      if (lane + 32 * j < p.experts) map_s[lane + 32 * j] = mapped[j];
  }
  align_decode_batch<PER, kChunked>(p, warp, ids_s, has_map ? map_s : nullptr, count_s,
                                    start_s);
  ROUTE_LAB_STAMP(5);
}

// ---------------------------------------------------------------------------------------------
// The wide decode path (NOTES_moe.md v24, v26; the default where wide_route_wins, and with
// JAX_NVFP4_ROUTE_WIDE=1 wherever it fits): one warp per 32 experts of a token instead of one
// warp per token.
//
// Why: the decode kernel above is one warp's chain of ~2000 instructions at one token for 256
// experts, and a lone warp waits out every instruction's latency: route_lab.cu measured it at
// 5.7 us warm and 6.0 cold (a one-block launch that stores one word: 0.8), so it is neither its
// code fetch nor its loads. Spread over warps, each warp's part of the chain is short.
//
// Warp w of the block routes slice s = w % S of token t = w / S (S = ceil(E / 32) slices of 32
// experts; lane l holds expert 32 s + l, one key in a register):
//   1. softmax or sigmoid and the selection key, as route_token. Softmax needs the token's max
//      and sum over all slices: the max through shared memory (exact in any order), and the
//      sum in route_token's order (lane l adds experts l, l + 32, ... then the warp sum), from
//      the exponentials parked in shared memory, so that the scores are bitwise the decode and
//      general kernels'.
//   2. n_group > 1 takes the path only where a group is one slice (E = 32 n_group): the slice's
//      two largest keys by three REDUX, the group score as choose_groups makes it.
//   3. each lane's rank in its slice by (key descending, expert ascending): 32 shuffles and
//      compares, no rounds; ranks below top_k go to shared memory as the slice's candidates,
//      best first.
//   One barrier. Then the token's slice-0 warp merges: with groups, the topk_group best group
//   keys (ranked the same way among the n_group lanes: choose_groups' set); lane j takes
//   candidate j % top_k of the (j / top_k)-th slice considered (ascending slices, so lane order
//   is expert order among equal keys), at most 32 candidates; its rank among them (the same
//   32 shuffles) is its place in the token's top-k. The top-k of the union of the slices'
//   top-k lists is the top-k of the token (a strict order), so the ids and their order are the
//   decode kernel's; lane r then holds the r-th id and its score, and store_token_choice
//   renormalises as the other kernels do: every output is bitwise theirs.
//   Then warp 0 aligns, as in the decode kernel (after a block barrier for more than one
//   token).
// Where: at most kWideMaxWarps warps (tokens x slices), E <= kSmallMaxExperts, pairs <=
// kSmallMaxPairs, and at most 32 candidates (slices x top_k, or topk_group x top_k).
constexpr int kWideMaxWarps = 32;
constexpr int kWideMaxLanes = kWideMaxWarps * 32;

// The rank of this lane's (key, lane) among the warp's: how many lanes hold a larger key or an
// equal key at a lower lane. Over the first `lanes` lanes; all lanes take part.
__device__ __forceinline__ int lane_rank(unsigned key, int lanes) {
  const int lane = threadIdx.x % 32;
  int rank = 0;
#pragma unroll 8
  for (int q = 0; q < lanes; ++q) {
    const unsigned other = __shfl_sync(0xffffffffu, key, q);
    rank += other > key || (other == key && q < lane);
  }
  return rank;
}

template <typename T, bool kChunked>
__global__ void __launch_bounds__(kWideMaxLanes, 1)
    moe_route_align_wide_kernel(const RouteParams p) {
  __shared__ int ids_s[kSmallMaxPairs];
  __shared__ int map_s[kSmallMaxExperts], count_s[kSmallMaxExperts], start_s[kSmallMaxExperts];
  __shared__ float max_s[kWideMaxWarps];
  __shared__ unsigned group_key_s[kWideMaxWarps];
  __shared__ float exp_s[kWideMaxLanes];
  // Each warp's candidates at warp * 32 + rank; the merge reuses its own slots for the result.
  __shared__ unsigned cand_key_s[kWideMaxLanes];
  __shared__ int cand_id_s[kWideMaxLanes];
  __shared__ float cand_score_s[kWideMaxLanes];
  ROUTE_LAB_STAMP(0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int experts = p.experts, slices = (experts + 31) / 32;
  const int t = warp / slices, slice = warp % slices, e = slice * 32 + lane;
  const bool real = e < experts, has_bias = p.bias != nullptr, has_map = p.expert_map != nullptr;
  const T *row = static_cast<const T *>(p.logits) + size_t(t) * experts;
  const float logit = real ? to_float(row[e]) : 0.0f;
  const float bias = has_bias && real ? p.bias[e] : 0.0f;
  // The block has at least 32 * slices >= E threads: one map entry each.
  const int mapped = has_map && int(threadIdx.x) < experts ? p.expert_map[threadIdx.x] : 0;

  // 1.
  float score;
  if (p.sigmoid) {
    score = 1.0f / (1.0f + expf(-logit));
  } else {
    float mx = warp_fmax(real ? logit : -INFINITY);
    if (slices > 1) {
      if (lane == 0) max_s[warp] = mx;
      __syncthreads();
      for (int q = 0; q < slices; ++q) mx = fmaxf(mx, max_s[t * slices + q]);
    }
    score = real ? expf(logit - mx) : 0.0f;
    float sum = score;   // one slice: 0 + its exponential, route_token's first addition
    if (slices > 1) {
      exp_s[threadIdx.x] = score;
      __syncthreads();
      sum = 0.0f;
      for (int q = 0; q < slices; ++q)
        if (q * 32 + lane < experts) sum += exp_s[(t * slices + q) * 32 + lane];
    }
    score = score / warp_sum(sum);
  }
  const unsigned key = real ? order_key(has_bias ? score + bias : score) : 0u;
  ROUTE_LAB_STAMP(1);

  // 2.
  if (p.n_group > 1) {
    const unsigned first = __reduce_max_sync(0xffffffffu, key);
    const unsigned at = __reduce_min_sync(0xffffffffu, key == first ? unsigned(lane) : ~0u);
    const unsigned second = __reduce_max_sync(0xffffffffu, unsigned(lane) == at ? 0u : key);
    if (lane == 0) {
      const float group = p.group_max ? key_value(first) : key_value(first) + key_value(second);
      group_key_s[warp] = order_key(group);
    }
  }

  // 3.
  const int rank = lane_rank(key, 32);
  if (rank < p.top_k) {
    cand_key_s[warp * 32 + rank] = key;
    cand_id_s[warp * 32 + rank] = e;
    cand_score_s[warp * 32 + rank] = score;
  }
  if (has_map && int(threadIdx.x) < experts) map_s[threadIdx.x] = mapped;
  __syncthreads();
  ROUTE_LAB_STAMP(2);

  if (slice == 0) {
    const int k = p.top_k, base = warp * 32;
    int from = lane / k, candidates = slices * k;
    if (p.n_group > 1) {
      const unsigned group_key = lane < p.n_group ? group_key_s[base / 32 + lane] : 0u;
      // Every lane takes part in lane_rank's shuffles (a lane left out hangs the warp).
      const int group_rank = lane_rank(group_key, p.n_group);
      const bool chosen = lane < p.n_group && group_rank < p.topk_group;
      const unsigned groups = __ballot_sync(0xffffffffu, chosen);
      // The (lane / k)-th chosen group, in ascending order.
      const int nth = from;
      from = slices;
      for (int g = 0, seen = 0; g < slices; ++g) {
        if ((groups >> g) & 1u) {
          if (seen == nth) from = g;
          ++seen;
        }
      }
      candidates = p.topk_group * k;
    }
    const bool has = lane < candidates;
    const int at = (base / 32 + from) * 32 + lane % k;
    const unsigned cand_key = has ? cand_key_s[at] : 0u;
    const int cand_id = has ? cand_id_s[at] : 0;
    const float cand_score = has ? cand_score_s[at] : 0.0f;
    const int place = lane_rank(cand_key, 32);
    __syncwarp();   // every lane has read its candidate before the winners overwrite slots
    if (place < k) {
      cand_id_s[base + place] = cand_id;
      cand_score_s[base + place] = cand_score;
    }
    __syncwarp();
    const int id = lane < k ? cand_id_s[base + lane] : 0;
    const float w = lane < k ? cand_score_s[base + lane] : 0.0f;
    ROUTE_LAB_STAMP(3);
    store_token_choice(p, t, lane, id, w, ids_s);
    ROUTE_LAB_STAMP(4);
  }
  align_decode_batch<kSmallMaxExperts / 32, kChunked, true>(
      p, warp, ids_s, has_map ? map_s : nullptr, count_s, start_s);
  ROUTE_LAB_STAMP(5);
}

// Whether the wide kernel takes p (its comment says where).
inline bool wide_route_fits(const RouteParams &p) {
  const int slices = (p.experts + 31) / 32, pairs = p.tokens * p.top_k;
  if (p.tokens < 1 || p.tokens * slices > kWideMaxWarps || p.experts > kSmallMaxExperts ||
      pairs > kSmallMaxPairs)
    return false;
  if (p.n_group > 1) return p.experts == 32 * p.n_group && p.topk_group * p.top_k <= 32;
  return slices * p.top_k <= 32;
}

// Where the handler takes the wide kernel by default (JAX_NVFP4_ROUTE_WIDE unset): the batches
// it fits where route_lab measured it faster than the decode kernel (H200, warm us, decode ->
// wide; NOTES_moe.md v26): one token over at least 4 slices (Qwen3-like, 128 experts: 3.90 ->
// 3.58), and grouped batches over at least 4 slices up to 4 tokens (DeepSeek-like, 256 experts
// in 8 groups: 5.72 -> 3.68 at one token, 5.94 -> 5.69 at four). Slower elsewhere: one slice
// (Mixtral-like, 8 experts: 2.65 -> 3.35 at one token, 2.87 -> 4.53 at 16) and 32 warps of
// softmax (Qwen3-like at 8 tokens: 5.20 -> 8.83).
inline bool wide_route_wins(const RouteParams &p) {
  const int slices = (p.experts + 31) / 32;
  return wide_route_fits(p) && slices >= 4 && (p.n_group > 1 ? p.tokens <= 4 : p.tokens == 1);
}

template <typename T>
const void *wide_kernel(int pairs) {
  return pairs > 32 ? reinterpret_cast<const void *>(moe_route_align_wide_kernel<T, true>)
                    : reinterpret_cast<const void *>(moe_route_align_wide_kernel<T, false>);
}

template <typename T, bool kChunked>
const void *small_kernel(int experts) {
  if (experts <= 32)
    return reinterpret_cast<const void *>(moe_route_align_small_kernel<T, 1, kChunked>);
  if (experts <= 64)
    return reinterpret_cast<const void *>(moe_route_align_small_kernel<T, 2, kChunked>);
  if (experts <= 128)
    return reinterpret_cast<const void *>(moe_route_align_small_kernel<T, 4, kChunked>);
  return reinterpret_cast<const void *>(moe_route_align_small_kernel<T, 8, kChunked>);
}

template <typename T>
const void *small_kernel(int experts, int pairs) {
  return pairs > 32 ? small_kernel<T, true>(experts) : small_kernel<T, false>(experts);
}

// ids[pairs], map[E], then the routing rows ([warps][2][E]) or the alignment's tables.
inline size_t route_smem_ints(int pairs, int experts, int warps) {
  return size_t(pairs + 3) / 4 * 4 + size_t(experts + 3) / 4 * 4 +
         std::max(size_t(2) * warps * experts, moe_align::align_smem_ints(experts, warps));
}

enum class LogitType { kF32, kBF16, kF16 };

// One launch: grid 1, `threads` threads, `smem` bytes of dynamic shared memory.
struct RouteLaunch {
  const void *kernel;
  int threads;
  size_t smem;
  bool decode;   // moe_route_align_small_kernel or moe_route_align_wide_kernel
  bool wide;     // moe_route_align_wide_kernel
};

template <typename T>
const void *general_kernel() {
  return reinterpret_cast<const void *>(moe_route_align_kernel<T>);
}

// The launch for p (its tokens, experts, top_k and n_group set): the wide decode kernel where
// it applies and `allow_wide`, else the decode kernel where it applies and `allow_decode`, else
// the general kernel with a warp per token up to 32, at least the alignment's warp per 32
// pairs, and no more than `smem_optin` bytes of shared memory hold. "" or why it cannot run.
inline std::string plan_route_launch(const RouteParams &p, LogitType type, bool allow_decode,
                                     int smem_optin, RouteLaunch &launch,
                                     bool allow_wide = false) {
  const int pairs = p.tokens * p.top_k, e = p.experts;
  if (allow_wide && allow_decode && wide_route_fits(p)) {
    launch.kernel = type == LogitType::kF32    ? wide_kernel<float>(pairs)
                    : type == LogitType::kBF16 ? wide_kernel<__nv_bfloat16>(pairs)
                                               : wide_kernel<__half>(pairs);
    launch.threads = p.tokens * ((e + 31) / 32) * 32;
    launch.smem = 0;
    launch.decode = true;
    launch.wide = true;
    return "";
  }
  if (p.tokens >= 1 && p.tokens <= kSmallMaxTokens && pairs <= kSmallMaxPairs &&
      e <= kSmallMaxExperts && allow_decode) {
    launch.kernel = type == LogitType::kF32    ? small_kernel<float>(e, pairs)
                    : type == LogitType::kBF16 ? small_kernel<__nv_bfloat16>(e, pairs)
                                               : small_kernel<__half>(e, pairs);
    launch.threads = p.tokens * 32;
    // <= 32 KB
    launch.smem = p.n_group > 1 ? size_t(p.tokens) * size_t(e) * sizeof(unsigned) : 0;
    launch.decode = true;
    launch.wide = false;
    return "";
  }
  int warps = std::clamp(std::max((pairs + 31) / 32, p.tokens), 4, kRouteMaxWarps);
  while (warps > 4 && route_smem_ints(pairs, e, warps) * sizeof(int) > size_t(smem_optin))
    --warps;
  launch.smem = route_smem_ints(pairs, e, warps) * sizeof(int);
  launch.threads = warps * 32;
  launch.decode = false;
  launch.wide = false;
  launch.kernel = type == LogitType::kF32    ? general_kernel<float>()
                  : type == LogitType::kBF16 ? general_kernel<__nv_bfloat16>()
                                             : general_kernel<__half>();
  // 4 warps (kMapPerThread) fit every SM80+ GPU up to 1024 experts.
  if (launch.smem > size_t(smem_optin))
    return std::to_string(e) + " experts need " + std::to_string(launch.smem) +
           " bytes of shared memory, more than this GPU's " + std::to_string(smem_optin);
  return "";
}

}  // namespace moe_route
}  // namespace jax_nvfp4

// XLA FFI handler of the fused MoE routing + token alignment for small batches (target
// jax_nvfp4_moe_route_align_cuda): router logits -> top-k weights and ids -> the grouped GEMM's
// schedule, in one launch of one block. The CUDA twin of jax_nvfp4/ops/moe_route.py's reference
// (moe.routing.route, then moe.align.align_reference on the ids it chose).
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
// One block; warp w routes tokens w, w + warps, ...; per token, in the warp:
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

#include <algorithm>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <string>

#include "ffi_util.h"
#include "moe_align_block.cuh"

namespace jax_nvfp4 {
namespace {

constexpr int kRouteMaxPairs = 1024;   // mirrored by ops/moe_route.py ROUTE_MAX_PAIRS
constexpr int kRouteMaxExperts = 1024;
constexpr int kRouteMaxTopK = 32;      // one lane per selected id
constexpr int kRouteMaxGroups = 32;    // one lane per group
constexpr int kRouteMaxWarps = 32;
constexpr int kLoadBatch = 8;          // logits per lane in flight at once (all 256 of DeepSeek's)

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
  if (p.sigmoid) {
#pragma unroll 1
    for (int base = 0; base < experts; base += 32 * kLoadBatch) {
      load_batch(base);
#pragma unroll
      for (int j = 0; j < kLoadBatch; ++j) {
        const int e = base + lane + 32 * j;
        if (e >= experts) continue;
        const float s = 1.0f / (1.0f + expf(-logit[j]));
        score[e] = s;
        key[e] = order_key(has_bias ? s + bias[j] : s);
      }
    }
  } else {
    float mx = -INFINITY;
#pragma unroll 1
    for (int base = 0; base < experts; base += 32 * kLoadBatch) {
      load_batch(base);
#pragma unroll
      for (int j = 0; j < kLoadBatch; ++j) {
        const int e = base + lane + 32 * j;
        if (e >= experts) continue;
        score[e] = logit[j];
        key[e] = __float_as_uint(bias[j]);  // the bias, parked until the keys are made
        mx = fmaxf(mx, logit[j]);
      }
    }
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
    unsigned group_key = 0u;
    if (lane < p.n_group) {
      unsigned first = 0u, second = 0u;
#pragma unroll 4
      for (int e = lane * per_group; e < (lane + 1) * per_group; ++e) {
        const unsigned k = key[e];
        if (k > first) {
          second = first;
          first = k;
        } else if (k > second) {
          second = k;
        }
      }
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
  const bool selected = lane < p.top_k;
  float w = selected ? score[my_id] : 0.0f;
  if (p.renormalize) w = w / fmaxf(warp_sum(w), 1e-20f);
  if (p.scaling != 1.0f) w = w * p.scaling;
  if (selected) {
    const int pair = t * p.top_k + lane;
    p.weights[pair] = w;
    p.ids[pair] = my_id;
    ids_s[pair] = my_id;
  }
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

ffi::Error invalid(const std::string &msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_nvfp4_moe_route_align: " + msg);
}

// ids[pairs], map[E], then the routing rows ([warps][2][E]) or the alignment's tables.
size_t route_smem_ints(int pairs, int experts, int warps) {
  return size_t(pairs + 3) / 4 * 4 + size_t(experts + 3) / 4 * 4 +
         std::max(size_t(2) * warps * experts, moe_align::align_smem_ints(experts, warps));
}

ffi::Error MoeRouteAlignImpl(cudaStream_t stream, ffi::AnyBuffer logits,
                             ffi::Buffer<ffi::F32> correction_bias,
                             ffi::Buffer<ffi::S32> expert_map,
                             ffi::Result<ffi::Buffer<ffi::F32>> weights,
                             ffi::Result<ffi::Buffer<ffi::S32>> ids,
                             ffi::Result<ffi::Buffer<ffi::S32>> sorted,
                             ffi::Result<ffi::Buffer<ffi::S32>> block_expert,
                             ffi::Result<ffi::Buffer<ffi::S32>> num_padded, int64_t top_k,
                             int64_t sigmoid, int64_t renormalize, int64_t n_group,
                             int64_t topk_group, int64_t group_max, float scaling,
                             int64_t block_m) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2) return invalid("logits must be [M, E], got " + dims_str(dims));
  const ffi::DataType dtype = logits.element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16 &&
      dtype != ffi::DataType::F16)
    return invalid("logits must be float32, bfloat16 or float16");
  const int64_t m = dims[0], e = dims[1];
  if (e < 1 || e > kRouteMaxExperts)
    return invalid("E = " + std::to_string(e) + " must be in [1, " +
                   std::to_string(kRouteMaxExperts) + "]");
  if (top_k < 1 || top_k > std::min<int64_t>(e, kRouteMaxTopK))
    return invalid("top_k must be in [1, min(E, " + std::to_string(kRouteMaxTopK) + ")]");
  const int64_t pairs = m * top_k;
  if (pairs > kRouteMaxPairs)
    return invalid(std::to_string(pairs) + " (token, k) pairs, more than one block's " +
                   std::to_string(kRouteMaxPairs));
  if (n_group < 1 || n_group > kRouteMaxGroups || e % n_group != 0)
    return invalid("n_group must be in [1, " + std::to_string(kRouteMaxGroups) +
                   "] and divide E");
  if (n_group > 1 && (topk_group < 1 || topk_group > n_group || top_k > topk_group * (e / n_group)))
    return invalid("topk_group must be in [1, n_group] with top_k <= topk_group * E / n_group");
  const int64_t bias_len = correction_bias.element_count();
  if (bias_len != 0 && bias_len != e) return invalid("correction_bias must have E entries or none");
  if (weights->element_count() != pairs || ids->element_count() != pairs)
    return invalid("topk_weights and topk_ids must have M * top_k entries");
  const int64_t map_len = expert_map.element_count();
  const int64_t slots = sorted->element_count();
  const std::string problem =
      moe_align::alignment_problem(pairs, e, block_m, map_len, slots,
                                   block_expert->element_count(), num_padded->element_count());
  if (!problem.empty()) return invalid(problem);

  int optin = 0;
  if (ffi::Error err = smem_optin_bytes(optin, "jax_nvfp4_moe_route_align"); err.failure())
    return err;
  // A warp per token up to 32, at least the alignment's warp per 32 pairs, and no more than
  // the shared memory holds.
  int warps = static_cast<int>(
      std::clamp<int64_t>(std::max<int64_t>((pairs + 31) / 32, m), 4, kRouteMaxWarps));
  while (warps > 4 &&
         route_smem_ints(int(pairs), int(e), warps) * sizeof(int) > size_t(optin))
    --warps;
  const size_t smem = route_smem_ints(int(pairs), int(e), warps) * sizeof(int);
  if (smem > size_t(optin))   // 4 warps (kMapPerThread) fit every SM80+ GPU up to 1024 experts
    return invalid(std::to_string(e) + " experts need " + std::to_string(smem) +
                   " bytes of shared memory, more than this GPU's " + std::to_string(optin));

  RouteParams p{};
  p.logits = logits.untyped_data();
  p.bias = bias_len ? correction_bias.typed_data() : nullptr;
  p.expert_map = map_len ? expert_map.typed_data() : nullptr;
  p.weights = weights->typed_data();
  p.ids = ids->typed_data();
  p.sorted_ids = sorted->typed_data();
  p.block_expert = block_expert->typed_data();
  p.num_padded = num_padded->typed_data();
  p.tokens = static_cast<int>(m);
  p.experts = static_cast<int>(e);
  p.top_k = static_cast<int>(top_k);
  p.sigmoid = sigmoid != 0;
  p.renormalize = renormalize != 0;
  p.group_max = group_max != 0;
  p.n_group = static_cast<int>(n_group);
  p.topk_group = static_cast<int>(topk_group);
  p.scaling = scaling;
  p.block_m = static_cast<int>(block_m);
  p.slots = static_cast<int>(slots);

  const void *kernel = dtype == ffi::DataType::F32
                           ? reinterpret_cast<const void *>(moe_route_align_kernel<float>)
                       : dtype == ffi::DataType::BF16
                           ? reinterpret_cast<const void *>(moe_route_align_kernel<__nv_bfloat16>)
                           : reinterpret_cast<const void *>(moe_route_align_kernel<__half>);
  if (ffi::Error err = allow_dynamic_smem(kernel, smem, "jax_nvfp4_moe_route_align");
      err.failure())
    return err;
  void *args[] = {&p};
  if (cudaError_t err = cudaLaunchKernel(kernel, dim3(1), dim3(warps * 32), args, smem, stream);
      err != cudaSuccess)
    return cuda_error("jax_nvfp4_moe_route_align launch", err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_nvfp4

XLA_FFI_DEFINE_HANDLER_SYMBOL(Nvfp4MoeRouteAlignCuda, jax_nvfp4::MoeRouteAlignImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // router logits [M, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // correction_bias [E] or [0]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_map [E] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // topk_weights [M, k]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // topk_ids [M, k]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // sorted_ids [P]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // block_expert [P / block_m]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // num_padded [1]
                                  .Attr<int64_t>("top_k")
                                  .Attr<int64_t>("sigmoid")
                                  .Attr<int64_t>("renormalize")
                                  .Attr<int64_t>("n_group")
                                  .Attr<int64_t>("topk_group")
                                  .Attr<int64_t>("group_max")
                                  .Attr<float>("routed_scaling_factor")
                                  .Attr<int64_t>("block_m"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

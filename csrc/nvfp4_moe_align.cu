// XLA FFI handler of the MoE token alignment (target jax_nvfp4_moe_align_cuda): the CUDA twin of
// jax_nvfp4/moe/align.py's reference, bit for bit, in one launch.
//
// Input: the expert ids of T = M * top_k (token, k) pairs (pair p = token * top_k + j) and an
// optional expert map (global id -> local id or -1). Output, with P slots (P % block_m == 0):
//   sorted_ids[P]       the pairs grouped by expert, expert 0's run first, ascending inside a
//                       run, each run padded with the sentinel T to a multiple of block_m; the
//                       slots past num_padded hold T too;
//   block_expert[P/bm]  the (mapped) expert of each block of block_m slots; -1 past num_padded;
//   num_padded[1]       the sum of the padded runs.
// Ids outside [0, E) are dropped (they appear nowhere).
//
// Why one block: a decode step aligns tens of pairs, where the ~9 XLA kernels of the JAX version
// cost more in launch gaps than in work (3.2 us for this kernel at one token, NOTES_moe.md v5);
// a 4096-token prefill has a few tens of thousands of pairs, 32 chunks here: 98 us next to
// 1.2 ms of GEMMs for the Qwen3-like layer (NOTES_moe.md v8). One block needs no global scratch and no second launch.
// Its steps:
//   1. histogram of the ids (shared-memory atomics: counts do not depend on their order);
//   2. warp 0 scans the padded counts into each expert's first slot and num_padded;
//   3. per expert: its padding slots get the sentinel, its blocks their expert id; the tail
//      past num_padded gets the sentinel / -1. (No slot is written twice, so no ordering.)
//   4. the pairs are placed in chunks of one pair per thread, in pair order, which keeps each
//      run ascending. Inside a chunk a pair's rank among the pairs of its expert is
//        (pairs of that expert in earlier warps of the chunk) + (lower lanes of its own warp
//         with the same expert: __match_any_sync);
//      the per-warp counts sit in a [warps][E] uint16 table that one pass per expert turns
//      into exclusive prefixes (at most 1024, so 16 bits hold them), and a cursor per expert
//      carries the placed count from chunk to chunk.
// The block has as many threads as pairs, between 128 and 1024: a decode step's alignment is
// pure latency, and fewer warps mean a smaller table and shorter passes over it.

#include <algorithm>
#include <string>

#include "ffi_util.h"

namespace jax_nvfp4 {
namespace {

constexpr int kAlignMaxThreads = 1024;

int align_threads(int64_t pairs) {
  return static_cast<int>(std::clamp<int64_t>((pairs + 31) / 32 * 32, 128, kAlignMaxThreads));
}

// Dynamic shared memory: cursor[E], chunk_total[E] (int32), then table[warps][E] (uint16).
size_t align_smem_bytes(int experts, int threads) {
  return size_t(experts) * (2 * sizeof(int) + threads / 32 * sizeof(uint16_t));
}

__global__ void __launch_bounds__(kAlignMaxThreads)
    moe_align_kernel(const int *__restrict__ ids, int num_pairs, const int *__restrict__ expert_map,
                     int experts, int block_m, int slots, int *__restrict__ sorted_ids,
                     int *__restrict__ block_expert, int *__restrict__ num_padded_out) {
  extern __shared__ int smem[];
  int *cursor = smem;                  // step 1: counts; from step 2: the next free slot
  int *chunk_total = smem + experts;   // step 3: counts; step 4: pairs placed by this chunk
  auto *table = reinterpret_cast<uint16_t *>(smem + 2 * experts);
  __shared__ int num_padded;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int threads = blockDim.x, warps = threads / 32;
  const int sentinel = num_pairs;

  // 1. Histogram.
  for (int e = tid; e < experts; e += threads) cursor[e] = 0;
  __syncthreads();
  for (int i = tid; i < num_pairs; i += threads) {
    const int e = ids[i];
    if (e >= 0 && e < experts) atomicAdd(&cursor[e], 1);
  }
  __syncthreads();

  // 2. Exclusive scan of the padded counts (warp 0, 32 experts per step).
  if (warp == 0) {
    int carry = 0;
    for (int base = 0; base < experts; base += 32) {
      const int e = base + lane;
      const int count = e < experts ? cursor[e] : 0;
      const int padded = (count + block_m - 1) / block_m * block_m;
      int incl = padded;
      for (int d = 1; d < 32; d *= 2) {
        const int v = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += v;
      }
      if (e < experts) {
        chunk_total[e] = count;
        cursor[e] = carry + incl - padded;
      }
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) num_padded = carry;
  }
  __syncthreads();

  // 3. Padding slots, block experts, the tail.
  for (int e = tid; e < experts; e += threads) {
    const int first = cursor[e], count = chunk_total[e];
    const int end = first + (count + block_m - 1) / block_m * block_m;
    for (int s = first + count; s < end; ++s) sorted_ids[s] = sentinel;
    const int mapped = expert_map != nullptr ? expert_map[e] : e;
    for (int b = first / block_m; b < end / block_m; ++b) block_expert[b] = mapped;
    chunk_total[e] = 0;
  }
  const int used = num_padded;
  for (int s = used + tid; s < slots; s += threads) sorted_ids[s] = sentinel;
  for (int b = used / block_m + tid; b < slots / block_m; b += threads) block_expert[b] = -1;
  if (tid == 0) *num_padded_out = used;

  // 4. Placement, one chunk of kThreads pairs at a time.
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = 0; base < num_pairs; base += threads) {
    for (int i = tid; i < warps * experts; i += threads) table[i] = 0;
    __syncthreads();
    const int pair = base + tid;
    int e = pair < num_pairs ? ids[pair] : -1;
    const bool placed = e >= 0 && e < experts;
    if (!placed) e = -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank_in_warp = __popc(peers & lanes_below);
    if (placed && rank_in_warp == 0) table[warp * experts + e] = uint16_t(__popc(peers));
    __syncthreads();
    for (int x = tid; x < experts; x += threads) {
      cursor[x] += chunk_total[x];
      int run = 0;
      for (int w = 0; w < warps; ++w) {
        const int c = table[w * experts + x];
        table[w * experts + x] = uint16_t(run);
        run += c;
      }
      chunk_total[x] = run;
    }
    __syncthreads();
    if (placed) sorted_ids[cursor[e] + table[warp * experts + e] + rank_in_warp] = pair;
    __syncthreads();
  }
}

ffi::Error invalid(const std::string &msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_nvfp4_moe_align: " + msg);
}

// The static length align.py's capacity() gives: the most slots the padded runs can take.
int64_t align_capacity(int64_t pairs, int64_t experts, int64_t block_m) {
  const int64_t bound = pairs + std::min(experts, pairs) * (block_m - 1);
  return (bound + block_m - 1) / block_m * block_m;
}

ffi::Error MoeAlignImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> topk_ids,
                        ffi::Buffer<ffi::S32> expert_map, ffi::Result<ffi::Buffer<ffi::S32>> sorted,
                        ffi::Result<ffi::Buffer<ffi::S32>> block_expert,
                        ffi::Result<ffi::Buffer<ffi::S32>> num_padded, int64_t num_experts,
                        int64_t block_m) {
  if (block_m != 8 && block_m != 16 && block_m != 32 && block_m != 64)
    return invalid("block_m must be 8, 16, 32 or 64");
  if (num_experts < 1) return invalid("num_experts must be >= 1");
  const int64_t pairs = topk_ids.element_count();
  const int64_t map_len = expert_map.element_count();
  if (map_len != 0 && map_len != num_experts)
    return invalid("expert_map must have num_experts entries (or none)");
  const int64_t slots = sorted->element_count();
  if (slots % block_m != 0) return invalid("len(sorted_ids) must be a multiple of block_m");
  if (static_cast<int64_t>(block_expert->element_count()) != slots / block_m)
    return invalid("block_expert must have len(sorted_ids) / block_m entries");
  if (num_padded->element_count() != 1) return invalid("num_padded must have one element");
  if (pairs > INT32_MAX / 2) return invalid("too many pairs for one alignment");
  const int64_t need = align_capacity(pairs, num_experts, block_m);
  if (slots < need)
    return invalid("sorted_ids has " + std::to_string(slots) + " slots, the alignment may need " +
                   std::to_string(need));

  const int threads = align_threads(pairs);
  const size_t smem = align_smem_bytes(static_cast<int>(num_experts), threads);
  int device = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return cuda_error("jax_nvfp4_moe_align device query", e);
  if (num_experts > 65535 || smem > size_t(optin))
    return invalid(std::to_string(num_experts) + " experts need " + std::to_string(smem) +
                   " bytes of shared memory, more than this GPU's " + std::to_string(optin));
  if (smem > 48 * 1024) {
    e = cudaFuncSetAttribute(moe_align_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (e != cudaSuccess) return cuda_error("jax_nvfp4_moe_align shared-memory opt-in", e);
  }
  moe_align_kernel<<<1, threads, smem, stream>>>(
      topk_ids.typed_data(), static_cast<int>(pairs),
      map_len ? expert_map.typed_data() : nullptr, static_cast<int>(num_experts),
      static_cast<int>(block_m), static_cast<int>(slots), sorted->typed_data(),
      block_expert->typed_data(), num_padded->typed_data());
  e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_error("jax_nvfp4_moe_align launch", e);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_nvfp4

XLA_FFI_DEFINE_HANDLER_SYMBOL(Nvfp4MoeAlignCuda, jax_nvfp4::MoeAlignImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // topk_ids [M, top_k]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_map [E] or [0]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // sorted_ids [P]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // block_expert [P / block_m]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // num_padded [1]
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("block_m"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

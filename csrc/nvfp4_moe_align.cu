// XLA FFI handler of the MoE token alignment (target jax_nvfp4_moe_align_cuda): the CUDA twin of
// jax_nvfp4/moe/align.py's reference, bit for bit.
//
// Input: the expert ids of T = M * top_k (token, k) pairs (pair p = token * top_k + j) and an
// optional expert map (global id -> local id or -1). Output, with P slots (P % block_m == 0):
//   sorted_ids[P]       the pairs grouped by expert, expert 0's run first, ascending inside a
//                       run, each run padded with the sentinel T to a multiple of block_m; the
//                       slots past num_padded hold T too;
//   block_expert[P/bm]  the (mapped) expert of each block of block_m slots; -1 past num_padded;
//   num_padded[1]       the sum of the padded runs.
// Ids outside [0, E) are dropped (they appear nowhere). A scratch result holds [G][E] int32
// block counts when G > 1 (below); nothing reads it afterwards.
//
// The pairs are cut into G contiguous block ranges (G = align_grid(pairs): 1 up to 1024 pairs,
// then one block per 1024 pairs up to 64 blocks), each block's range into contiguous warp
// ranges, each warp range into chunks of 32 pairs. Why: the work is ~100 instructions per chunk
// and pass, and one SM issues ~2 per cycle: a single block took 55 us for the 32768 pairs of a
// 4096-token, top-8 prefill (NOTES_moe.md v9), while a decode step's few pairs want one launch
// and no scratch (3-5 us; the ~9 XLA kernels of the JAX version cost more in launch gaps).
//
// Launch 1 (G > 1 only), moe_align_count_kernel: each block counts its range per expert into
// block_counts[g][E].
// Launch 2, moe_align_place_kernel, per block:
//   1. each warp counts its range into its row of a [warps][E] shared table (per chunk,
//      lanes_equal groups equal ids and the group's lowest lane adds the group's size: no
//      atomics, a row is the warp's own);
//   2. per expert, the rows become exclusive prefixes over the warps; with G > 1, the pairs of
//      that expert in earlier blocks' ranges and its total come from block_counts (every block
//      scans them, so no third launch);
//   3. warp 0 scans the padded totals into each expert's first slot and num_padded;
//   4. the padding slots and block experts of the experts e with e % G == g, this block's share
//      of the tail past num_padded (sentinel / -1; no slot is written twice); each row entry
//      becomes the slot where the warp puts its next pair of that expert;
//   5. each warp walks its range again in order: a pair goes to its row entry + the lower lanes
//      of its chunk with the same expert, and the group's lowest lane advances the entry.
// Ranges ascend with block and warp index and chunks are walked in order, so each run is
// ascending. A block has as many threads as its range has pairs, 128 to 1024 (fewer where E is
// large and the table must fit in shared memory). Ids are loaded kLoadAhead chunks at a time so
// that their global-load latency overlaps.

#include <algorithm>
#include <string>

#include "ffi_util.h"
#include "moe_align_block.cuh"

namespace jax_nvfp4 {
namespace {

using namespace moe_align;

constexpr int kAlignMaxThreads = 1024;
constexpr int kAlignPairsPerBlock = 1024;   // mirrored by ops/moe_align.py align_grid
constexpr int kAlignMaxBlocks = 64;

int64_t align_grid(int64_t pairs) {
  return std::clamp<int64_t>((pairs + kAlignPairsPerBlock - 1) / kAlignPairsPerBlock, 1,
                             kAlignMaxBlocks);
}

// The place kernel's shared memory (int32, all dynamic): total[E], before[E], start[E],
// num_padded, table[warps][E]. The count kernel uses the table only.
size_t align_smem_bytes(int experts, int warps) {
  return align_smem_ints(experts, warps) * sizeof(int);
}

// One warp per 32 pairs of a block's range, 4 to 32 warps, no more than the table allows.
int align_warps(int64_t pairs_per_block, int experts, size_t smem_limit) {
  const int64_t wanted = std::clamp<int64_t>((pairs_per_block + 31) / 32, 4,
                                             kAlignMaxThreads / 32);
  const int64_t fit =
      static_cast<int64_t>((smem_limit / sizeof(int) - 1) / size_t(experts)) - 3;
  return static_cast<int>(std::min(wanted, fit));
}

__global__ void __launch_bounds__(kAlignMaxThreads, 1)
    moe_align_count_kernel(const int *__restrict__ ids, int num_pairs, int experts,
                           int *__restrict__ block_counts) {
  extern __shared__ int table[];   // [warps][E]
  const int warps = blockDim.x / 32;
  count_warp_range<kLoadAhead>(ids, warp_range(num_pairs), experts, table + threadIdx.x / 32 * experts);
  __syncthreads();
  for (int x = threadIdx.x; x < experts; x += blockDim.x) {
    int sum = 0;
    for (int w = 0; w < warps; ++w) sum += table[w * experts + x];
    block_counts[blockIdx.x * experts + x] = sum;
  }
}

__global__ void __launch_bounds__(kAlignMaxThreads, 1)
    moe_align_place_kernel(const int *__restrict__ ids, int num_pairs,
                           const int *__restrict__ expert_map, int experts, int block_m,
                           int slots, const int *__restrict__ block_counts,
                           int *__restrict__ sorted_ids, int *__restrict__ block_expert,
                           int *__restrict__ num_padded_out) {
  extern __shared__ int smem[];
  align_place<kLoadAhead>(ids, num_pairs, expert_map, experts, block_m, slots, block_counts, sorted_ids,
              block_expert, num_padded_out, smem);
}

ffi::Error invalid(const std::string &msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_nvfp4_moe_align: " + msg);
}

ffi::Error MoeAlignImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> topk_ids,
                        ffi::Buffer<ffi::S32> expert_map, ffi::Result<ffi::Buffer<ffi::S32>> sorted,
                        ffi::Result<ffi::Buffer<ffi::S32>> block_expert,
                        ffi::Result<ffi::Buffer<ffi::S32>> num_padded,
                        ffi::Result<ffi::Buffer<ffi::S32>> scratch, int64_t num_experts,
                        int64_t block_m) {
  if (num_experts < 1 || num_experts > 65535) return invalid("num_experts must be in [1, 65535]");
  const int64_t pairs = topk_ids.element_count();
  if (pairs > INT32_MAX / 2) return invalid("too many pairs for one alignment");
  const int64_t map_len = expert_map.element_count();
  const int64_t slots = sorted->element_count();
  const std::string problem =
      alignment_problem(pairs, num_experts, block_m, map_len, slots,
                        block_expert->element_count(), num_padded->element_count());
  if (!problem.empty()) return invalid(problem);
  const int experts = static_cast<int>(num_experts);
  const int64_t grid = align_grid(pairs);
  if (grid > 1 && static_cast<int64_t>(scratch->element_count()) < grid * experts)
    return invalid("the scratch result needs " + std::to_string(grid * experts) +
                   " int32 for " + std::to_string(pairs) + " pairs, got " +
                   std::to_string(scratch->element_count()));

  int optin = 0;
  if (ffi::Error err = smem_optin_bytes(optin, "jax_nvfp4_moe_align"); err.failure()) return err;
  const int64_t pairs_per_block = ((pairs + 31) / 32 + grid - 1) / grid * 32;
  const int warps = align_warps(pairs_per_block, experts, size_t(optin));
  if (warps < 1)
    return invalid(std::to_string(num_experts) + " experts need " +
                   std::to_string(align_smem_bytes(experts, 1)) +
                   " bytes of shared memory or more, more than this GPU's " +
                   std::to_string(optin));
  const int threads = warps * 32;
  const size_t table_smem = size_t(warps) * experts * sizeof(int);
  const size_t smem = align_smem_bytes(experts, warps);
  if (grid > 1) {
    ffi::Error err = allow_dynamic_smem(reinterpret_cast<const void *>(moe_align_count_kernel),
                                        table_smem, "jax_nvfp4_moe_align");
    if (err.failure()) return err;
    moe_align_count_kernel<<<grid, threads, table_smem, stream>>>(
        topk_ids.typed_data(), static_cast<int>(pairs), experts, scratch->typed_data());
  }
  ffi::Error err = allow_dynamic_smem(reinterpret_cast<const void *>(moe_align_place_kernel), smem,
                                      "jax_nvfp4_moe_align");
  if (err.failure()) return err;
  moe_align_place_kernel<<<grid, threads, smem, stream>>>(
      topk_ids.typed_data(), static_cast<int>(pairs), map_len ? expert_map.typed_data() : nullptr,
      experts, static_cast<int>(block_m), static_cast<int>(slots),
      grid > 1 ? scratch->typed_data() : nullptr, sorted->typed_data(), block_expert->typed_data(),
      num_padded->typed_data());
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess)
    return cuda_error("jax_nvfp4_moe_align launch", e);
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
                                  .Ret<ffi::Buffer<ffi::S32>>()  // scratch [G * E] or [1]
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("block_m"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

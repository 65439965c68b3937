// XLA FFI handler of the grouped NVFP4 MoE GEMM (target jax_nvfp4_moe_gemm_cuda).
//
// For every token tile b (block_m = 8 * m_tile slots of the aligned row list) whose expert
// e = block_expert[b] is >= 0 and which starts below num_padded[0], and every slot holding a row
// id = sorted_ids[slot] < rows_out:
//
//   out[id, :] = act((x[id / gather_div, :] @ W_e^T) * global_scale[e] + bias[e]) * topk_weights[id]
//
// (bias, act and topk_weights optional), computed in fp32 with one final cast. act (activation
// code, nvfp4_kernel.cuh kAct*): none, relu2, or a gated one (SwiGLU with an optional clamp,
// gpt-oss) that reads W_e's rows in gate/up pairs of 8 per 16-row tile and halves the output:
// out is [num_rows_out, N / 2] then. expert_rows (>= 0) is
// a launch hint only: the most rows one expert's tile is expected to hold (the token count for
// top-k routing), 0 for none; at 1-4 the k-sliced decode block holds that many x rows
// (nvfp4_kernel.cuh), and any tile content still gives the same results. Every other row of
// out is zero, or left as it was with zero_unwritten = false (fused_moe never reads them: one
// memset node less per GEMM). The tile engine and the split-K reduction are shared with the dense kernel
// (nvfp4_tile.cuh, nvfp4_kernel.cuh); ops/moe.py computes the same workspace size.

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "ffi_util.h"

namespace jax_nvfp4 {
namespace {

ffi::Error invalid(const std::string &msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_nvfp4_moe_gemm: " + msg);
}

ffi::Error MoeGemmImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> qweight,
                       ffi::Buffer<ffi::U8> qscales, ffi::Buffer<ffi::F32> global_scale,
                       ffi::Buffer<ffi::S32> sorted_ids, ffi::Buffer<ffi::S32> block_expert,
                       ffi::Buffer<ffi::S32> num_padded, ffi::Buffer<ffi::F32> topk_weights,
                       ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t n, int64_t k,
                       int64_t gather_div, int64_t num_rows_out, int64_t block_m, int64_t splits,
                       bool mul_topk_weight, bool has_bias, bool cluster,
                       bool zero_unwritten, int64_t k_slices, int64_t tiles_per_block,
                       int64_t expert_rows, int64_t activation, float act_limit,
                       float act_alpha) {
  const auto xt = x.element_type();
  if (xt != ffi::DataType::BF16 && xt != ffi::DataType::F16)
    return invalid("x must be bf16 or f16");
  if (out->element_type() != xt) return invalid("out must have x's dtype");
  if (k <= 0 || k % 16 != 0 || n <= 0) return invalid("need K % 16 == 0, K > 0, N > 0");
  if (block_m != 8 && block_m != 16 && block_m != 32 && block_m != 64)
    return invalid("block_m must be 8, 16, 32 or 64");
  if (gather_div < 1) return invalid("gather_div must be >= 1");
  if (expert_rows < 0) return invalid("expert_rows must be >= 0");
  if (activation < kActNone || activation > kActRelu2)
    return invalid("activation must be 0 (none), 1 (swiglu), 2 (gptoss) or 3 (relu2)");
  const bool gated = act_gated(static_cast<int>(activation));
  if (gated && n % 16 != 0)
    return invalid("a gated activation needs N % 16 == 0 (gate/up pairs of 8 rows per tile)");
  if (gated && !(act_limit > 0.f)) return invalid("act_limit must be > 0 (+inf: no clamp)");
  if (activation == kActGptOss && !std::isfinite(act_limit))
    return invalid("gptoss needs a finite act_limit");
  const int64_t out_n = gated ? n / 2 : n;
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] != k) return invalid("x must be [R, K], got " + dims_str(xd));
  const int64_t x_rows = xd[0];
  const auto wd = qweight.dimensions();
  const int64_t n16 = (n + 15) / 16, k64 = (k + 63) / 64;
  if (wd.size() != 5 || wd[1] != n16 || wd[2] != k64 || wd[3] != 32 || wd[4] != 4)
    return invalid("qweight must be u32 [E, N16, K64, 32, 4], got " + dims_str(wd));
  const int64_t experts = wd[0];
  const auto sd = qscales.dimensions();
  if (sd.size() != 4 || sd[0] != experts || sd[1] != n16 || sd[2] != k64 || sd[3] != 64)
    return invalid("qscales must be u8 [E, N16, K64, 64], got " + dims_str(sd));
  if (static_cast<int64_t>(global_scale.element_count()) != experts)
    return invalid("global_scale must be [E]");
  const int64_t slots = sorted_ids.element_count();
  if (slots % block_m != 0) return invalid("len(sorted_ids) must be a multiple of block_m");
  if (static_cast<int64_t>(block_expert.element_count()) != slots / block_m)
    return invalid("block_expert must have len(sorted_ids) / block_m entries");
  if (num_padded.element_count() != 1) return invalid("num_padded must have one element");
  if (x_rows * gather_div < num_rows_out)
    return invalid("x has too few rows for num_rows_out / gather_div");
  if (mul_topk_weight && static_cast<int64_t>(topk_weights.element_count()) != num_rows_out)
    return invalid("topk_weights must have num_rows_out elements");
  if (has_bias && static_cast<int64_t>(bias.element_count()) != experts * n)
    return invalid("bias must be [E, N]");
  if (static_cast<int64_t>(out->element_count()) != num_rows_out * out_n)
    return invalid(gated ? "out must be [num_rows_out, N / 2] (gated activation)"
                         : "out must be [num_rows_out, N]");
  if (auto why = launch_problem(splits, cluster, k_slices, tiles_per_block, k64,
                                static_cast<int>(block_m / 8), block_m == 8, block_m == 8,
                                "block_m 8");
      !why.empty())
    return invalid(why);
  if (auto why = weight_size_problem(n16, k64); !why.empty()) return invalid(why);
  if (num_rows_out == 0) return ffi::Error::Success();
  if (slots > INT32_MAX / 2 || num_rows_out > INT32_MAX / 2) return invalid("problem too large");

  const int64_t token_tiles = slots / block_m;
  const int64_t n_blocks = (n16 + kWarps - 1) / kWarps;
  const int64_t tickets = ticket_bytes(token_tiles, n_blocks);
  if (token_tiles > 65535) return invalid("too many token tiles for one launch");
  GemmParams p = common_params(x, qweight, qscales, global_scale,
                               has_bias ? bias.typed_data() : nullptr, out->untyped_data(),
                               workspace->untyped_data(), tickets, n, k, splits, cluster);
  p.rows_out = static_cast<int>(num_rows_out);
  p.slots = static_cast<int>(slots);
  const int64_t need = workspace_need(p, tickets);
  if (static_cast<int64_t>(workspace->element_count()) < need)
    return invalid("workspace too small: " + std::to_string(workspace->element_count()) +
                   " < " + std::to_string(need));
  if (auto why = cluster_problem<true>(p, xt == ffi::DataType::BF16,
                                       static_cast<int>(block_m / 8));
      !why.empty())
    return invalid(why);

  if (zero_unwritten) {  // rows of non-local experts (and of nothing) are zero
    cudaError_t e = cudaMemsetAsync(out->untyped_data(), 0, num_rows_out * out_n * 2, stream);
    if (e != cudaSuccess) return cuda_error("jax_nvfp4_moe_gemm memset", e);
  }
  if (token_tiles == 0) return ffi::Error::Success();

  p.sorted_ids = sorted_ids.typed_data();
  p.block_expert = block_expert.typed_data();
  p.num_padded = num_padded.typed_data();
  p.topk_weights = mul_topk_weight ? topk_weights.typed_data() : nullptr;
  p.gather_div = static_cast<int>(gather_div);
  p.tiles_per_block = static_cast<int>(tiles_per_block);
  p.act = static_cast<int>(activation);
  p.act_limit = act_limit;
  p.act_alpha = act_alpha;
  return clear_and_launch<true>(p, tickets, xt == ffi::DataType::BF16,
                                static_cast<int>(block_m / 8), token_tiles, stream,
                                "jax_nvfp4_moe_gemm", static_cast<int>(k_slices),
                                static_cast<int>(std::min<int64_t>(expert_rows, 1 << 20)));
}

}  // namespace
}  // namespace jax_nvfp4

XLA_FFI_DEFINE_HANDLER_SYMBOL(Nvfp4MoeGemmCuda, jax_nvfp4::MoeGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()              // x [R, K]
                                  .Arg<ffi::Buffer<ffi::U32>>()       // qweight [E, ...]
                                  .Arg<ffi::Buffer<ffi::U8>>()        // qscales [E, ...]
                                  .Arg<ffi::Buffer<ffi::F32>>()       // global_scale [E]
                                  .Arg<ffi::Buffer<ffi::S32>>()       // sorted_ids [P]
                                  .Arg<ffi::Buffer<ffi::S32>>()       // block_expert [P / block_m]
                                  .Arg<ffi::Buffer<ffi::S32>>()       // num_padded [1]
                                  .Arg<ffi::Buffer<ffi::F32>>()       // topk_weights ([0] if unused)
                                  .Arg<ffi::Buffer<ffi::F32>>()       // bias [E, N] ([0] if absent)
                                  .Ret<ffi::AnyBuffer>()              // out [num_rows_out, N or N / 2]
                                  .Ret<ffi::Buffer<ffi::U8>>()        // workspace
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("gather_div")
                                  .Attr<int64_t>("num_rows_out")
                                  .Attr<int64_t>("block_m")
                                  .Attr<int64_t>("splits")
                                  .Attr<bool>("mul_topk_weight")
                                  .Attr<bool>("has_bias")
                                  .Attr<bool>("cluster")
                                  .Attr<bool>("zero_unwritten")
                                  .Attr<int64_t>("k_slices")
                                  .Attr<int64_t>("tiles_per_block")
                                  .Attr<int64_t>("expert_rows")
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("act_limit")
                                  .Attr<float>("act_alpha"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

// Here, not in nvfp4_gemm.cu: each kernel instantiation must live in one translation unit, or
// the shared-memory opt-in (cudaFuncSetAttribute) can reach another unit's copy of the kernel
// than the one launched ("invalid argument" at launch above 48 KB).
extern "C" int jax_nvfp4_moe_blocks_per_sm(int mt, int bf16, int k_slices, int rows) {
  return jax_nvfp4::blocks_per_sm<true>(mt, bf16 != 0, k_slices, rows);
}

extern "C" int jax_nvfp4_moe_cluster_limit(int mt, int bf16) {
  return jax_nvfp4::cluster_limit<true>(mt, bf16 != 0);
}

// The lab timeline of this unit's kernels (nvfp4_tile.cuh, built with
// -DJAX_NVFP4_LAB_TIMELINE=1; benchmarks/moe_timeline.py): with out == nullptr, clears it and
// records from now on only launches of weights with n16 N tiles (0: all); else copies up to
// `blocks` records of 9 values into out. Returns the records it holds, or -1 in a build
// without the timeline.
extern "C" int jax_nvfp4_moe_lab_timeline(int n16, unsigned long long *out, int blocks) {
#if JAX_NVFP4_LAB_TIMELINE
  using jax_nvfp4::kLabTimelineBlocks;
  if (out == nullptr) {
    static unsigned long long zero[kLabTimelineBlocks][9];
    if (cudaMemcpyToSymbol(jax_nvfp4::lab_timeline, zero, sizeof zero) != cudaSuccess ||
        cudaMemcpyToSymbol(jax_nvfp4::lab_filter_n16, &n16, sizeof n16) != cudaSuccess)
      return -1;
    return kLabTimelineBlocks;
  }
  const int n = blocks < kLabTimelineBlocks ? blocks : kLabTimelineBlocks;
  if (cudaDeviceSynchronize() != cudaSuccess ||
      cudaMemcpyFromSymbol(out, jax_nvfp4::lab_timeline, size_t(n) * 9 * 8) != cudaSuccess)
    return -1;
  return n;
#else
  (void)n16;
  (void)out;
  (void)blocks;
  return -1;
#endif
}

// XLA FFI handlers of the grouped NVFP4 MoE GEMM (target jax_nvfp4_moe_gemm_cuda) and of a
// layer's two grouped GEMMs in one call (jax_nvfp4_moe_pair_cuda: GEMM 1 with its activation
// fused, then GEMM 2 on its output, the same alignment; MoePairImpl says why).
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

// One grouped GEMM's launch, validated: what MoeGemmImpl and MoePairImpl run.
struct MoeLaunch {
  GemmParams p{};
  int64_t tickets = 0;       // split-K ticket bytes (cleared before the launch when used)
  int64_t token_tiles = 0;   // 0: nothing to launch
  int64_t out_bytes = 0;     // cleared first when zero_unwritten
  bool bf16 = true, zero_unwritten = true;
  int m_tile = 1, k_slices = 1, expert_rows = 0;
};

// The attributes of one grouped GEMM (the FFI attributes of jax_nvfp4_moe_gemm_cuda).
struct MoeAttrs {
  int64_t n, k, gather_div, num_rows_out, block_m, splits;
  bool mul_topk_weight, has_bias, cluster, zero_unwritten;
  int64_t k_slices, tiles_per_block, expert_rows, activation;
  float act_limit, act_alpha;
};

// Checks one grouped GEMM's buffers and attributes and fills its launch; `x` may be another
// GEMM's result (the layer handler's intermediate).
ffi::Error setup_moe_gemm(MoeLaunch &l, const ffi::AnyBuffer &x,
                          const ffi::Buffer<ffi::U32> &qweight,
                          const ffi::Buffer<ffi::U8> &qscales,
                          const ffi::Buffer<ffi::F32> &global_scale,
                          const ffi::Buffer<ffi::S32> &sorted_ids,
                          const ffi::Buffer<ffi::S32> &block_expert,
                          const ffi::Buffer<ffi::S32> &num_padded,
                          const ffi::Buffer<ffi::F32> &topk_weights,
                          const ffi::Buffer<ffi::F32> &bias, ffi::AnyBuffer &out,
                          ffi::Buffer<ffi::U8> &workspace, const MoeAttrs &a) {
  const auto xt = x.element_type();
  if (xt != ffi::DataType::BF16 && xt != ffi::DataType::F16)
    return invalid("x must be bf16 or f16");
  if (out.element_type() != xt) return invalid("out must have x's dtype");
  if (a.k <= 0 || a.k % 16 != 0 || a.n <= 0) return invalid("need K % 16 == 0, K > 0, N > 0");
  if (a.block_m != 8 && a.block_m != 16 && a.block_m != 32 && a.block_m != 64)
    return invalid("block_m must be 8, 16, 32 or 64");
  if (a.gather_div < 1) return invalid("gather_div must be >= 1");
  if (a.expert_rows < 0) return invalid("expert_rows must be >= 0");
  if (a.activation < kActNone || a.activation > kActRelu2)
    return invalid("activation must be 0 (none), 1 (swiglu), 2 (gptoss) or 3 (relu2)");
  const bool gated = act_gated(static_cast<int>(a.activation));
  if (gated && a.n % 16 != 0)
    return invalid("a gated activation needs N % 16 == 0 (gate/up pairs of 8 rows per tile)");
  if (gated && !(a.act_limit > 0.f)) return invalid("act_limit must be > 0 (+inf: no clamp)");
  if (a.activation == kActGptOss && !std::isfinite(a.act_limit))
    return invalid("gptoss needs a finite act_limit");
  const int64_t out_n = gated ? a.n / 2 : a.n;
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] != a.k) return invalid("x must be [R, K], got " + dims_str(xd));
  const int64_t x_rows = xd[0];
  const auto wd = qweight.dimensions();
  const int64_t n16 = (a.n + 15) / 16, k64 = (a.k + 63) / 64;
  if (wd.size() != 5 || wd[1] != n16 || wd[2] != k64 || wd[3] != 32 || wd[4] != 4)
    return invalid("qweight must be u32 [E, N16, K64, 32, 4], got " + dims_str(wd));
  const int64_t experts = wd[0];
  const auto sd = qscales.dimensions();
  if (sd.size() != 4 || sd[0] != experts || sd[1] != n16 || sd[2] != k64 || sd[3] != 64)
    return invalid("qscales must be u8 [E, N16, K64, 64], got " + dims_str(sd));
  if (static_cast<int64_t>(global_scale.element_count()) != experts)
    return invalid("global_scale must be [E]");
  const int64_t slots = sorted_ids.element_count();
  if (slots % a.block_m != 0) return invalid("len(sorted_ids) must be a multiple of block_m");
  if (static_cast<int64_t>(block_expert.element_count()) != slots / a.block_m)
    return invalid("block_expert must have len(sorted_ids) / block_m entries");
  if (num_padded.element_count() != 1) return invalid("num_padded must have one element");
  if (x_rows * a.gather_div < a.num_rows_out)
    return invalid("x has too few rows for num_rows_out / gather_div");
  if (a.mul_topk_weight && static_cast<int64_t>(topk_weights.element_count()) != a.num_rows_out)
    return invalid("topk_weights must have num_rows_out elements");
  if (a.has_bias && static_cast<int64_t>(bias.element_count()) != experts * a.n)
    return invalid("bias must be [E, N]");
  if (static_cast<int64_t>(out.element_count()) != a.num_rows_out * out_n)
    return invalid(gated ? "out must be [num_rows_out, N / 2] (gated activation)"
                         : "out must be [num_rows_out, N]");
  if (auto why = launch_problem(a.splits, a.cluster, a.k_slices, a.tiles_per_block, k64,
                                static_cast<int>(a.block_m / 8), a.block_m == 8, a.block_m == 8,
                                "block_m 8");
      !why.empty())
    return invalid(why);
  if (auto why = weight_size_problem(n16, k64); !why.empty()) return invalid(why);
  l = MoeLaunch{};
  if (a.num_rows_out == 0) return ffi::Error::Success();
  if (slots > INT32_MAX / 2 || a.num_rows_out > INT32_MAX / 2) return invalid("problem too large");

  const int64_t token_tiles = slots / a.block_m;
  const int64_t n_blocks = (n16 + kWarps - 1) / kWarps;
  const int64_t tickets = ticket_bytes(token_tiles, n_blocks);
  if (token_tiles > 65535) return invalid("too many token tiles for one launch");
  GemmParams p = common_params(x, qweight, qscales, global_scale,
                               a.has_bias ? bias.typed_data() : nullptr, out.untyped_data(),
                               workspace.untyped_data(), tickets, a.n, a.k, a.splits, a.cluster);
  p.rows_out = static_cast<int>(a.num_rows_out);
  p.slots = static_cast<int>(slots);
  const int64_t need = workspace_need(p, tickets);
  if (static_cast<int64_t>(workspace.element_count()) < need)
    return invalid("workspace too small: " + std::to_string(workspace.element_count()) +
                   " < " + std::to_string(need));
  l.bf16 = xt == ffi::DataType::BF16;
  l.m_tile = static_cast<int>(a.block_m / 8);
  if (auto why = cluster_problem<true>(p, l.bf16, l.m_tile); !why.empty()) return invalid(why);
  p.sorted_ids = sorted_ids.typed_data();
  p.block_expert = block_expert.typed_data();
  p.num_padded = num_padded.typed_data();
  p.topk_weights = a.mul_topk_weight ? topk_weights.typed_data() : nullptr;
  p.gather_div = static_cast<int>(a.gather_div);
  p.tiles_per_block = static_cast<int>(a.tiles_per_block);
  p.act = static_cast<int>(a.activation);
  p.act_limit = a.act_limit;
  p.act_alpha = a.act_alpha;
  l.p = p;
  l.tickets = p.splits > 1 && !p.cluster ? tickets : 0;
  l.token_tiles = token_tiles;
  l.out_bytes = a.num_rows_out * out_n * 2;
  l.zero_unwritten = a.zero_unwritten;
  l.k_slices = static_cast<int>(a.k_slices);
  l.expert_rows = static_cast<int>(std::min<int64_t>(a.expert_rows, 1 << 20));
  return ffi::Error::Success();
}

// The memsets a launch needs before it: its output where unwritten rows must be zero (rows of
// non-local experts, and of nothing), and its split-K tickets.
ffi::Error clear_before(const MoeLaunch &l, cudaStream_t stream, const char *name) {
  if (l.out_bytes > 0 && l.zero_unwritten) {
    const cudaError_t e = cudaMemsetAsync(l.p.out, 0, l.out_bytes, stream);
    if (e != cudaSuccess) return cuda_error((std::string(name) + " memset").c_str(), e);
  }
  if (l.token_tiles > 0 && l.tickets > 0) {
    const cudaError_t e = cudaMemsetAsync(l.p.tickets, 0, l.tickets, stream);
    if (e != cudaSuccess) return cuda_error((std::string(name) + " tickets memset").c_str(), e);
  }
  return ffi::Error::Success();
}

ffi::Error launch_moe(const MoeLaunch &l, cudaStream_t stream, const char *name) {
  if (l.token_tiles == 0) return ffi::Error::Success();
  const cudaError_t e = launch<true>(l.p, l.bf16, l.m_tile, static_cast<int>(l.token_tiles),
                                     stream, l.k_slices, l.expert_rows);
  if (e != cudaSuccess) return cuda_error((std::string(name) + " launch").c_str(), e);
  return ffi::Error::Success();
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
  const MoeAttrs a{n, k, gather_div, num_rows_out, block_m, splits, mul_topk_weight, has_bias,
                   cluster, zero_unwritten, k_slices, tiles_per_block, expert_rows, activation,
                   act_limit, act_alpha};
  MoeLaunch l;
  if (auto e = setup_moe_gemm(l, x, qweight, qscales, global_scale, sorted_ids, block_expert,
                              num_padded, topk_weights, bias, *out, *workspace, a);
      e.failure())
    return e;
  if (auto e = clear_before(l, stream, "jax_nvfp4_moe_gemm"); e.failure()) return e;
  return launch_moe(l, stream, "jax_nvfp4_moe_gemm");
}

// Both grouped GEMMs of a layer in one handler: GEMM 1 (x -> mid, its activation fused) then
// GEMM 2 (mid -> out, times the top-k weight) on the same alignment. Every memset goes first,
// so that the two launches follow each other directly: launched from one handler, GEMM 2's
// blocks may start under programmatic dependent launch while GEMM 1's last blocks drain
// (XLA records each custom call as its own command, and no such edge exists between two
// calls; NOTES_moe.md v27-v29). GEMM 2 reads mid only after its griddepcontrol.wait.
ffi::Error MoePairImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> qweight1,
                       ffi::Buffer<ffi::U8> qscales1, ffi::Buffer<ffi::F32> global_scale1,
                       ffi::Buffer<ffi::F32> bias1, ffi::Buffer<ffi::U32> qweight2,
                       ffi::Buffer<ffi::U8> qscales2, ffi::Buffer<ffi::F32> global_scale2,
                       ffi::Buffer<ffi::F32> bias2, ffi::Buffer<ffi::S32> sorted_ids,
                       ffi::Buffer<ffi::S32> block_expert, ffi::Buffer<ffi::S32> num_padded,
                       ffi::Buffer<ffi::F32> topk_weights, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::AnyBuffer> mid,
                       ffi::Result<ffi::Buffer<ffi::U8>> workspace1,
                       ffi::Result<ffi::Buffer<ffi::U8>> workspace2, int64_t n1, int64_t k1,
                       int64_t n2, int64_t top_k, int64_t num_rows_out, int64_t block_m,
                       bool has_bias1, bool has_bias2, bool zero_unwritten, int64_t expert_rows,
                       int64_t activation, float act_limit, float act_alpha, int64_t splits1,
                       bool cluster1, int64_t k_slices1, int64_t tiles_per_block1,
                       int64_t splits2, bool cluster2, int64_t k_slices2,
                       int64_t tiles_per_block2) {
  if (activation == kActNone) return invalid("the layer's GEMM 1 needs an activation");
  const int64_t k2 = act_gated(static_cast<int>(activation)) ? n1 / 2 : n1;
  // GEMM 2 reads only the rows of mid that GEMM 1 writes: mid is never cleared.
  const MoeAttrs a1{n1, k1, top_k, num_rows_out, block_m, splits1, false, has_bias1, cluster1,
                    false, k_slices1, tiles_per_block1, expert_rows, activation, act_limit,
                    act_alpha};
  const MoeAttrs a2{n2, k2, 1, num_rows_out, block_m, splits2, true, has_bias2, cluster2,
                    zero_unwritten, k_slices2, tiles_per_block2, expert_rows, kActNone,
                    INFINITY, 1.f};
  MoeLaunch l1, l2;
  if (auto e = setup_moe_gemm(l1, x, qweight1, qscales1, global_scale1, sorted_ids,
                              block_expert, num_padded, topk_weights, bias1, *mid, *workspace1,
                              a1);
      e.failure())
    return e;
  if (auto e = setup_moe_gemm(l2, *mid, qweight2, qscales2, global_scale2, sorted_ids,
                              block_expert, num_padded, topk_weights, bias2, *out, *workspace2,
                              a2);
      e.failure())
    return e;
  const char *name = "jax_nvfp4_moe_pair";
  if (auto e = clear_before(l1, stream, name); e.failure()) return e;
  if (auto e = clear_before(l2, stream, name); e.failure()) return e;
  if (auto e = launch_moe(l1, stream, name); e.failure()) return e;
  return launch_moe(l2, stream, name);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(Nvfp4MoePairCuda, jax_nvfp4::MoePairImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()              // x [M, K1]
                                  .Arg<ffi::Buffer<ffi::U32>>()       // w13 qweight [E, ...]
                                  .Arg<ffi::Buffer<ffi::U8>>()        // w13 qscales
                                  .Arg<ffi::Buffer<ffi::F32>>()       // w13 global_scale [E]
                                  .Arg<ffi::Buffer<ffi::F32>>()       // w13 bias [E, N1] or [0]
                                  .Arg<ffi::Buffer<ffi::U32>>()       // w2 qweight [E, ...]
                                  .Arg<ffi::Buffer<ffi::U8>>()        // w2 qscales
                                  .Arg<ffi::Buffer<ffi::F32>>()       // w2 global_scale [E]
                                  .Arg<ffi::Buffer<ffi::F32>>()       // w2 bias [E, N2] or [0]
                                  .Arg<ffi::Buffer<ffi::S32>>()       // sorted_ids [P]
                                  .Arg<ffi::Buffer<ffi::S32>>()       // block_expert [P / block_m]
                                  .Arg<ffi::Buffer<ffi::S32>>()       // num_padded [1]
                                  .Arg<ffi::Buffer<ffi::F32>>()       // topk_weights [rows]
                                  .Ret<ffi::AnyBuffer>()              // out [rows, N2]
                                  .Ret<ffi::AnyBuffer>()              // mid [rows, K2]
                                  .Ret<ffi::Buffer<ffi::U8>>()        // GEMM 1's workspace
                                  .Ret<ffi::Buffer<ffi::U8>>()        // GEMM 2's workspace
                                  .Attr<int64_t>("n1")
                                  .Attr<int64_t>("k1")
                                  .Attr<int64_t>("n2")
                                  .Attr<int64_t>("top_k")
                                  .Attr<int64_t>("num_rows_out")
                                  .Attr<int64_t>("block_m")
                                  .Attr<bool>("has_bias1")
                                  .Attr<bool>("has_bias2")
                                  .Attr<bool>("zero_unwritten")
                                  .Attr<int64_t>("expert_rows")
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("act_limit")
                                  .Attr<float>("act_alpha")
                                  .Attr<int64_t>("splits1")
                                  .Attr<bool>("cluster1")
                                  .Attr<int64_t>("k_slices1")
                                  .Attr<int64_t>("tiles_per_block1")
                                  .Attr<int64_t>("splits2")
                                  .Attr<bool>("cluster2")
                                  .Attr<int64_t>("k_slices2")
                                  .Attr<int64_t>("tiles_per_block2"),
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

extern "C" void jax_nvfp4_moe_loaded_code(int mt, int bf16, int *out) {
  const jax_nvfp4::LoadedCode code = jax_nvfp4::loaded_code<true>(mt, bf16 != 0);
  out[0] = code.arch;
  out[1] = code.pdl;
  out[2] = code.cluster_limit;
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

// XLA FFI handler of the dense NVFP4 GEMM (target jax_nvfp4_gemm_cuda):
//
//   out[M, N] = (x[M, K] @ W[N, K]^T) * global_scale (+ bias[N])
//
// x and out are bf16 or fp16; W arrives 4-bit in the kernel layout written by
// jax_nvfp4/prepare.py. The kernel (layout, dequant, pipeline, split K) is described in
// nvfp4_tile.cuh and nvfp4_kernel.cuh; this file validates buffers and launches it.

#include <string>
#include <vector>

#include "ffi_util.h"

namespace jax_nvfp4 {
namespace {

ffi::Error invalid(const std::string &msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_nvfp4_gemm: " + msg);
}

// Python computes the same workspace size (ops/dense.py workspace_bytes).
ffi::Error GemmImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> qweight,
                    ffi::Buffer<ffi::U8> qscales, ffi::Buffer<ffi::F32> global_scale,
                    ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t n, int64_t k,
                    int64_t splits, int64_t m_tile, bool has_bias, bool cluster,
                    int64_t k_slices, int64_t tiles_per_block) {
  const auto xt = x.element_type();
  if (xt != ffi::DataType::BF16 && xt != ffi::DataType::F16)
    return invalid("x must be bf16 or f16");
  if (out->element_type() != xt) return invalid("out must have x's dtype");
  const auto xd = x.dimensions();
  if (xd.size() < 1 || xd.back() != k)
    return invalid("x must be [..., K] with K = " + std::to_string(k) + ", got " + dims_str(xd));
  if (k <= 0 || k % 16 != 0 || n <= 0) return invalid("need K % 16 == 0, K > 0, N > 0");
  const int64_t m = static_cast<int64_t>(x.element_count()) / k;
  const int64_t n16 = (n + 15) / 16, k64 = (k + 63) / 64;
  const auto wd = qweight.dimensions();
  if (wd.size() != 4 || wd[0] != n16 || wd[1] != k64 || wd[2] != 32 || wd[3] != 4)
    return invalid("qweight must be u32 " + dims_str(std::vector<int64_t>{n16, k64, 32, 4}) +
                   ", got " + dims_str(wd));
  const auto sd = qscales.dimensions();
  if (sd.size() != 3 || sd[0] != n16 || sd[1] != k64 || sd[2] != 64)
    return invalid("qscales must be u8 [N16, K64, 64], got " + dims_str(sd));
  if (global_scale.element_count() != 1) return invalid("global_scale must be a scalar");
  if (has_bias && bias.element_count() != static_cast<size_t>(n))
    return invalid("bias must have N elements");
  if (static_cast<int64_t>(out->element_count()) != m * n) return invalid("out must be [..., N]");
  if (m_tile != 1 && m_tile != 2 && m_tile != 4 && m_tile != 8) return invalid("bad m_tile");
  if (auto why = launch_problem(splits, cluster, k_slices, tiles_per_block, k64,
                                static_cast<int>(m_tile), m_tile <= 2, m_tile == 1,
                                "m_tile 1 or 2");
      !why.empty())
    return invalid(why);
  const int64_t token_tiles = (m + 8 * m_tile - 1) / (8 * m_tile);
  const int64_t n_blocks = (n16 + kWarps - 1) / kWarps;  // of the k_slices = 1 launch
  if (m == 0) return ffi::Error::Success();
  if (m > INT32_MAX / 2) return invalid("problem too large");
  if (auto why = weight_size_problem(n16, k64); !why.empty()) return invalid(why);

  if (token_tiles > 65535) return invalid("too many token tiles for one launch");

  const int64_t tickets = ticket_bytes(token_tiles, n_blocks);
  GemmParams p = common_params(x, qweight, qscales, global_scale,
                               has_bias ? bias.typed_data() : nullptr, out->untyped_data(),
                               workspace->untyped_data(), tickets, n, k, splits, cluster);
  p.rows_out = static_cast<int>(m);
  p.slots = static_cast<int>(m);
  p.tiles_per_block = static_cast<int>(tiles_per_block);
  const int64_t need = workspace_need(p, tickets);
  if (static_cast<int64_t>(workspace->element_count()) < need)
    return invalid("workspace too small: " + std::to_string(workspace->element_count()) +
                   " < " + std::to_string(need));
  if (auto why = cluster_problem<false>(p, xt == ffi::DataType::BF16, static_cast<int>(m_tile));
      !why.empty())
    return invalid(why);
  return clear_and_launch<false>(p, tickets, xt == ffi::DataType::BF16, static_cast<int>(m_tile),
                                 token_tiles, stream, "jax_nvfp4_gemm",
                                 static_cast<int>(k_slices));
}

}  // namespace
}  // namespace jax_nvfp4

XLA_FFI_DEFINE_HANDLER_SYMBOL(Nvfp4GemmCuda, jax_nvfp4::GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()              // x
                                  .Arg<ffi::Buffer<ffi::U32>>()       // qweight
                                  .Arg<ffi::Buffer<ffi::U8>>()        // qscales
                                  .Arg<ffi::Buffer<ffi::F32>>()       // global_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()       // bias ([0] when absent)
                                  .Ret<ffi::AnyBuffer>()              // out
                                  .Ret<ffi::Buffer<ffi::U8>>()        // workspace
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("splits")
                                  .Attr<int64_t>("m_tile")
                                  .Attr<bool>("has_bias")
                                  .Attr<bool>("cluster")
                                  .Attr<int64_t>("k_slices")
                                  .Attr<int64_t>("tiles_per_block"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

// Largest K split the cluster reduction can launch for token tile mt (0: not on this device).
extern "C" int jax_nvfp4_cluster_limit(int mt, int bf16) {
  return jax_nvfp4::cluster_limit<false>(mt, bf16 != 0);
}

// The architecture the loaded code of token tile mt was compiled for, whether its launches may
// overlap the previous kernel (PDL) and its cluster limit, on the current device:
// out = {arch, pdl, cluster_limit} (jax_nvfp4._C.loaded_code).
extern "C" void jax_nvfp4_loaded_code(int mt, int bf16, int *out) {
  const jax_nvfp4::LoadedCode code = jax_nvfp4::loaded_code<false>(mt, bf16 != 0);
  out[0] = code.arch;
  out[1] = code.pdl;
  out[2] = code.cluster_limit;
}

// Resident blocks per SM for token tile mt (the split-K choice fills one wave); 0 if unknown.
extern "C" int jax_nvfp4_blocks_per_sm(int mt, int bf16, int k_slices, int rows) {
  return jax_nvfp4::blocks_per_sm<false>(mt, bf16 != 0, k_slices, rows);
}

// The most shared memory one block may have on the current device (JAX_NVFP4_SMEM_LIMIT_KB
// applied); 0 without a device.
extern "C" int jax_nvfp4_smem_limit() { return jax_nvfp4::smem_limit(); }

// Multiprocessor count of the current device (for the split-K choice made at trace time).
extern "C" int jax_nvfp4_sm_count() {
  return jax_nvfp4::device_attribute(cudaDevAttrMultiProcessorCount);
}

// Small helpers shared by the FFI handlers.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "nvfp4_kernel.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_nvfp4 {

inline std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

inline ffi::Error cuda_error(const char *what, cudaError_t e) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string(what) + ": " + cudaGetErrorString(e));
}

// The current device's opt-in shared memory per block, in bytes.
inline ffi::Error smem_optin_bytes(int &bytes, const char *what) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return cuda_error((std::string(what) + " device query").c_str(), e);
  return ffi::Error::Success();
}

// Lets `kernel` launch with `smem` bytes of dynamic shared memory (an opt-in above 48 KB).
inline ffi::Error allow_dynamic_smem(const void *kernel, size_t smem, const char *what) {
  if (smem <= 48 * 1024) return ffi::Error::Success();
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
  if (e != cudaSuccess) return cuda_error((std::string(what) + " shared-memory opt-in").c_str(), e);
  return ffi::Error::Success();
}

// The launch-shape attributes both GEMM handlers take, checked against each other and the K
// range; "" when consistent. `k_sliced_tile` names where k-slices exist (the dense kernel: 8
// slices at m_tile 1 or 2, 4 at m_tile 1; the grouped one: both at block_m 8), `k_sliced`
// whether this launch is there and `pair_sliced` whether it may take 4 slices. `m_tile` sizes
// the unsliced block's pipeline unit, what a K split is counted in (every split gets one).
inline std::string launch_problem(int64_t splits, bool cluster, int64_t k_slices,
                                  int64_t tiles_per_block, int64_t k64, int m_tile, bool k_sliced,
                                  bool pair_sliced, const char *k_sliced_tile) {
  const int unit = unsliced_unit_chunks(m_tile);
  if (splits < 1 || splits > (k64 + unit - 1) / unit)
    return "splits out of range (at most one per pipeline unit of " + std::to_string(unit) +
           " k64 chunks)";
  if (k_slices != 1 && k_slices != kDecodeKSlices && k_slices != kPairKSlices)
    return "k_slices must be 1, " + std::to_string(kPairKSlices) + " or " +
           std::to_string(kDecodeKSlices);
  if (k_slices != 1 && (!k_sliced || splits != 1 || cluster))
    return std::string("k_slices > 1 needs ") + k_sliced_tile + ", splits 1 and no cluster";
  if (k_slices == kPairKSlices && !pair_sliced)
    return "k_slices " + std::to_string(kPairKSlices) + " needs m_tile 1";
  if (tiles_per_block < 1 || tiles_per_block > 65535 ||
      (tiles_per_block > 1 && (splits != 1 || cluster)))
    return "tiles_per_block must be in [1, 65535], and 1 when K is split across blocks";
  return "";
}

// "" when the kernel can address one [N, K] weight (one expert's): tile_mainloop counts its
// 16-byte pieces, n16 * k64 * 32, in 32 bits.
inline std::string weight_size_problem(int64_t n16, int64_t k64) {
  if (n16 * 16 > INT32_MAX || k64 * 64 > INT32_MAX)  // GemmParams holds N and K as int
    return "N and K must each stay below 2^31";
  if (n16 * k64 * 32 <= int64_t{0xFFFFFFFF}) return "";
  return "a weight of " + std::to_string(n16 * 16) + " x " + std::to_string(k64 * 64) +
         " is beyond the kernel's 32-bit weight addressing; split N";
}

// The launch fields both handlers share. The workspace holds `ticket_bytes` of split-K tickets,
// then the fp32 partials.
inline GemmParams common_params(const ffi::AnyBuffer &x, const ffi::Buffer<ffi::U32> &qweight,
                                const ffi::Buffer<ffi::U8> &qscales,
                                const ffi::Buffer<ffi::F32> &global_scale, const float *bias,
                                void *out, void *workspace, int64_t ticket_bytes, int64_t n,
                                int64_t k, int64_t splits, bool cluster) {
  GemmParams p{};
  p.x = x.untyped_data();
  p.qweight = reinterpret_cast<const uint4 *>(qweight.typed_data());
  p.qscales = reinterpret_cast<const uint4 *>(qscales.typed_data());
  p.global_scale = global_scale.typed_data();
  p.bias = bias;
  p.out = out;
  auto *ws = static_cast<uint8_t *>(workspace);
  p.tickets = reinterpret_cast<int *>(ws);
  p.partials = reinterpret_cast<float *>(ws + ticket_bytes);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.n16 = static_cast<int>((n + 15) / 16);
  p.k64 = static_cast<int>((k + 63) / 64);
  p.splits = static_cast<int>(splits);
  p.tiles_per_block = 1;
  p.cluster = cluster && splits > 1;
  return p;
}

// Bytes of workspace the launch needs: none for the cluster reduction, else tickets + partials.
inline int64_t workspace_need(const GemmParams &p, int64_t ticket_bytes) {
  return p.splits > 1 && !p.cluster ? ticket_bytes + int64_t(p.splits) * p.slots * p.n * 4 : 0;
}

// Checks a requested cluster reduction against what the device runs; "" when it can launch.
template <bool kMoe>
std::string cluster_problem(const GemmParams &p, bool bf16, int m_tile) {
  if (!p.cluster) return "";
  const int limit = cluster_limit<kMoe>(m_tile, bf16);
  if (p.splits <= limit) return "";
  return "cluster split-K with " + std::to_string(p.splits) + " splits cannot launch here " +
         "(largest cluster " + std::to_string(limit) + "; it needs code built for sm_90)";
}

// Clears the split-K tickets (when K is split across blocks that reduce through global
// memory) and launches; `name` prefixes CUDA errors.
template <bool kMoe>
ffi::Error clear_and_launch(const GemmParams &p, int64_t ticket_bytes, bool bf16, int m_tile,
                            int64_t token_tiles, cudaStream_t stream, const std::string &name,
                            int k_slices = 1, int expert_rows = 0) {
  if (p.splits > 1 && !p.cluster) {
    cudaError_t e = cudaMemsetAsync(p.tickets, 0, ticket_bytes, stream);
    if (e != cudaSuccess) return cuda_error((name + " memset").c_str(), e);
  }
  cudaError_t e =
      launch<kMoe>(p, bf16, m_tile, static_cast<int>(token_tiles), stream, k_slices, expert_rows);
  if (e != cudaSuccess) return cuda_error((name + " launch").c_str(), e);
  return ffi::Error::Success();
}

}  // namespace jax_nvfp4

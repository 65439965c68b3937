// XLA FFI handler jax_nvfp4_dequantize_cuda: the prefill path's weight expansion.
//
//   out[e, n, k] = e2m1(code[e, n, k]) * block_scale[e, n, k / 16]      (no global scale)
//
// from the kernel layout (nvfp4_tile.cuh) to a row-major bf16 / fp16 [E, N, K] tensor that XLA's
// GEMM then reads; the global scale is applied to the GEMM's fp32 result, as in the kernel. The
// product of a 2-bit-mantissa code and a UE5M3 scale has at most 5 significant bits and lies in
// [2^-10, 2688]: exact in both output types.
//
// One warp expands one 16 x 64 tile (one k64 chunk of one N16 row tile): the lane's 16-byte
// load holds its A fragments of the tile's four k16 steps, decoded with the GEMM's own bit
// trick (dequant_word, widen_scales, scale_half) and then multiplied by 2^-c (the exponent
// offset the GEMM folds into its global scale; a power of two, so exact). The fragments go to a
// padded shared-memory tile (row stride 72 elements: the 32 lanes' 4-byte stores hit 32
// distinct banks) and leave as 16-byte row pieces, so every global store is a full 128-byte row
// segment. Memory-bound: 0.56 bytes read per 2 written (bf16).

#include <string>
#include <vector>

#include "ffi_util.h"

namespace jax_nvfp4 {
namespace {

constexpr int kRowStride = 72;  // elements per shared tile row (64 + 8 of padding)

template <typename T>
__global__ void __launch_bounds__(kThreads) dequant_kernel(const uint4 *__restrict__ qweight,
                                                           const uint2 *__restrict__ qscales,
                                                           T *__restrict__ out, int64_t tiles,
                                                           int n, int k, int n16, int k64) {
  using Tr = Half2Traits<T>;
  __shared__ __align__(16) T smem[kWarps][16 * kRowStride];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (tile >= tiles) return;  // whole warp: no block-wide barrier below

  const uint4 w = __ldg(qweight + tile * 32 + lane);
  const uint2 sc = __ldg(qscales + tile * 8 + g);  // [row g | row g+8] x steps 0..3
  const uint32_t s_lo[2] = {widen_scales<T>(sc.x, true), widen_scales<T>(sc.x, false)};
  const uint32_t s_hi[2] = {widen_scales<T>(sc.y, true), widen_scales<T>(sc.y, false)};
  uint32_t unbias;  // 2^-c in both halves
  {
    const T u = static_cast<T>(Tr::kUnbias);
    const uint16_t bits = *reinterpret_cast<const uint16_t *>(&u);
    unbias = bits | (static_cast<uint32_t>(bits) << 16);
  }
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  T *tile_smem = smem[warp];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t a[4];
    dequant_word<T>(words[j], a);
    const bool high = j >= 2;
    a[0] = scale_half<T>(scale_half<T>(a[0], s_lo[j & 1], high), unbias, false);
    a[1] = scale_half<T>(scale_half<T>(a[1], s_hi[j & 1], high), unbias, false);
    a[2] = scale_half<T>(scale_half<T>(a[2], s_lo[j & 1], high), unbias, false);
    a[3] = scale_half<T>(scale_half<T>(a[3], s_hi[j & 1], high), unbias, false);
    // a[0] = rows g, cols 2t..2t+1; a[1] row g+8; a[2] / a[3] the same rows at cols 2t+8..2t+9.
    const int col = 16 * j + 2 * t;
    *reinterpret_cast<uint32_t *>(tile_smem + g * kRowStride + col) = a[0];
    *reinterpret_cast<uint32_t *>(tile_smem + (g + 8) * kRowStride + col) = a[1];
    *reinterpret_cast<uint32_t *>(tile_smem + g * kRowStride + col + 8) = a[2];
    *reinterpret_cast<uint32_t *>(tile_smem + (g + 8) * kRowStride + col + 8) = a[3];
  }
  __syncwarp();

  // Tile -> (expert, row tile, chunk): qweight is [E][N16][K64], the same order as `tile`.
  const int64_t row_tile = tile / k64;
  const int chunk = static_cast<int>(tile - row_tile * k64);
  const int64_t expert = row_tile / n16;
  const int n0 = static_cast<int>(row_tile - expert * n16) * 16;
  const int piece = lane & 7;           // 8 elements = 16 bytes
  const int col = chunk * 64 + piece * 8;
  if (col >= k) return;                 // K % 8 == 0: a piece is all in or all out
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = (lane >> 3) + 4 * i;
    if (n0 + r >= n) break;
    const uint4 v = *reinterpret_cast<const uint4 *>(tile_smem + r * kRowStride + piece * 8);
    *reinterpret_cast<uint4 *>(out + (expert * n + n0 + r) * static_cast<int64_t>(k) + col) = v;
  }
}

ffi::Error invalid(const std::string &msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_nvfp4_dequantize: " + msg);
}

ffi::Error DequantizeImpl(cudaStream_t stream, ffi::Buffer<ffi::U32> qweight,
                          ffi::Buffer<ffi::U8> qscales, ffi::Result<ffi::AnyBuffer> out,
                          int64_t n, int64_t k) {
  const auto ot = out->element_type();
  if (ot != ffi::DataType::BF16 && ot != ffi::DataType::F16) return invalid("out must be bf16 or f16");
  if (k <= 0 || k % 16 != 0 || n <= 0) return invalid("need K % 16 == 0, K > 0, N > 0");
  const int64_t n16 = (n + 15) / 16, k64 = (k + 63) / 64;
  const auto wd = qweight.dimensions();
  const auto sd = qscales.dimensions();
  const size_t lead = wd.size() >= 4 ? wd.size() - 4 : 0;
  if (wd.size() < 4 || wd[lead] != n16 || wd[lead + 1] != k64 || wd[lead + 2] != 32 ||
      wd[lead + 3] != 4)
    return invalid("qweight must be u32 [..., " + std::to_string(n16) + ", " +
                   std::to_string(k64) + ", 32, 4], got " + dims_str(wd));
  if (sd.size() != lead + 3 || sd[lead] != n16 || sd[lead + 1] != k64 || sd[lead + 2] != 64)
    return invalid("qscales must be u8 [..., N16, K64, 64] with qweight's leading dims, got " +
                   dims_str(sd));
  int64_t experts = 1;
  for (size_t i = 0; i < lead; ++i) {
    if (sd[i] != wd[i]) return invalid("qweight and qscales leading dims differ");
    experts *= wd[i];
  }
  const auto od = out->dimensions();
  if (od.size() != lead + 2 || od[lead] != n || od[lead + 1] != k)
    return invalid("out must be [..., N, K], got " + dims_str(od));
  for (size_t i = 0; i < lead; ++i)  // the kernel writes experts * N * K elements
    if (od[i] != wd[i]) return invalid("out's leading dims must be qweight's");
  const int64_t tiles = experts * n16 * k64;
  if (tiles == 0) return ffi::Error::Success();
  if (n > INT32_MAX || k > INT32_MAX || (tiles + kWarps - 1) / kWarps > INT32_MAX)
    return invalid("weight too large");
  const auto *w = reinterpret_cast<const uint4 *>(qweight.typed_data());
  const auto *s = reinterpret_cast<const uint2 *>(qscales.typed_data());
  const unsigned blocks = static_cast<unsigned>((tiles + kWarps - 1) / kWarps);
  if (ot == ffi::DataType::BF16)
    dequant_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
        w, s, static_cast<__nv_bfloat16 *>(out->untyped_data()), tiles, static_cast<int>(n),
        static_cast<int>(k), static_cast<int>(n16), static_cast<int>(k64));
  else
    dequant_kernel<__half><<<blocks, kThreads, 0, stream>>>(
        w, s, static_cast<__half *>(out->untyped_data()), tiles, static_cast<int>(n),
        static_cast<int>(k), static_cast<int>(n16), static_cast<int>(k64));
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess)
    return cuda_error("jax_nvfp4_dequantize launch", e);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_nvfp4

XLA_FFI_DEFINE_HANDLER_SYMBOL(Nvfp4DequantizeCuda, jax_nvfp4::DequantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()  // qweight [..., N16, K64, 32, 4]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // qscales [..., N16, K64, 64]
                                  .Ret<ffi::AnyBuffer>()         // out [..., N, K] bf16 / f16
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("k"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

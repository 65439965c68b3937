// NVFP4 weight-only GEMM (W4A16) on mma.sync tensor cores, SM80 and newer.
//
//   out[M, N] = (x[M, K] @ W[N, K]^T) * global_scale (+ bias[N])
//
// x and out are bf16 or fp16; W arrives 4-bit in the *kernel layout* written by
// jax_nvfp4/prepare.py. Accumulation is fp32.
//
// ---------------------------------------------------------------------------------------------
// Orientation. Decode (small M) is what this kernel is for, so the weight is the MMA's A operand
// (16 rows of N) and the activations are B (8 tokens): m16n8k16 then wastes nothing at M <= 8,
// and each weight element is dequantized once per block of tokens. C comes out as out^T tiles.
//
// Fragments of mma.m16n8k16 (g = lane / 4, t = lane % 4), with A = W tile, B = x^T tile:
//   a[0] = W[g  ][2t, 2t+1]   a[1] = W[g+8][2t, 2t+1]   a[2] = W[g][2t+8, 2t+9]   a[3] = W[g+8][2t+8, 2t+9]
//   b[0] = x[g][2t, 2t+1]     b[1] = x[g][2t+8, 2t+9]
//   c[0..1] = out^T[g][2t, 2t+1]  c[2..3] = out^T[g+8][2t, 2t+1]   (row = n, col = token)
//
// Weight layout (uint32 [N/16][K/64][32 lanes][4 k16 steps]): one 32-bit word holds the 8 codes
// a lane needs for one 16x16 tile, so a lane's four k16 steps are one 16-byte load and a warp
// streams 512 contiguous bytes per k64 chunk. Inside the word, pair i (= a[i]) keeps the 3
// magnitude bits of its low element at bits 3i..3i+2 and of its high element at 16+3i..18+3i;
// the two signs sit at bits 12+i and 28+i. One shift and mask per part then drops the
// magnitudes into the exponent-low/mantissa-high bits of a 16-bit float and the signs onto bit 15:
//   bf16: value bits e1 e0 m -> bits 8..6  => E2M1 * 2^-126 (0.5 becomes a bf16 subnormal)
//   fp16: value bits e1 e0 m -> bits 11..9 => E2M1 * 2^-14  (0.5 becomes an fp16 subnormal)
// No lookup table, no local memory.
//
// Block scales (uint8 [N/16][K/64][8 g][2 rows g,g+8][4 k16 steps]) are stored as "UE5M3":
// unsigned, 5 exponent bits (bias 10), 3 mantissa bits; every E4M3 value, subnormals included,
// is a normal UE5M3 number. Widening to the 16-bit float is one multiply-add on a byte pair:
//   bf16: (u << 4) + (235 << 7) = s * 2^118     fp16: (u << 7) + (12 << 10) = s * 2^7
// so the dequantized weight E2M1 * s * 2^c (c = -8 for bf16, -7 for fp16) is exact and normal
// (or an exact fp16 subnormal), and 2^-c is folded into the global scale, applied to the fp32
// accumulator in the epilogue (never to a 16-bit value: no fp16 overflow before the scale).
//
// Pipeline. Each warp owns one 16-row N tile and streams its K range: the loads of the next
// group of k64 chunks (16-byte weight + 8-byte scale loads, L1-bypassing, evict-first) are issued
// before the current group is dequantized and multiplied, so several KB per SM are in flight.
// Activations are read through L1 (every warp of a block reads the same rows).
//
// Split K. At small M there are too few N tiles to fill 132 SMs, so K is split over gridDim.y.
// Each split writes an fp32 partial; the last block to finish a tile (atomic ticket) sums the
// partials in split order 0..S-1, so the result is bitwise deterministic.
// ---------------------------------------------------------------------------------------------

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_nvfp4 {
namespace {

constexpr int kWarps = 8;               // warps per block, one N tile (16 rows) each
constexpr int kThreads = kWarps * 32;
constexpr int kGroup = 4;               // k64 chunks loaded ahead per step of the pipeline

template <typename T>
struct Half2Traits;

template <>
struct Half2Traits<__nv_bfloat16> {
  static constexpr uint32_t kMagMask = 0x01C001C0u;
  static constexpr int kMagShift = 6;     // pair 0's magnitude goes to bits 6..8
  static constexpr uint32_t kScaleMul = 16;
  static constexpr uint32_t kScaleAdd = (235u << 7) | (235u << 23);
  static constexpr float kUnbias = 256.0f;  // 2^8
};

template <>
struct Half2Traits<__half> {
  static constexpr uint32_t kMagMask = 0x0E000E00u;
  static constexpr int kMagShift = 9;     // pair 0's magnitude goes to bits 9..11
  static constexpr uint32_t kScaleMul = 128;
  static constexpr uint32_t kScaleAdd = (12u << 10) | (12u << 26);
  static constexpr float kUnbias = 128.0f;  // 2^7
};

__device__ __forceinline__ uint32_t shift_left(uint32_t x, int s) {
  return s >= 0 ? (x << s) : (x >> -s);
}

// The four A-fragment registers of one 16x16 weight tile, before the block scale.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t q, uint32_t (&a)[4]) {
  using Tr = Half2Traits<T>;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t mag = shift_left(q, Tr::kMagShift - 3 * i) & Tr::kMagMask;
    const uint32_t sgn = shift_left(q, 3 - i) & 0x80008000u;
    a[i] = mag | sgn;
  }
}

template <typename T>
__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b);

template <>
__device__ __forceinline__ uint32_t hmul2<__nv_bfloat16>(uint32_t a, uint32_t b) {
  __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162 *>(&a),
                             *reinterpret_cast<__nv_bfloat162 *>(&b));
  return *reinterpret_cast<uint32_t *>(&r);
}

template <>
__device__ __forceinline__ uint32_t hmul2<__half>(uint32_t a, uint32_t b) {
  __half2 r = __hmul2(*reinterpret_cast<__half2 *>(&a), *reinterpret_cast<__half2 *>(&b));
  return *reinterpret_cast<uint32_t *>(&r);
}

// Byte j of `bytes`, widened to a 16-bit float scale in both halves.
template <typename T>
__device__ __forceinline__ uint32_t widen_scale(uint32_t bytes, int j) {
  using Tr = Half2Traits<T>;
  const uint32_t pair = __byte_perm(bytes, 0u, 0x4040u | (j << 8) | j);
  return pair * Tr::kScaleMul + Tr::kScaleAdd;
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Weights are streamed once: keep them out of L1 and let L2 evict them first, so that the
// activations (read by every block) stay cached.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ uint4 load_stream16(const uint4 *p, uint64_t policy) {
  uint4 v;
  asm volatile(
      "ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "l"(policy));
  return v;
}

__device__ __forceinline__ uint2 load_stream8(const uint2 *p, uint64_t policy) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v2.u32 {%0,%1}, [%2], %3;\n"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p), "l"(policy));
  return v;
}

// One k16 step: dequantize one 16x16 weight tile into A fragments, multiply with MT token tiles.
// kx is the step's first K index in units of 32-bit pairs of x.
template <typename T, int MT>
__device__ __forceinline__ void k16_step(uint32_t word, uint2 scales, int j,
                                         const uint32_t *const (&xrow)[MT], int kx,
                                         float (&acc)[MT][4]) {
  uint32_t a[4];
  dequant_word<T>(word, a);
  const uint32_t s_lo = widen_scale<T>(scales.x, j);  // row g
  const uint32_t s_hi = widen_scale<T>(scales.y, j);  // row g + 8
  a[0] = hmul2<T>(a[0], s_lo);
  a[1] = hmul2<T>(a[1], s_hi);
  a[2] = hmul2<T>(a[2], s_lo);
  a[3] = hmul2<T>(a[3], s_hi);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const uint32_t b0 = __ldg(xrow[mt] + kx);
    const uint32_t b1 = __ldg(xrow[mt] + kx + 4);
    mma_16816<T>(acc[mt], a, b0, b1);
  }
}

struct GemmParams {
  const void *x;           // [M, K]
  const uint4 *qweight;    // [N16][K64][32] uint4
  const uint2 *qscales;    // [N16][K64][8] uint2
  const float *global_scale;
  const float *bias;       // [N] or null
  void *out;               // [M, N]
  float *partials;         // [splits][M][N] when splits > 1
  int *tickets;            // one per (M tile, N block) when splits > 1
  int m, n, k;
  int n16, k64;
  int splits;
};

// MT: token tiles of 8 per block (block covers 8*MT tokens).
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) nvfp4_gemm_kernel(const GemmParams p) {
  using Tr = Half2Traits<T>;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int tile_n = blockIdx.x * kWarps + warp;   // 16-row N tile of this warp
  const int split = blockIdx.y;
  const int m0 = blockIdx.z * 8 * MT;
  const bool active = tile_n < p.n16;

  // This split's k64 chunks.
  const int c_begin = static_cast<int>((static_cast<int64_t>(p.k64) * split) / p.splits);
  const int c_end = static_cast<int>((static_cast<int64_t>(p.k64) * (split + 1)) / p.splits);
  const int k16_total = p.k / 16;

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[mt][r] = 0.f;

  // Rows of x this lane feeds as B (token g of each 8-token tile). A token past M reads row 0
  // instead: a B column only feeds its own output column, which is never stored.
  const uint32_t *xrow[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = m0 + mt * 8 + g;
    xrow[mt] = reinterpret_cast<const uint32_t *>(static_cast<const T *>(p.x) +
                                                  static_cast<int64_t>(m < p.m ? m : 0) * p.k) + t;
  }

  if (active) {
    const uint4 *wp = p.qweight + (static_cast<int64_t>(tile_n) * p.k64) * 32 + lane;
    const uint2 *sp = p.qscales + (static_cast<int64_t>(tile_n) * p.k64) * 8 + g;

    const uint64_t policy = evict_first_policy();
    uint4 wbuf[kGroup];
    uint2 sbuf[kGroup];
    auto issue = [&](int c0) {
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        const int c = c0 + u;
        if (c < c_end) {
          wbuf[u] = load_stream16(wp + static_cast<int64_t>(c) * 32, policy);
          sbuf[u] = load_stream8(sp + static_cast<int64_t>(c) * 8, policy);
        }
      }
    };

    issue(c_begin);
    for (int c0 = c_begin; c0 < c_end; c0 += kGroup) {
      uint4 w[kGroup];
      uint2 s[kGroup];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        w[u] = wbuf[u];
        s[u] = sbuf[u];
      }
      issue(c0 + kGroup);  // the next group is in flight while this one computes
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        const int c = c0 + u;
        if (c >= c_end) break;
        const uint32_t words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
        // Only the last chunk of K can be partial; x must not be read past K there.
        const int steps = min(4, k16_total - c * 4);
        if (steps == 4) {
#pragma unroll
          for (int j = 0; j < 4; ++j) k16_step<T, MT>(words[j], s[u], j, xrow, (c * 4 + j) * 8, acc);
        } else {
          for (int j = 0; j < steps; ++j) k16_step<T, MT>(words[j], s[u], j, xrow, (c * 4 + j) * 8, acc);
        }
      }
    }
  }

  const float gscale = __ldg(p.global_scale) * Tr::kUnbias;
  const int n_lo = tile_n * 16 + g;
  const int n_hi = n_lo + 8;

  auto store = [&](int m, int n, float v) {
    if (m < p.m && n < p.n) {
      v *= gscale;
      if (p.bias != nullptr) v += __ldg(p.bias + n);
      static_cast<T *>(p.out)[static_cast<int64_t>(m) * p.n + n] = static_cast<T>(v);
    }
  };

  if (p.splits == 1) {
    if (!active) return;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int m = m0 + mt * 8 + 2 * t;
      store(m, n_lo, acc[mt][0]);
      store(m + 1, n_lo, acc[mt][1]);
      store(m, n_hi, acc[mt][2]);
      store(m + 1, n_hi, acc[mt][3]);
    }
    return;
  }

  // Split K: publish this split's partial, then the last block of the tile reduces in order.
  const int64_t mn = static_cast<int64_t>(p.m) * p.n;
  float *mine = p.partials + split * mn;
  auto put = [&](int m, int n, float v) {
    if (m < p.m && n < p.n) __stcg(mine + static_cast<int64_t>(m) * p.n + n, v);
  };
  if (active) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int m = m0 + mt * 8 + 2 * t;
      put(m, n_lo, acc[mt][0]);
      put(m + 1, n_lo, acc[mt][1]);
      put(m, n_hi, acc[mt][2]);
      put(m + 1, n_hi, acc[mt][3]);
    }
  }
  __threadfence();
  __syncthreads();
  __shared__ int is_last;
  if (threadIdx.x == 0) {
    const int ticket = atomicAdd(p.tickets + blockIdx.z * gridDim.x + blockIdx.x, 1);
    is_last = ticket == p.splits - 1;
  }
  __syncthreads();
  if (!is_last || !active) return;
  __threadfence();
  auto reduce = [&](int m, int n) {
    if (m >= p.m || n >= p.n) return;
    const int64_t off = static_cast<int64_t>(m) * p.n + n;
    float sum = 0.f;
    for (int s = 0; s < p.splits; ++s) sum += __ldcg(p.partials + s * mn + off);
    store(m, n, sum);
  };
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = m0 + mt * 8 + 2 * t;
    reduce(m, n_lo);
    reduce(m + 1, n_lo);
    reduce(m, n_hi);
    reduce(m + 1, n_hi);
  }
}

template <typename T, int MT>
cudaError_t launch_typed(const GemmParams &p, cudaStream_t stream) {
  const int m_tiles = (p.m + 8 * MT - 1) / (8 * MT);
  dim3 grid((p.n16 + kWarps - 1) / kWarps, p.splits, m_tiles);
  nvfp4_gemm_kernel<T, MT><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const GemmParams &p, int mt, cudaStream_t stream) {
  switch (mt) {
    case 1: return launch_typed<T, 1>(p, stream);
    case 2: return launch_typed<T, 2>(p, stream);
    case 4: return launch_typed<T, 4>(p, stream);
    default: return launch_typed<T, 8>(p, stream);
  }
}

std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error invalid(const std::string &msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_nvfp4_gemm: " + msg);
}

// Workspace layout: tickets (int32, one per (M tile, N block), padded to 256 B), then the
// fp32 partials [splits][M][N]. Python computes the same size (ops/dense.py).
ffi::Error GemmImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> qweight,
                    ffi::Buffer<ffi::U8> qscales, ffi::Buffer<ffi::F32> global_scale,
                    ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t n, int64_t k,
                    int64_t splits, int64_t m_tile, bool has_bias) {
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
  if (splits < 1 || splits > k64) return invalid("splits out of range");
  if (m_tile != 1 && m_tile != 2 && m_tile != 4 && m_tile != 8) return invalid("bad m_tile");
  if (m == 0) return ffi::Error::Success();
  if (m > INT32_MAX / 2 || n * k > (int64_t(1) << 40)) return invalid("problem too large");

  const int64_t m_tiles = (m + 8 * m_tile - 1) / (8 * m_tile);
  const int64_t n_blocks = (n16 + kWarps - 1) / kWarps;
  const int64_t ticket_bytes = (m_tiles * n_blocks * 4 + 255) / 256 * 256;
  const int64_t need = splits > 1 ? ticket_bytes + splits * m * n * 4 : 0;
  if (static_cast<int64_t>(workspace->element_count()) < need)
    return invalid("workspace too small: " + std::to_string(workspace->element_count()) +
                   " < " + std::to_string(need));

  GemmParams p;
  p.x = x.untyped_data();
  p.qweight = reinterpret_cast<const uint4 *>(qweight.typed_data());
  p.qscales = reinterpret_cast<const uint2 *>(qscales.typed_data());
  p.global_scale = global_scale.typed_data();
  p.bias = has_bias ? bias.typed_data() : nullptr;
  p.out = out->untyped_data();
  auto *ws = static_cast<uint8_t *>(workspace->untyped_data());
  p.tickets = reinterpret_cast<int *>(ws);
  p.partials = reinterpret_cast<float *>(ws + ticket_bytes);
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.n16 = static_cast<int>(n16);
  p.k64 = static_cast<int>(k64);
  p.splits = static_cast<int>(splits);

  if (splits > 1) {
    cudaError_t e = cudaMemsetAsync(p.tickets, 0, ticket_bytes, stream);
    if (e != cudaSuccess)
      return ffi::Error(ffi::ErrorCode::kInternal, std::string("memset: ") + cudaGetErrorString(e));
  }
  cudaError_t err = xt == ffi::DataType::BF16
                        ? launch<__nv_bfloat16>(p, static_cast<int>(m_tile), stream)
                        : launch<__half>(p, static_cast<int>(m_tile), stream);
  if (err != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_nvfp4_gemm launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
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
                                  .Attr<bool>("has_bias"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

// Resident blocks per SM of the kernel for token tile MT (the split-K choice fills one wave).
extern "C" int jax_nvfp4_blocks_per_sm(int mt, int bf16) {
  using namespace jax_nvfp4;
  int blocks = 0;
  const void *fn = nullptr;
  switch (mt) {
    case 1: fn = bf16 ? (const void *)nvfp4_gemm_kernel<__nv_bfloat16, 1> : (const void *)nvfp4_gemm_kernel<__half, 1>; break;
    case 2: fn = bf16 ? (const void *)nvfp4_gemm_kernel<__nv_bfloat16, 2> : (const void *)nvfp4_gemm_kernel<__half, 2>; break;
    case 4: fn = bf16 ? (const void *)nvfp4_gemm_kernel<__nv_bfloat16, 4> : (const void *)nvfp4_gemm_kernel<__half, 4>; break;
    default: fn = bf16 ? (const void *)nvfp4_gemm_kernel<__nv_bfloat16, 8> : (const void *)nvfp4_gemm_kernel<__half, 8>; break;
  }
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fn, kThreads, 0) != cudaSuccess) return 0;
  return blocks;
}

// Multiprocessor count of the current device (for the split-K choice made at trace time).
extern "C" int jax_nvfp4_sm_count() {
  int dev = 0, count = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
  return count;
}

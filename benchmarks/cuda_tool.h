// Helpers of the standalone CUDA programs in benchmarks/ (kernel_lab.cu, moe_pair_lab.cu,
// memcheck_dense.cu, memcheck_moe.cu, memcheck_route.cu): not part of the library.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "nvfp4_kernel.cuh"

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

// Device-side fills for the timing labs (weights of gigabytes: no host copy): hashed words
// (masked), and activations of few distinct values.
__global__ void fill_random(uint32_t *p, size_t n, uint32_t seed, uint32_t mask = ~0u) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = h & mask;
  }
}

__global__ void fill_x(__nv_bfloat16 *p, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16(float(int(i % 17) - 8) * 0.125f);
}

namespace memcheck {

inline uint32_t next(uint64_t &s) {  // xorshift64*
  s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
  return static_cast<uint32_t>((s * 0x2545F4914F6CDD1Dull) >> 32);
}

// A device buffer of exactly the host vector's size (memcheck then flags one element past it).
template <typename T>
T *device_copy(const std::vector<T> &h) {
  T *d = nullptr;
  CHECK(cudaMalloc(&d, h.size() * sizeof(T)));
  CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// A random NVFP4 weight in the kernel layout: any code; block scales UE5M3 0x40-0x5F (about
// 2^-2 .. 2^2), which keeps fp16 outputs finite.
struct Weight {
  uint4 *qweight;
  uint4 *qscales;
};
inline Weight random_weight(size_t experts, int n, int k, uint64_t &seed) {
  const size_t n16 = (n + 15) / 16, k64 = (k + 63) / 64;
  std::vector<uint32_t> w(experts * n16 * k64 * 32 * 4);
  for (auto &v : w) v = next(seed);
  std::vector<uint8_t> s(experts * n16 * k64 * 64);
  for (auto &v : s) v = 0x40 + next(seed) % 32;
  return {reinterpret_cast<uint4 *>(device_copy(w)), reinterpret_cast<uint4 *>(device_copy(s))};
}

// Random activations [rows, k] with few mantissa bits (exact in both dtypes), as raw 16-bit.
inline std::vector<uint16_t> random_x(size_t rows, int k, bool bf16, uint64_t &seed) {
  std::vector<uint16_t> x(rows * k);
  for (auto &v : x) {
    const float f = float(int(next(seed) % 33) - 16) / 16.f;
    if (bf16) {
      uint32_t u;
      std::memcpy(&u, &f, 4);
      v = uint16_t(u >> 16);
    } else {
      const __half h = __float2half(f);
      std::memcpy(&v, &h, 2);
    }
  }
  return x;
}

// The split-K workspace as the FFI handler sizes and clears it (p.splits, p.cluster, p.slots and
// p.n set): tickets, zeroed, then fp32 partials, poisoned, where the splits reduce through
// memory; else 256 bytes nothing reads. Points p.tickets and p.partials into it.
inline void *attach_workspace(jax_nvfp4::GemmParams &p, int64_t ticket_bytes,
                              cudaStream_t stream) {
  const bool in_memory = p.splits > 1 && !p.cluster;
  const size_t bytes = in_memory ? ticket_bytes + size_t(p.splits) * p.slots * p.n * 4 : 256;
  void *ws = nullptr;
  CHECK(cudaMalloc(&ws, bytes));
  if (in_memory) {
    CHECK(cudaMemsetAsync(ws, 0xFF, bytes, stream));
    CHECK(cudaMemsetAsync(ws, 0, ticket_bytes, stream));
  }
  p.tickets = static_cast<int *>(ws);
  p.partials = reinterpret_cast<float *>(static_cast<char *>(ws) + ticket_bytes);
  return ws;
}

// A 16-bit output of `elems` values, copied back (after the stream's work), freed, as float.
inline std::vector<float> take_output(void *out, size_t elems, bool bf16, cudaStream_t stream) {
  CHECK(cudaStreamSynchronize(stream));
  std::vector<uint16_t> raw(elems);
  CHECK(cudaMemcpy(raw.data(), out, elems * 2, cudaMemcpyDeviceToHost));
  CHECK(cudaFree(out));
  std::vector<float> r(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    if (bf16) {
      const uint32_t u = uint32_t(raw[i]) << 16;
      std::memcpy(&r[i], &u, 4);
    } else {
      __half h;
      std::memcpy(&h, &raw[i], 2);
      r[i] = __half2float(h);
    }
  }
  return r;
}

// max |got - want| <= 1e-2 * max |want|, everything finite, want not all zero; prints a line.
inline bool agree(const std::vector<float> &got, const std::vector<float> &want,
                  const char *what) {
  double scale = 0, diff = 0;
  bool finite = true;
  for (size_t i = 0; i < got.size(); ++i) {
    finite = finite && std::isfinite(got[i]) && std::isfinite(want[i]);
    scale = std::max(scale, double(std::fabs(want[i])));
    diff = std::max(diff, double(std::fabs(got[i] - want[i])));
  }
  const bool ok = finite && scale > 0 && diff <= 1e-2 * scale;
  std::printf("%s %s: max |diff| %.3g of %.3g%s\n", ok ? "ok  " : "FAIL", what, diff, scale,
              finite ? "" : " (non-finite output)");
  return ok;
}

struct Alignment {
  std::vector<int> sorted_ids, block_expert;
  int num_padded;
};

// align_tokens on the host: ids t * top_k + j grouped by expert (expert order, token order
// inside), each group padded to block_m with `rows` (the sentinel), one spare block after.
inline Alignment align(const std::vector<int> &expert_of, int experts, int block_m,
                        const std::vector<bool> &local) {
  const int rows = static_cast<int>(expert_of.size());
  Alignment a;
  for (int e = 0; e < experts; ++e) {
    const size_t start = a.sorted_ids.size();
    for (int id = 0; id < rows; ++id)
      if (expert_of[id] == e) a.sorted_ids.push_back(id);
    while ((a.sorted_ids.size() - start) % block_m) a.sorted_ids.push_back(rows);
    for (size_t b = start; b < a.sorted_ids.size(); b += block_m)
      a.block_expert.push_back(local[e] ? e : -1);
  }
  a.num_padded = static_cast<int>(a.sorted_ids.size());
  for (int i = 0; i < block_m; ++i) a.sorted_ids.push_back(rows);  // past num_padded: skipped
  a.block_expert.push_back(0);
  return a;
}

// Median microseconds per call of `call(i)`, i < calls, over `trials` runs of the calls timed
// with CUDA events on `stream` (after one untimed run).
template <typename Call>
double median_call_us(Call &&call, int calls, int trials, cudaStream_t stream) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < calls; ++i) call(i);
  std::vector<double> t;
  for (int trial = 0; trial < trials; ++trial) {
    CHECK(cudaEventRecord(a, stream));
    for (int i = 0; i < calls; ++i) call(i);
    CHECK(cudaEventRecord(b, stream));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1e3 / calls);
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace memcheck

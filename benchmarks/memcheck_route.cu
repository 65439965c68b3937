// The routing + alignment kernels without JAX, for compute-sanitizer (not a test):
//   nvcc -std=c++17 -O3 -arch=sm_90a -I csrc benchmarks/memcheck_route.cu -o memcheck_route &&
//   compute-sanitizer --tool memcheck ./memcheck_route   (and --tool racecheck)
// The companion of memcheck_moe.cu: XLA-hosted sanitizer runs crashed on the lent H200s
// (NOTES_dense.md v15), so the launches are made here, with exactly sized buffers poisoned
// before each call. Cases: the decode kernel at each register width (1, 2, 4, 8 keys per lane),
// softmax and sigmoid scoring, group-limited top-k (sum of two and max), a correction bias, an
// expert map with -1 entries, every block_m, f32 / bf16 / f16 logits, 1 to 128 pairs and 32
// tokens; the wide decode kernel (one warp per 32 experts) wherever it applies, groups of 32
// included; and the general kernel on batches past the decode kernels' range. Every decode
// launch is compared bit for bit with the general kernel on the same input
// (moe_route_kernels.cuh says they do the same arithmetic in the same order). Exit status 1 on
// any disagreement or CUDA error.
#include "cuda_tool.h"
#include "moe_route_kernels.cuh"

namespace {

using namespace jax_nvfp4::moe_route;
using memcheck::device_copy;
using memcheck::next;

struct Case {
  int tokens, experts, top_k;
  bool sigmoid, renormalize, bias, group_max, mapped;
  int n_group, topk_group, block_m;
  float scaling;
  LogitType type;
  const char *what;
};

constexpr LogitType F32 = LogitType::kF32, BF16 = LogitType::kBF16, F16 = LogitType::kF16;

const Case kCases[] = {
    {1, 128, 8, false, true, false, false, false, 1, 1, 8, 1.f, F32, "Qwen3-like, one token"},
    {1, 128, 8, false, true, false, false, false, 1, 1, 8, 1.f, BF16, "Qwen3-like, bf16"},
    {4, 128, 8, false, true, false, false, true, 1, 1, 16, 1.f, F32, "32 pairs, expert map"},
    {1, 256, 8, true, true, true, false, false, 8, 4, 8, 2.5f, F32, "DeepSeek-like, one token"},
    {4, 256, 8, true, true, true, false, true, 8, 4, 64, 2.5f, BF16, "DeepSeek-like, 32 pairs"},
    {16, 8, 2, false, true, false, false, false, 1, 1, 8, 1.f, F16, "Mixtral-like, 16 tokens"},
    {3, 64, 6, true, false, true, true, false, 16, 3, 32, 1.f, F32, "group max, 2 keys/lane"},
    {5, 40, 3, true, true, false, false, true, 1, 1, 8, 0.5f, F32, "E = 40, sigmoid, map"},
    {2, 1, 1, false, false, false, false, false, 1, 1, 8, 1.f, F32, "one expert"},
    {9, 256, 8, true, true, true, false, true, 8, 4, 8, 2.5f, BF16, "DeepSeek-like, 72 pairs"},
    {16, 128, 8, false, true, false, false, true, 1, 1, 8, 1.f, F32, "128 pairs, expert map"},
    {32, 8, 2, false, true, false, false, false, 1, 1, 8, 1.f, BF16, "32 tokens, 64 pairs"},
    {17, 128, 8, false, true, false, false, false, 1, 1, 16, 1.f, F32, "general: 136 pairs"},
    {33, 8, 2, false, true, false, false, false, 1, 1, 8, 1.f, F32, "general: 33 tokens"},
    {128, 256, 8, true, true, true, false, false, 8, 4, 16, 2.5f, F32, "general: 1024 pairs"},
    {2, 300, 4, false, true, false, false, false, 1, 1, 8, 1.f, F32, "general: E = 300"},
    {2, 64, 8, true, true, true, false, true, 2, 1, 16, 1.f, F32, "wide: 2 groups of 32"},
    {1, 128, 4, true, true, true, true, false, 4, 2, 8, 1.f, F32, "wide: group max, 4 of 32"},
    {8, 96, 4, false, false, false, false, false, 1, 1, 8, 1.f, BF16, "wide: E = 96, 8 tokens"},
    {1, 200, 4, false, true, false, false, false, 1, 1, 8, 1.5f, F16, "wide: E = 200, 7 slices"},
    {8, 128, 8, false, true, false, false, true, 1, 1, 32, 1.f, BF16, "wide: 64 pairs, map"},
};

// Logits with few mantissa bits (exact in every type) and some repeated values (ties).
std::vector<uint8_t> random_logits(size_t n, LogitType type, uint64_t &seed) {
  const size_t width = type == F32 ? 4 : 2;
  std::vector<uint8_t> raw(n * width);
  for (size_t i = 0; i < n; ++i) {
    const float f = float(int(next(seed) % 97) - 48) / 16.f;
    if (type == F32) {
      std::memcpy(&raw[i * 4], &f, 4);
    } else if (type == BF16) {
      const __nv_bfloat16 b = __float2bfloat16(f);
      std::memcpy(&raw[i * 2], &b, 2);
    } else {
      const __half h = __float2half(f);
      std::memcpy(&raw[i * 2], &h, 2);
    }
  }
  return raw;
}

struct Outputs {
  std::vector<uint32_t> weights;   // the float bits
  std::vector<int> ids, sorted_ids, block_expert, num_padded;
};

template <typename T>
std::vector<T> take(T *d, size_t n) {
  std::vector<T> h(n);
  CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  CHECK(cudaFree(d));
  return h;
}

template <typename T>
T *poisoned(size_t n, cudaStream_t stream) {
  T *d = nullptr;
  CHECK(cudaMalloc(&d, std::max<size_t>(n, 1) * sizeof(T)));
  CHECK(cudaMemsetAsync(d, 0xEF, n * sizeof(T), stream));
  return d;
}

// One launch of plan_route_launch's choice; `decode` false forces the general kernel, `wide`
// allows the wide decode kernel.
Outputs run(const Case &c, const void *logits, const float *bias, const int *map, bool decode,
            bool wide, bool &used_decode, bool &used_wide, cudaStream_t stream) {
  const int pairs = c.tokens * c.top_k;
  const int slots = int(jax_nvfp4::moe_align::align_capacity(pairs, c.experts, c.block_m));
  RouteParams p{};
  p.logits = logits;
  p.bias = bias;
  p.expert_map = map;
  p.weights = poisoned<float>(pairs, stream);
  p.ids = poisoned<int>(pairs, stream);
  p.sorted_ids = poisoned<int>(slots, stream);
  p.block_expert = poisoned<int>(slots / c.block_m, stream);
  p.num_padded = poisoned<int>(1, stream);
  p.tokens = c.tokens;
  p.experts = c.experts;
  p.top_k = c.top_k;
  p.sigmoid = c.sigmoid;
  p.renormalize = c.renormalize;
  p.group_max = c.group_max;
  p.n_group = c.n_group;
  p.topk_group = c.topk_group;
  p.scaling = c.scaling;
  p.block_m = c.block_m;
  p.slots = slots;
  int device = 0, optin = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  RouteLaunch launch{};
  const std::string why = plan_route_launch(p, c.type, decode, optin, launch, wide);
  if (!why.empty()) {
    std::fprintf(stderr, "%s: %s\n", c.what, why.c_str());
    std::exit(1);
  }
  used_decode = launch.decode;
  used_wide = launch.wide;
  if (launch.smem > 48 * 1024)
    CHECK(cudaFuncSetAttribute(launch.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(launch.smem)));
  void *args[] = {&p};
  CHECK(cudaLaunchKernel(launch.kernel, dim3(1), dim3(launch.threads), args, launch.smem, stream));
  CHECK(cudaStreamSynchronize(stream));
  Outputs o;
  o.weights = take(reinterpret_cast<uint32_t *>(p.weights), pairs);
  o.ids = take(p.ids, pairs);
  o.sorted_ids = take(p.sorted_ids, slots);
  o.block_expert = take(p.block_expert, slots / c.block_m);
  o.num_padded = take(p.num_padded, 1);
  return o;
}

// The invariants every alignment has, whichever kernel wrote it: every pair once, each run
// one expert's ascending pairs padded with the sentinel, the block experts (mapped), -1 after.
bool aligned(const Case &c, const Outputs &o, const std::vector<int> &map) {
  const int pairs = c.tokens * c.top_k, used = o.num_padded[0];
  if (used % c.block_m || used > int(o.sorted_ids.size())) return false;
  std::vector<int> seen(pairs, 0);
  for (int b = 0; b < int(o.block_expert.size()); ++b) {
    int expert = -1, last = -1;
    for (int s = b * c.block_m; s < (b + 1) * c.block_m; ++s) {
      const int id = o.sorted_ids[s];
      if (id == pairs) continue;
      if (s >= used || id < 0 || id > pairs || id <= last) return false;
      const int e = o.ids[id];
      if (expert != -1 && e != expert) return false;
      expert = e;
      last = id;
      ++seen[id];
    }
    if (b * c.block_m < used && expert < 0) return false;   // a block of padding only
    const int want = b * c.block_m >= used ? -1 : map.empty() ? expert : map[expert];
    if (o.block_expert[b] != want) return false;
  }
  for (int v : seen)
    if (v != 1) return false;
  return true;
}

}  // namespace

int main() {
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  uint64_t seed = 0x13198A2E03707344ull;
  int failed = 0, launches = 0;
  for (const Case &c : kCases) {
    const std::vector<uint8_t> raw = random_logits(size_t(c.tokens) * c.experts, c.type, seed);
    std::vector<float> hb(c.experts);
    for (auto &v : hb) v = float(int(next(seed) % 13) - 6) / 32.f;
    std::vector<int> hm;
    if (c.mapped)
      for (int e = 0; e < c.experts; ++e) hm.push_back(e % 3 == 0 ? -1 : e / 2);
    const void *logits = device_copy(raw);
    const float *bias = c.bias ? device_copy(hb) : nullptr;
    const int *map = c.mapped ? device_copy(hm) : nullptr;
    bool decode_ran = false, general_ran = true, wide_ran = false, unused = false;
    const Outputs want = run(c, logits, bias, map, false, false, general_ran, unused, stream);
    // The decode (or general) kernel, then the wide one where it applies: each against the
    // general kernel, bit for bit.
    for (bool wide : {false, true}) {
      const Outputs got = run(c, logits, bias, map, true, wide, decode_ran, wide_ran, stream);
      if (wide && !wide_ran) break;
      const bool same = got.weights == want.weights && got.ids == want.ids &&
                        got.sorted_ids == want.sorted_ids &&
                        got.block_expert == want.block_expert && got.num_padded == want.num_padded;
      const bool ok = same && !general_ran && aligned(c, got, hm);
      failed += !ok;
      ++launches;
      std::printf("%-28s T=%-3d E=%-4d k=%-2d %s kernel: %s (padded %d)\n", c.what, c.tokens,
                  c.experts, c.top_k, wide_ran ? "wide   " : decode_ran ? "decode " : "general",
                  ok ? "equal to the general kernel, aligned" : "MISMATCH", got.num_padded[0]);
    }
    CHECK(cudaFree(const_cast<void *>(logits)));
    if (bias) CHECK(cudaFree(const_cast<float *>(bias)));
    if (map) CHECK(cudaFree(const_cast<int *>(map)));
  }
  std::printf("%d cases, %d launches, %d failed\n", int(sizeof(kCases) / sizeof(kCases[0])),
              launches, failed);
  return failed ? 1 : 0;
}

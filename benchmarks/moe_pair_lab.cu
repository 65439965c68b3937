// The MoE layer's two grouped GEMMs back to back in one CUDA stream, as a single FFI handler
// would launch them (not a test; NOTES_moe.md v27). Question: what would one custom call for
// both GEMMs gain? Under XLA each GEMM is its own custom call, and programmatic dependent
// launch gave no overlap between them (NOTES_moe.md v6, NOTES_dense.md v8: every custom call is
// its own traced command); launched by one handler, GEMM 2's blocks could start while GEMM 1's
// last blocks drain. Run once with JAX_NVFP4_PDL=0 (as the layers run now) and once without
// (the overlap one handler would get); the difference is the gain.
//   nvcc -std=c++17 -O3 -arch=sm_90a -I csrc benchmarks/moe_pair_lab.cu -o moe_pair_lab &&
//   ./moe_pair_lab E H I TOP_K T EXPERT_ROWS  KS1 SPLITS1 CLUSTER1 TPB1  KS2 SPLITS2 CLUSTER2 TPB2
// E experts of w13 [2I, H] (the SwiGLU fused into GEMM 1's epilogue, out [pairs, I]) and w2
// [H, I] (times the top-k weight), T tokens of top_k distinct experts each, block_m 8 (decode);
// EXPERT_ROWS and each GEMM's k-slices, splits, cluster (0/1) and N tiles per block as
// ops/moe.py picks them for this layer (moe_pair_lab.sh prints them from the extension).
// Each timed call is a layer: GEMM 1, GEMM 2, then a one-block kernel launched without the
// programmatic attribute, which stands for the next layer's routing: the next GEMM 1 cannot
// overlap this GEMM 2, so only the overlap inside a layer is measured. Sixteen routings (and the
// rotation through them) keep a call's experts out of L2 from the call before: every expert is
// touched once in 16 calls where E >= 16 * top_k * T / 2. Prints the median microseconds per layer
// over TRIALS runs of CALLS layers (CUDA events), and per GEMM alone (each repeated, with the
// separator kernel between).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cuda_tool.h"

namespace {

using jax_nvfp4::GemmParams;
using namespace memcheck;

constexpr int kBlockM = 8;
constexpr int kRoutings = 16;
constexpr int kCalls = 32;
constexpr int kTrials = 9;

__global__ void separator(int *sink) {
  if (threadIdx.x == 0 && sink[0] == 0x7FFFFFFF) sink[1] = 1;
}

struct LaunchSpec {
  int k_slices, splits, cluster, tiles_per_block;
};

// A weight of `experts` experts [n, k] filled on the device (random codes, UE5M3 scales
// 0x00-0x7F: timing only).
Weight device_weight(size_t experts, int n, int k, uint32_t seed) {
  const size_t n16 = (n + 15) / 16, k64 = (k + 63) / 64;
  Weight w{};
  const size_t words = experts * n16 * k64 * 32 * 4, scale_words = experts * n16 * k64 * 16;
  CHECK(cudaMalloc(&w.qweight, words * 4));
  CHECK(cudaMalloc(&w.qscales, scale_words * 4));
  fill_random<<<1024, 256>>>(reinterpret_cast<uint32_t *>(w.qweight), words, seed);
  fill_random<<<256, 256>>>(reinterpret_cast<uint32_t *>(w.qscales), scale_words, seed + 1,
                            0x7F7F7F7Fu);
  CHECK(cudaGetLastError());
  return w;
}

// One GEMM's launch on one routing's alignment (device buffers), as the FFI handler makes it.
struct Gemm {
  GemmParams p;
  LaunchSpec spec;
  int token_tiles, expert_rows;
  int64_t tickets;   // bytes to clear before each call (splits through memory), else 0
  void launch(cudaStream_t stream) const {
    if (tickets) CHECK(cudaMemsetAsync(p.tickets, 0, tickets, stream));
    CHECK(jax_nvfp4::launch<true>(p, true, 1, token_tiles, stream, spec.k_slices, expert_rows));
  }
};

Gemm make_gemm(const void *x, const Weight &w, const float *gs, void *out, int n, int k,
               int slots, int rows_out, const int *ids, const int *block_expert,
               const int *num_padded, const float *topk, int gather_div, int act,
               LaunchSpec spec, int expert_rows, cudaStream_t stream) {
  Gemm g{};
  GemmParams &p = g.p;
  p.x = x; p.qweight = w.qweight; p.qscales = w.qscales; p.global_scale = gs; p.out = out;
  p.rows_out = rows_out; p.slots = slots; p.n = n; p.k = k;
  p.n16 = (n + 15) / 16; p.k64 = (k + 63) / 64;
  p.splits = spec.splits; p.tiles_per_block = spec.tiles_per_block; p.cluster = spec.cluster;
  p.sorted_ids = ids; p.block_expert = block_expert; p.num_padded = num_padded;
  p.topk_weights = topk; p.gather_div = gather_div;
  p.act = act; p.act_limit = INFINITY; p.act_alpha = 1.f;
  g.spec = spec;
  g.token_tiles = slots / kBlockM;
  g.expert_rows = expert_rows;
  const int n_blocks = (p.n16 + jax_nvfp4::kWarps - 1) / jax_nvfp4::kWarps;
  const int64_t tb = jax_nvfp4::ticket_bytes(g.token_tiles, n_blocks);
  attach_workspace(p, tb, stream);
  g.tickets = p.splits > 1 && !p.cluster ? tb : 0;
  return g;
}

}  // namespace

int main(int argc, char **argv) {
  if (argc != 15) {
    std::fprintf(stderr, "usage: %s E H I TOP_K T EXPERT_ROWS KS1 SPLITS1 CLUSTER1 TPB1 KS2 "
                         "SPLITS2 CLUSTER2 TPB2\n", argv[0]);
    return 2;
  }
  int v[14];
  for (int i = 0; i < 14; ++i) v[i] = std::atoi(argv[i + 1]);
  const int experts = v[0], hidden = v[1], inter = v[2], top_k = v[3], tokens = v[4];
  const int expert_rows = v[5];
  const LaunchSpec spec1{v[6], v[7], v[8], v[9]}, spec2{v[10], v[11], v[12], v[13]};
  if (top_k > experts || tokens < 1) {
    std::fprintf(stderr, "need top_k <= E and T >= 1\n");
    return 2;
  }
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const int pairs = tokens * top_k;
  // The static padded length the layer's grid is sized from (moe/align.py capacity).
  const int slots = (pairs + std::min(experts, pairs) * (kBlockM - 1) + kBlockM - 1) / kBlockM *
                    kBlockM;

  const Weight w13 = device_weight(experts, 2 * inter, hidden, 11);
  const Weight w2 = device_weight(experts, hidden, inter, 23);
  std::vector<float> hg(experts), ht(pairs);
  uint64_t seed = 0x9E3779B97F4A7C15ull;
  for (auto &g : hg) g = float(1 + next(seed) % 4) / 512;
  for (auto &t : ht) t = float(1 + next(seed) % 8) / 8;
  const float *gs = device_copy(hg), *topk = device_copy(ht);
  __nv_bfloat16 *x = nullptr, *mid = nullptr, *out = nullptr;
  CHECK(cudaMalloc(&x, size_t(tokens) * hidden * 2));
  CHECK(cudaMalloc(&mid, size_t(pairs) * inter * 2));
  CHECK(cudaMalloc(&out, size_t(pairs) * hidden * 2));
  fill_x<<<256, 256>>>(x, size_t(tokens) * hidden);
  int *sink = device_copy(std::vector<int>{0, 0});

  // kRoutings alignments: token t's top_k distinct experts, drawn so that successive routings
  // walk through the experts.
  std::vector<Gemm> g1, g2;
  int hit = 0;
  const std::vector<bool> local(experts, true);
  for (int r = 0; r < kRoutings; ++r) {
    std::vector<int> expert_of(pairs);
    std::vector<bool> used(experts, false);
    for (int t = 0; t < tokens; ++t)
      for (int j = 0; j < top_k; ++j) {
        int e;
        bool clash;
        do {
          e = static_cast<int>(next(seed) % experts);
          clash = false;
          for (int i = 0; i < j; ++i) clash |= expert_of[t * top_k + i] == e;
        } while (clash);
        expert_of[t * top_k + j] = e;
        used[e] = true;
      }
    hit += static_cast<int>(std::count(used.begin(), used.end(), true));
    Alignment a = align(expert_of, experts, kBlockM, local);
    a.sorted_ids.resize(slots, pairs);                     // the sentinel up to the capacity
    a.block_expert.resize(slots / kBlockM, -1);
    int *ids = device_copy(a.sorted_ids), *be = device_copy(a.block_expert);
    int *padded = device_copy(std::vector<int>{a.num_padded});
    g1.push_back(make_gemm(x, w13, gs, mid, 2 * inter, hidden, slots, pairs, ids, be, padded,
                           nullptr, top_k, jax_nvfp4::kActSwiglu, spec1, expert_rows, stream));
    g2.push_back(make_gemm(mid, w2, gs, out, hidden, inter, slots, pairs, ids, be, padded, topk,
                           1, jax_nvfp4::kActNone, spec2, expert_rows, stream));
  }
  CHECK(cudaStreamSynchronize(stream));
  // The bytes of the experts hit, per layer on average: the roofline's numerator.
  const double expert_bytes = (2.0 * inter * hidden + double(hidden) * inter) / 2 * 1.0625;
  const double bytes = expert_bytes * hit / kRoutings;

  auto sep = [&] { separator<<<1, 32, 0, stream>>>(sink); };
  const double layer = median_call_us([&](int i) {
    g1[i % kRoutings].launch(stream);
    g2[i % kRoutings].launch(stream);
    sep();
  }, kCalls, kTrials, stream);
  auto alone_us = [&](const std::vector<Gemm> &g) {
    return median_call_us([&](int i) { g[i % kRoutings].launch(stream); sep(); }, kCalls, kTrials,
                          stream);
  };
  const double one = alone_us(g1), two = alone_us(g2);
  const double alone = median_call_us([&](int) { sep(); }, kCalls, kTrials, stream);
  CHECK(cudaGetLastError());
  const char *pdl = std::getenv("JAX_NVFP4_PDL");
  std::printf("E=%d H=%d I=%d top_k=%d T=%d (%.1f experts hit, %.1f MB) PDL %s: layer %.2f us, "
              "GEMM 1 alone %.2f, GEMM 2 alone %.2f, separator alone %.2f "
              "(layer - separator %.2f = %.0f GB/s)\n",
              experts, hidden, inter, top_k, tokens, double(hit) / kRoutings, bytes / 1e6,
              pdl != nullptr && std::string(pdl) == "0" ? "off" : "on", layer, one, two, alone,
              layer - alone, bytes / (layer - alone) / 1e3);
  return 0;
}

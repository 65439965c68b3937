// The grouped MoE kernel's launches without JAX, for compute-sanitizer (not a test):
//   nvcc -std=c++17 -O3 -arch=sm_90a -I csrc benchmarks/memcheck_moe.cu -o memcheck_moe &&
//   compute-sanitizer --tool memcheck ./memcheck_moe
// The companion of memcheck_dense.cu (why: see there). The token alignment is built on the host
// as align_tokens builds it (each expert's (token, k) ids in token order, padded to block_m with
// the sentinel rows_out, one expert per block, -1 for experts that are not local, one spare
// block past num_padded), with exactly sized buffers. Cases: the k-sliced decode blocks with 1,
// 2 and 4 x rows (expert_rows) and 8, an expert repeated in a token's top-k, several N tiles per
// block, block_m 16/32/64 (wgmma on sm_90a), K split through tickets and in a cluster, the first
// GEMM's gather (x row = id / top_k) and the second's (x row = id, times the top-k weight),
// bias, non-local experts, sizes off the tile, the unsliced block_m-8 block's long units. Every
// launch is compared with the plain one (block_m 8, no splits, no k-slices, 4-chunk units) to
// 1e-2 of the largest output (long units give the same bits). Exit status 1 on any
// disagreement.
#include "cuda_tool.h"

namespace {

using jax_nvfp4::GemmParams;
using namespace memcheck;

struct Case {
  int tokens, k, n, experts, top_k;
  bool second_gemm;  // x rows = (token, k) ids, times the top-k weight; else gather_div = top_k
  int block_m, splits, k_slices, tiles_per_block, expert_rows;
  bool cluster, repeat_ids;
  const char *what;
};

const Case kCases[] = {
    {1, 256, 352, 5, 2, false, 8, 1, 8, 1, 1, false, false, "k-sliced, 1-row blocks"},
    {2, 208, 96, 6, 2, false, 8, 1, 8, 1, 2, false, false, "k-sliced, 2-row blocks"},
    {3, 208, 96, 6, 2, false, 8, 1, 8, 1, 3, false, true, "k-sliced, 4-row blocks, repeated ids"},
    {2, 208, 96, 8, 2, false, 8, 1, 8, 1, 1, false, true, "1-row blocks, 2-4 rows per expert"},
    {1, 2048, 4096, 8, 2, false, 8, 1, 8, 2, 1, false, false, "k-sliced, 2 N tiles per block"},
    {5, 1088, 200, 6, 2, false, 8, 1, 8, 1, 0, false, false, "k-sliced, 8-row blocks"},
    {1, 256, 360, 5, 2, false, 8, 1, 4, 2, 1, false, false, "4 slices, 1-row blocks, odd N tiles"},
    {3, 208, 96, 6, 2, false, 8, 1, 4, 1, 3, false, true, "4 slices, 4-row blocks, repeated ids"},
    {5, 1088, 2048, 6, 2, false, 8, 1, 4, 1, 0, false, false, "4 slices, 8-row blocks"},
    {37, 128, 96, 12, 3, false, 16, 1, 1, 1, 0, false, false, "block_m 16"},
    {37, 128, 96, 12, 3, false, 8, 2, 1, 1, 0, false, false, "block_m 8, 2 splits (tickets)"},
    {20, 1024, 256, 4, 2, false, 32, 2, 1, 1, 0, true, false, "block_m 32, 2 splits (cluster)"},
    {130, 192, 192, 4, 2, false, 64, 1, 1, 1, 0, false, false, "block_m 64"},
    {300, 512, 800, 6, 2, false, 64, 1, 1, 3, 0, false, false, "block_m 64, 3 N blocks per block"},
    {16, 512, 800, 12, 2, false, 8, 1, 1, 2, 0, false, false, "block_m 8, 2 N blocks per block"},
    {16, 2112, 800, 12, 2, false, 8, 1, 1, 2, 0, false, false,
     "block_m 8, long units (K of 33 chunks), 2 N blocks per block"},
    {3, 2048, 96, 5, 2, false, 8, 1, 1, 1, 0, false, true, "block_m 8, long units, repeated ids"},
    {4, 4096, 360, 6, 2, true, 8, 1, 1, 1, 0, false, false,
     "second GEMM, block_m 8, long units, odd N tiles"},
    {16, 176, 256, 5, 2, true, 16, 2, 1, 1, 0, false, false, "second GEMM, 2 splits (tickets)"},
    {1, 176, 2048, 5, 2, true, 8, 1, 8, 1, 1, false, false, "second GEMM, k-sliced 1-row"},
};

// Runs one launch and returns its output as float (empty when it cannot launch here).
std::vector<float> run(const Case &c, int block_m, int splits, int k_slices, int tiles_per_block,
                       int expert_rows, bool cluster, bool bf16, const std::vector<int> &expert_of,
                       const std::vector<bool> &local, const uint16_t *x, const Weight &w,
                       const float *gs, const float *bias, const float *topk_weights,
                       cudaStream_t stream) {
  using namespace jax_nvfp4;
  const int mt = block_m / 8;
  if (cluster && splits > cluster_limit<true>(mt, bf16)) return {};
  const Alignment a = align(expert_of, c.experts, block_m, local);
  const int slots = static_cast<int>(a.sorted_ids.size());
  const int rows_out = c.tokens * c.top_k;
  const int n16 = (c.n + 15) / 16, k64 = (c.k + 63) / 64;
  const int token_tiles = slots / block_m;
  const int n_blocks = (n16 + kWarps - 1) / kWarps;
  int *ids = device_copy(a.sorted_ids), *be = device_copy(a.block_expert);
  int *padded = device_copy(std::vector<int>{a.num_padded});
  void *out = nullptr;
  CHECK(cudaMalloc(&out, size_t(rows_out) * c.n * 2));
  CHECK(cudaMemsetAsync(out, 0, size_t(rows_out) * c.n * 2, stream));  // as zero_unwritten
  GemmParams p{};
  p.x = x; p.qweight = w.qweight; p.qscales = w.qscales; p.global_scale = gs; p.bias = bias;
  p.out = out;
  p.rows_out = rows_out; p.slots = slots; p.n = c.n; p.k = c.k; p.n16 = n16; p.k64 = k64;
  p.splits = splits; p.tiles_per_block = tiles_per_block; p.cluster = cluster;
  p.sorted_ids = ids; p.block_expert = be; p.num_padded = padded;
  p.topk_weights = c.second_gemm ? topk_weights : nullptr;
  p.gather_div = c.second_gemm ? 1 : c.top_k;
  void *ws = attach_workspace(p, ticket_bytes(token_tiles, n_blocks), stream);
  CHECK(launch<true>(p, bf16, mt, token_tiles, stream, k_slices, expert_rows));
  std::vector<float> got = take_output(out, size_t(rows_out) * c.n, bf16, stream);
  CHECK(cudaFree(ws));
  CHECK(cudaFree(ids));
  CHECK(cudaFree(be));
  CHECK(cudaFree(padded));
  return got;
}

}  // namespace

int main() {
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  uint64_t seed = 0x243F6A8885A308D3ull;
  int failed = 0, ran = 0;
  for (const Case &c : kCases) {
    const int rows_out = c.tokens * c.top_k;
    // Each (token, k)'s expert: distinct within a token, or the token's first choice repeated.
    std::vector<int> expert_of(rows_out);
    for (int t = 0; t < c.tokens; ++t)
      for (int j = 0; j < c.top_k; ++j) {
        int e;
        bool clash;
        do {
          e = static_cast<int>(next(seed) % c.experts);
          clash = false;
          for (int i = 0; i < j; ++i) clash |= expert_of[t * c.top_k + i] == e;
        } while (clash && !c.repeat_ids);
        expert_of[t * c.top_k + j] = c.repeat_ids && j > 0 && next(seed) % 2
                                         ? expert_of[t * c.top_k] : e;
      }
    // Expert 1 is not local where there are more than 4 (its rows stay zero).
    std::vector<bool> local(c.experts, true);
    if (c.experts > 4) local[1] = false;
    const Weight w = random_weight(c.experts, c.n, c.k, seed);
    std::vector<float> hb(size_t(c.experts) * c.n), hg(c.experts), ht(rows_out);
    for (auto &v : hb) v = float(int(next(seed) % 17) - 8) * 0.25f;
    for (auto &v : hg) v = float(1 + next(seed) % 4) / 512;
    for (auto &v : ht) v = float(1 + next(seed) % 8) / 8;
    const float *bias = device_copy(hb), *gs = device_copy(hg), *topk = device_copy(ht);
    for (bool bf16 : {true, false}) {
      const int x_rows = c.second_gemm ? rows_out : c.tokens;
      const uint16_t *x = device_copy(random_x(x_rows, c.k, bf16, seed));
      // The plain launch keeps 4-chunk units (JAX_NVFP4_MOE_LONG_UNITS=0); the launch under test
      // takes the default, long units where K allows, so that they are compared with 4-chunk ones.
      setenv("JAX_NVFP4_MOE_LONG_UNITS", "0", 1);
      const std::vector<float> plain = run(c, 8, 1, 1, 1, 0, false, bf16, expert_of, local, x, w,
                                           gs, bias, topk, stream);
      unsetenv("JAX_NVFP4_MOE_LONG_UNITS");
      const std::vector<float> got =
          run(c, c.block_m, c.splits, c.k_slices, c.tiles_per_block, c.expert_rows, c.cluster,
              bf16, expert_of, local, x, w, gs, bias, topk, stream);
      CHECK(cudaFree(const_cast<uint16_t *>(x)));
      char what[200];
      std::snprintf(what, sizeof what, "T=%d K=%d N=%d E=%d top_k=%d %s %s", c.tokens, c.k, c.n,
                    c.experts, c.top_k, bf16 ? "bf16" : "f16", c.what);
      if (got.empty()) {
        std::printf("skip %s: cluster too large here\n", what);
        continue;
      }
      failed += !agree(got, plain, what);
      ++ran;
    }
    CHECK(cudaFree(w.qweight));
    CHECK(cudaFree(w.qscales));
    CHECK(cudaFree(const_cast<float *>(bias)));
    CHECK(cudaFree(const_cast<float *>(gs)));
    CHECK(cudaFree(const_cast<float *>(topk)));
  }
  std::printf("%d launches, %d disagree with the plain launch\n", ran, failed);
  return failed ? 1 : 0;
}

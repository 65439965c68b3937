// The dense kernel's launches without JAX, for compute-sanitizer (not a test):
//   nvcc -std=c++17 -O3 -arch=sm_90a -I csrc benchmarks/memcheck_dense.cu -o memcheck_dense &&
//   compute-sanitizer --tool memcheck ./memcheck_dense
// Under XLA the sanitizer has crashed on the H200 machines partway through sanitize_dense.py
// (NOTES_dense.md v15); this program makes the same kinds of launches with nothing else on the
// GPU. Every buffer is allocated at exactly the size the FFI handler checks (so a read or write
// one element past it is an error), x and the weights are random, and the output and workspace
// are poisoned (NaN bytes) before each call. Each launch runs both dtypes, every instantiation
// family the dispatch can pick (k-sliced 1/2/4/8-row and m_tile-2 blocks with several N tiles per
// block and a short last block, unsliced m_tile 1/2/4/8, K split through tickets and through a
// cluster), on shapes off the tile in N, K and M. Besides memcheck's verdict it checks that every
// launch agrees with the plain one (m_tile by M, no splits, no k-slices) to 1e-2 of the largest
// output: a launch that wrote nothing, or wrote another launch's rows, fails here too.
// Exit status 1 when any launch disagrees or fails to launch.
#include "cuda_tool.h"

namespace {

using jax_nvfp4::GemmParams;
using namespace memcheck;

struct Launch {
  int m, n, k;
  int m_tile, splits, k_slices, tiles_per_block;
  bool cluster;
  const char *what;
};

// The launches (jax_nvfp4/ops/dense.py picks among these families by shape and GPU).
const Launch kLaunches[] = {
    {1, 4000, 4160, 1, 1, 8, 2, false, "k-sliced, 1-row tile, 2 N tiles per block"},
    {1, 9000, 2048, 1, 1, 8, 3, false, "k-sliced, 1-row tile, 3 N tiles per block, short last"},
    {2, 4000, 4160, 1, 1, 8, 2, false, "k-sliced, 2-row tile"},
    {3, 9000, 2048, 1, 1, 8, 3, false, "k-sliced, 4-row tile, one row empty"},
    {1, 4008, 8192, 1, 1, 8, 3, false, "k-sliced, 1-row tile, long slices, odd N"},
    {2, 1000, 8176, 1, 1, 8, 2, false, "k-sliced, 2-row tile, long slices, K ends mid-chunk"},
    {7, 2200, 1088, 1, 1, 8, 1, false, "k-sliced, 8-row tile, K of 17 chunks"},
    {1, 4008, 4160, 1, 1, 4, 2, false, "4 slices, 1-row tile, 2 pairs per block, odd N tiles"},
    {2, 9000, 2048, 1, 1, 4, 3, false, "4 slices, 2-row tile, short last block"},
    {4, 2200, 1088, 1, 1, 4, 1, false, "4 slices, 4-row tile, K of 17 chunks"},
    {6, 2200, 1088, 1, 1, 4, 2, false, "4 slices, 8-row tile (3 stages), K of 17 chunks"},
    {6, 1000, 4160, 1, 1, 4, 2, false, "4 slices, 8-row tile"},
    {16, 2200, 4160, 2, 1, 8, 2, false, "k-sliced m_tile 2"},
    {12, 4200, 1088, 2, 1, 8, 3, false, "k-sliced m_tile 2, rows empty, short last block"},
    {1, 100, 1664, 1, 1, 1, 1, false, "unsliced m_tile 1, N of 7 tiles"},
    {7, 33, 48, 1, 1, 1, 1, false, "unsliced, K below one chunk"},
    {9, 520, 4160, 2, 4, 1, 1, false, "m_tile 2, 4 splits through tickets"},
    {16, 4096, 1088, 2, 1, 1, 1, false, "m_tile 2 unsplit"},
    {14, 3000, 1664, 2, 3, 1, 1, true, "m_tile 2, 3 splits in a cluster, K of 3.25 units"},
    {17, 2368, 1664, 4, 2, 1, 1, false, "m_tile 4, 2 splits through tickets"},
    {17, 2368, 1664, 4, 2, 1, 1, true, "m_tile 4, 2 splits in a cluster"},
    {40, 1000, 640, 8, 2, 1, 1, false, "m_tile 8, partial token tile, tickets"},
    {64, 4000, 256, 8, 1, 1, 1, false, "m_tile 8 unsplit"},
    {255, 832, 1408, 8, 3, 1, 1, false, "m_tile 8, 4 token tiles, 3 splits, tickets"},
    {1, 12000, 1024, 1, 2, 1, 1, true, "m_tile 1, 2 splits in a cluster"},
    {5, 9000, 2048, 1, 3, 1, 1, true, "m_tile 1, 3 splits in a cluster"},
    {3, 1000, 4160, 1, 16, 1, 1, true, "m_tile 1, 16 splits in a cluster (where supported)"},
};

int plain_m_tile(int m) { return m <= 8 ? 1 : m <= 16 ? 2 : m <= 32 ? 4 : 8; }

// Runs one launch and returns its output as float (empty when it cannot launch here).
std::vector<float> run(const Launch &l, int m_tile, int splits, int k_slices, int tiles_per_block,
                       bool cluster, bool bf16, const void *x, const Weight &w, const float *gs,
                       const float *bias, cudaStream_t stream) {
  using namespace jax_nvfp4;
  const int n16 = (l.n + 15) / 16, k64 = (l.k + 63) / 64;
  const int token_tiles = (l.m + 8 * m_tile - 1) / (8 * m_tile);
  const int n_blocks = (n16 + kWarps - 1) / kWarps;
  if (cluster && splits > cluster_limit<false>(m_tile, bf16)) return {};
  void *out = nullptr;
  CHECK(cudaMalloc(&out, size_t(l.m) * l.n * 2));
  CHECK(cudaMemsetAsync(out, 0xFF, size_t(l.m) * l.n * 2, stream));  // NaN in both dtypes
  GemmParams p{};
  p.x = x; p.qweight = w.qweight; p.qscales = w.qscales; p.global_scale = gs; p.bias = bias; p.out = out;
  p.rows_out = l.m; p.slots = l.m; p.n = l.n; p.k = l.k; p.n16 = n16; p.k64 = k64;
  p.splits = splits; p.tiles_per_block = tiles_per_block; p.cluster = cluster;
  void *ws = attach_workspace(p, ticket_bytes(token_tiles, n_blocks), stream);
  CHECK(launch<false>(p, bf16, m_tile, token_tiles, stream, k_slices));
  std::vector<float> got = take_output(out, size_t(l.m) * l.n, bf16, stream);
  CHECK(cudaFree(ws));
  return got;
}

}  // namespace

int main() {
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  uint64_t seed = 0x9E3779B97F4A7C15ull;
  int failed = 0, ran = 0;
  for (const Launch &l : kLaunches) {
    const Weight w = random_weight(1, l.n, l.k, seed);
    std::vector<float> hb(l.n);
    for (auto &v : hb) v = float(int(next(seed) % 17) - 8) * 0.25f;
    const float *bias = device_copy(hb);
    const float *gs = device_copy(std::vector<float>{1.f / 256});
    for (bool bf16 : {true, false}) {
      const std::vector<uint16_t> hx = random_x(l.m, l.k, bf16, seed);
      const uint16_t *x = device_copy(hx);
      const std::vector<float> plain = run(l, plain_m_tile(l.m), 1, 1, 1, false, bf16, x, w, gs,
                                           bias, stream);
      const std::vector<float> got = run(l, l.m_tile, l.splits, l.k_slices, l.tiles_per_block,
                                         l.cluster, bf16, x, w, gs, bias, stream);
      CHECK(cudaFree(const_cast<uint16_t *>(x)));
      if (got.empty()) {
        std::printf("skip M=%d N=%d K=%d %s %s: cluster too large here\n", l.m, l.n, l.k,
                    bf16 ? "bf16" : "f16", l.what);
        continue;
      }
      char what[200];
      std::snprintf(what, sizeof what, "M=%d N=%d K=%d %s %s", l.m, l.n, l.k,
                    bf16 ? "bf16" : "f16", l.what);
      failed += !agree(got, plain, what);
      ++ran;
    }
    CHECK(cudaFree(w.qweight));
    CHECK(cudaFree(w.qscales));
    CHECK(cudaFree(const_cast<float *>(bias)));
    CHECK(cudaFree(const_cast<float *>(gs)));
  }
  std::printf("%d launches, %d disagree with the plain launch\n", ran, failed);
  return failed ? 1 : 0;
}

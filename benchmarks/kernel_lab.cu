// Kernel-only timing of the dense NVFP4 kernel without JAX (not a test), for variants built with
// -D JAX_NVFP4_CHUNKS_PER_STAGE / JAX_NVFP4_DECODE_STAGES / JAX_NVFP4_ROW_STAGES /
// JAX_NVFP4_SINGLE_ROW (the knobs of nvfp4_tile.cuh and nvfp4_kernel.cuh; lab_defines.sh builds
// and times several at once) and for ncu:
//   nvcc -std=c++17 -O3 -arch=sm_90a -I csrc benchmarks/kernel_lab.cu -o lab &&
//   ./lab K N M [splits [k_slices [tiles_per_block]]]
// k_slices 4: 4 k-slices of 2 N tiles (m_tile 1 as the FFI launch; m_tile 2 here only, an
// experiment); tiles_per_block 0 picks one wave of blocks, spread evenly over the token tiles'
// blocks, as ops/dense.py choose_tiles_per_block does. LAB_MT=1|2|4|8 overrides the m_tile the
// launch derives from M (e.g. M = 16 as two m_tile-1 token tiles).
// LAB_CHECK=1: after timing, the launch's output is compared with the plain launch's (no
// k-slices, default splits) on the same data; rel-L2 above 1e-2 exits 1. It also prints a hash
// of the launch's output bytes (the data is the same in every run), so that labs built with
// different knobs can be compared bit for bit.
// Weights and scales are random bytes in COPIES rotating buffers (more than L2 holds); each
// timed call is the kernel (plus the ticket memset where the splits do not reduce in a
// cluster), as in the FFI handler. Prints the median
// microseconds per call over TRIALS trials of COPIES calls, timed with CUDA events.
// LAB_READ_ONLY=1: instead of the GEMM, a bare read of the same weight and scale bytes (16-byte
// loads, 4 in flight per thread, one wave of blocks): the floor a single launch can reach.
// Built with -DJAX_NVFP4_LAB_TIMELINE=1: after timing, the last of a run of back-to-back calls
// is broken down per block (nvfp4_tile.cuh lab_mark): when blocks start after the first one,
// how long until their first unit lands, their steady loop, their last hand-off and epilogue,
// and when they end, as percentiles over the blocks (us; the phases from %clock64 at the
// device's clock rate, the starts and ends from %globaltimer).
#include <algorithm>
#include <vector>

#include "cuda_tool.h"

// Reads n 16-byte words (grid-stride, 4 independent loads in flight per thread); the sum only
// keeps the loads alive.
__global__ void read_only(const uint4 *__restrict__ a, size_t na, const uint4 *__restrict__ b,
                          size_t nb, uint32_t *sink) {
  uint32_t acc = 0;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (int part = 0; part < 2; ++part) {
    const uint4 *p = part == 0 ? a : b;
    const size_t n = part == 0 ? na : nb;
    size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
      uint4 v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = __ldcs(p + i + j * stride);
#pragma unroll
      for (int j = 0; j < 4; ++j) acc += v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
    for (; i < n; i += stride) {
      const uint4 v = __ldcs(p + i);
      acc += v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  if (acc == 0x9E3779B9u) *sink = acc;
}

// A switch such as LAB_CHECK: set and neither empty nor "0" (a script can pass LAB_CHECK= to
// leave it off).
bool env_flag(const char *name) {
  const char *v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

// The short x tile (XR rows) the launch picks at M <= 4 (nvfp4_kernel.cuh short_tile_rows).
template <int KS, int XR>
void print_short_tile() {
  using namespace jax_nvfp4;
  std::printf("[%d-row block: %d stages, %d blocks/SM] ", XR, TileConfig<1, KS, XR>::kStages,
              blocks_per_sm_typed<__nv_bfloat16, 1, false, KS, XR>());
}

template <int KS>
void print_short_tile(int xr) {
  if (xr == 1) print_short_tile<KS, 1>();
  if (xr == 2) print_short_tile<KS, 2>();
  if (xr == 4) print_short_tile<KS, 4>();
}

// Lab-only: the m_tile-2 block of 4 k-slices (the FFI launch has 8 slices at m_tile 2).
cudaError_t launch_lab(const jax_nvfp4::GemmParams &p, int mt, int token_tiles,
                       cudaStream_t stream, int k_slices) {
  using namespace jax_nvfp4;
  if (mt == 2 && k_slices == kPairKSlices)
    return launch_typed<__nv_bfloat16, 2, false, kPairKSlices>(p, token_tiles, stream);
  return launch<false>(p, true, mt, token_tiles, stream, k_slices);
}

#if JAX_NVFP4_LAB_TIMELINE
// Runs `calls` (the last call's blocks leave their marks) and prints the phases' percentiles.
template <typename Calls>
void print_timeline(Calls &&calls) {
  using jax_nvfp4::kLabTimelineBlocks;
  std::vector<unsigned long long> zero(size_t(kLabTimelineBlocks) * 9, 0);
  CHECK(cudaMemcpyToSymbol(jax_nvfp4::lab_timeline, zero.data(), zero.size() * 8));
  calls();
  std::vector<unsigned long long> tl(zero.size());
  CHECK(cudaMemcpyFromSymbol(tl.data(), jax_nvfp4::lab_timeline, tl.size() * 8));
  int khz = 0;
  CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
  const double us_per_clock = 1e3 / khz;
  unsigned long long first = ~0ull;
  for (int b = 0; b < kLabTimelineBlocks; ++b)
    if (tl[b * 9 + 3]) first = std::min(first, tl[b * 9]);
  std::vector<double> start, land, loop, tail, end;
  std::vector<int> per_sm(1024, 0);
  for (int b = 0; b < kLabTimelineBlocks; ++b) {
    const unsigned long long *r = &tl[b * 9];
    if (!r[3]) continue;
    start.push_back((r[0] - first) * 1e-3);
    end.push_back((r[3] - first) * 1e-3);
    land.push_back(r[5] ? (r[5] - r[4]) * us_per_clock : 0);
    loop.push_back(r[6] && r[5] ? (r[6] - r[5]) * us_per_clock : 0);
    tail.push_back(r[6] ? (r[7] - r[6]) * us_per_clock : 0);
    ++per_sm[r[8] % 1024];
  }
  int sms_used = 0, most = 0;
  for (int c : per_sm) {
    sms_used += c > 0;
    most = std::max(most, c);
  }
  auto pct = [](std::vector<double> v, double q) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[std::min(v.size() - 1, size_t(q * (v.size() - 1) + 0.5))];
  };
  std::printf("  timeline of %zu blocks on %d SMs (at most %d per SM), us as p0 / p50 / p90 / "
              "p100:\n", start.size(), sms_used, most);
  const std::pair<const char *, const std::vector<double> *> rows[] = {
      {"start", &start}, {"first unit landed after", &land}, {"steady loop", &loop},
      {"last hand-off, epilogue", &tail}, {"end", &end}};
  for (const auto &[name, v] : rows)
    std::printf("    %-24s %6.2f / %6.2f / %6.2f / %6.2f\n", name, pct(*v, 0), pct(*v, 0.5),
                pct(*v, 0.9), pct(*v, 1));
}
#endif

int lab_blocks_per_sm(int mt, int k_slices, int m) {
  using namespace jax_nvfp4;
  if (mt == 2 && k_slices == kPairKSlices)
    return blocks_per_sm_typed<__nv_bfloat16, 2, false, kPairKSlices>();
  return blocks_per_sm<false>(mt, true, k_slices, m);
}

int main(int argc, char **argv) {
  using namespace jax_nvfp4;
  if (argc < 4) {
    std::fprintf(stderr, "usage: lab K N M [splits [k_slices [tiles_per_block]]]\n");
    return 2;
  }
  const int k = std::atoi(argv[1]), n = std::atoi(argv[2]), m = std::atoi(argv[3]);
  const int mt = std::getenv("LAB_MT") ? std::atoi(std::getenv("LAB_MT"))
                 : m <= 8                ? 1
                 : m <= 16               ? 2
                 : m <= 32               ? 4
                                         : 8;
  const int n16 = (n + 15) / 16, k64 = (k + 63) / 64;
  const int units = (k64 + unsliced_unit_chunks(mt) - 1) / unsliced_unit_chunks(mt);
  const int n_blocks = (n16 + kWarps - 1) / kWarps;
  const int token_tiles = (m + 8 * mt - 1) / (8 * mt);
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int bps = blocks_per_sm<false>(mt, true);
  // As jax_nvfp4/ops/dense.py choose_launch.
  const int default_splits =
      std::max(1, std::min({sms * bps / (n_blocks * token_tiles), units, 64}));
  int splits = argc > 4 ? std::atoi(argv[4]) : default_splits;
  const int k_slices = argc > 5 ? std::atoi(argv[5]) : 1;  // 8: warps split K (splits must be 1)
  int tiles_per_block = argc > 6 ? std::atoi(argv[6]) : 1;  // > 1: splits must be 1
  const int slice_bps = k_slices > 1 ? lab_blocks_per_sm(mt, k_slices, m) : bps;
  if (tiles_per_block == 0) {  // one wave, spread evenly
    const int tiles = (n16 + kWarps / k_slices - 1) / (kWarps / k_slices);
    const int per_token_tile = std::max(1, sms * std::max(1, slice_bps) / token_tiles);
    const int per_wave = std::max(1, std::min(tiles, per_token_tile));
    tiles_per_block = (tiles + per_wave - 1) / per_wave;
  }
  const int copies = 16, trials = 9;
  const size_t sbytes = size_t(n16) * k64 * 64;
  std::vector<void *> w(copies), s(copies);
  for (int c = 0; c < copies; ++c) {
    CHECK(cudaMalloc(&w[c], size_t(n16) * k64 * 32 * 16));
    CHECK(cudaMalloc(&s[c], sbytes));
    fill_random<<<1024, 256>>>(static_cast<uint32_t *>(w[c]), size_t(n16) * k64 * 32 * 4, 17 + c);
    // Scale bytes below 0x80 (exponent <= 15 of bias 10): prepared E4M3 scales stay below 0x98,
    // and larger random bytes widen to inf/NaN, which LAB_CHECK could not compare.
    fill_random<<<256, 256>>>(static_cast<uint32_t *>(s[c]), sbytes / 4, 91 + c, 0x7F7F7F7Fu);
  }
  __nv_bfloat16 *x, *out;
  float *gs;
  CHECK(cudaMalloc(&x, size_t(m) * k * 2));
  CHECK(cudaMalloc(&out, size_t(m) * n * 2));
  CHECK(cudaMalloc(&gs, 4));
  fill_x<<<256, 256>>>(x, size_t(m) * k);
  const float one = 1.f;
  CHECK(cudaMemcpy(gs, &one, 4, cudaMemcpyHostToDevice));
  const int64_t tickets = ticket_bytes(token_tiles, n_blocks);
  void *ws;
  CHECK(cudaMalloc(&ws, tickets + size_t(splits) * m * n * 4));
  GemmParams p{};
  p.x = x; p.global_scale = gs; p.out = out;
  p.tickets = static_cast<int *>(ws);
  p.partials = reinterpret_cast<float *>(static_cast<char *>(ws) + tickets);
  p.n = n; p.k = k; p.n16 = n16; p.k64 = k64; p.splits = splits; p.rows_out = m; p.slots = m;
  p.tiles_per_block = tiles_per_block;
  // As the FFI handler: the splits reduce in a cluster where the device has one (LAB_TICKETS=1
  // forces the global-workspace ticket path).
  p.cluster = splits > 1 && !env_flag("LAB_TICKETS") && splits <= cluster_limit<false>(mt, true);
  // A created stream: programmatic dependent launch (JAX_NVFP4_PDL) does not apply on the legacy
  // default stream.
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const bool read_only_mode = env_flag("LAB_READ_ONLY");
  auto call = [&](int c) {
    if (read_only_mode) {
      read_only<<<sms * 8, 256, 0, stream>>>(static_cast<const uint4 *>(w[c]), size_t(n16) * k64 * 32,
                                             static_cast<const uint4 *>(s[c]), sbytes / 16,
                                             reinterpret_cast<uint32_t *>(ws));
      CHECK(cudaGetLastError());
      return;
    }
    p.qweight = static_cast<const uint4 *>(w[c]);
    p.qscales = static_cast<const uint4 *>(s[c]);
    if (splits > 1 && !p.cluster) CHECK(cudaMemsetAsync(p.tickets, 0, tickets, stream));
    CHECK(launch_lab(p, mt, token_tiles, stream, k_slices));
  };
  for (int c = 0; c < copies; ++c) call(c);
  CHECK(cudaDeviceSynchronize());
  const double median = memcheck::median_call_us(call, copies, trials, stream);
  const bool sliced = mt == 1 && (k_slices == kDecodeKSlices || k_slices == kPairKSlices);
  const int xr = sliced && token_tiles == 1 ? short_tile_rows(m) : 0;
  if (k_slices == kDecodeKSlices) print_short_tile<kDecodeKSlices>(xr);
  if (k_slices == kPairKSlices) print_short_tile<kPairKSlices>(xr);
  const double bytes = double(n) * k / 2 + double(n) * k / 16;
  if (read_only_mode) std::printf("[bare read of the weight bytes] ");
  std::printf("m_tile %d: ", mt);
  std::printf("K=%d N=%d M=%d chunks/stage=%d stages=%d splits=%d k_slices=%d tiles/block=%d%s "
              "blocks/SM=%d: %.1f us (%.0f GB/s, %.0f TFLOP/s)\n",
              k, n, m, unsliced_unit_chunks(mt), TileConfig<1>::kStages, splits, k_slices, tiles_per_block,
              p.cluster ? " (cluster)" : "", slice_bps, median,
              bytes / median * 1e-3, 2.0 * m * n * k / median * 1e-6);
#if JAX_NVFP4_LAB_TIMELINE
  if (!read_only_mode) print_timeline([&] {
      for (int c = 0; c < copies; ++c) call(c);
      CHECK(cudaStreamSynchronize(stream));
    });
#endif
  if (env_flag("LAB_CHECK") && !read_only_mode) {
    // The plain launch (no k-slices, the default splits, tickets through the workspace) on
    // copy 0, against this launch's output on copy 0.
    call(0);
    CHECK(cudaStreamSynchronize(stream));
    std::vector<__nv_bfloat16> got(size_t(m) * n), want(size_t(m) * n);
    CHECK(cudaMemcpy(got.data(), out, got.size() * 2, cudaMemcpyDeviceToHost));
    const int plain_splits = default_splits;
    void *ws2;
    CHECK(cudaMalloc(&ws2, tickets + size_t(plain_splits) * m * n * 4));
    GemmParams q = p;
    q.splits = plain_splits; q.tiles_per_block = 1; q.cluster = false;
    q.tickets = static_cast<int *>(ws2);
    q.partials = reinterpret_cast<float *>(static_cast<char *>(ws2) + tickets);
    q.qweight = static_cast<const uint4 *>(w[0]);
    q.qscales = static_cast<const uint4 *>(s[0]);
    CHECK(cudaMemsetAsync(out, 0xFF, size_t(m) * n * 2, stream));  // poisoned (NaN)
    if (plain_splits > 1) CHECK(cudaMemsetAsync(q.tickets, 0, tickets, stream));
    CHECK(launch<false>(q, true, mt, token_tiles, stream, 1));
    CHECK(cudaStreamSynchronize(stream));
    CHECK(cudaMemcpy(want.data(), out, want.size() * 2, cudaMemcpyDeviceToHost));
    CHECK(cudaFree(ws2));
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double a = __bfloat162float(got[i]), b = __bfloat162float(want[i]);
      num += (a - b) * (a - b);
      den += b * b;
    }
    const double rel = std::sqrt(num / std::max(den, 1e-30));
    // A hash of this launch's output bytes: builds with different knobs compare bit for bit.
    uint64_t hash = 1469598103934665603ull;  // FNV-1a
    for (const __nv_bfloat16 &v : got) {
      hash = (hash ^ *reinterpret_cast<const uint16_t *>(&v)) * 1099511628211ull;
    }
    std::printf("  check vs the plain launch (%d splits): rel-L2 %.2e, output hash %016llx\n",
                plain_splits, rel, static_cast<unsigned long long>(hash));
    if (!(rel <= 1e-2)) return 1;
  }
  return 0;
}

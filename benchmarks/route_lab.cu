// Time of the routing + alignment launch (csrc/moe_route_kernels.cuh) cold and warm, without
// JAX (not a test; run on a GPU):
//   nvcc -std=c++17 -O3 -arch=sm_90a -I csrc benchmarks/route_lab.cu -o route_lab && ./route_lab
// Why: in the layer the routing kernel runs after the previous layer's weight stream, so its
// code and inputs come from HBM; profile_moe measures 4.3 / 6.0 / 3.0 us at one token for the
// Qwen3- / DeepSeek- / Mixtral-like routing, while a one-block XLA fusion in the same place
// takes 1.1-1.5 us (NOTES_moe.md v18). "cold" runs each launch after a kernel that writes
// 512 MB (evicting L2, and running other code on every SM); "warm" runs the launches back to
// back. Both from CUDA graphs of R repetitions, so the host is not timed; cold = (graph of
// evict + route - graph of evict) / R. Each case runs the decode kernel, then the wide one
// where it applies (its outputs compared with the decode kernel's). -D knobs of
// moe_route_kernels.cuh give the variants; JAX_NVFP4_ROUTE_LAB_CLOCK=1 also prints thread 0's
// SM cycles between the kernels' stamps (decode: scores / groups / top-k / weights / align;
// wide: scores / groups, ranks and barrier / merge / weights / align) (NOTES_moe.md v24).
#include "cuda_tool.h"
#include "moe_route_kernels.cuh"

namespace {

using namespace jax_nvfp4::moe_route;

struct Case {
  const char *name;
  int tokens, experts, top_k;
  bool sigmoid;
  int n_group, topk_group;
  float scaling;
};

const Case kCases[] = {
    {"one store    ", 1, 0, 0, false, 1, 1, 1.f},
    {"qwen3    T=1 ", 1, 128, 8, false, 1, 1, 1.f},
    {"deepseek T=1 ", 1, 256, 8, true, 8, 4, 2.5f},
    {"mixtral  T=1 ", 1, 8, 2, false, 1, 1, 1.f},
    {"qwen3    T=16", 16, 128, 8, false, 1, 1, 1.f},
    {"deepseek T=16", 16, 256, 8, true, 8, 4, 2.5f},
    {"mixtral  T=16", 16, 8, 2, false, 1, 1, 1.f},
    {"deepseek T=4 ", 4, 256, 8, true, 8, 4, 2.5f},   // the wide kernel's most tokens
    {"qwen3    T=8 ", 8, 128, 8, false, 1, 1, 1.f},
};

constexpr int kRepeats = 50;
constexpr size_t kEvictBytes = size_t(512) << 20;

__global__ void evict(uint4 *buf, size_t n, uint32_t salt) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    buf[i] = make_uint4(uint32_t(i), salt, uint32_t(i >> 32), salt);
}

// The floor: a one-block launch that stores one word.
__global__ void one_store(int *out) {
  if (threadIdx.x == 0) *out = 1;
}

// The best of 5 replays of `graph`, per repetition, in us.
float graph_us(cudaGraphExec_t graph, cudaStream_t stream) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  float best = 1e30f;
  for (int i = 0; i < 5; ++i) {
    CHECK(cudaEventRecord(a, stream));
    CHECK(cudaGraphLaunch(graph, stream));
    CHECK(cudaEventRecord(b, stream));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    best = std::min(best, ms * 1000.f / kRepeats);
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return best;
}

// A graph of kRepeats x (evict if `with_evict`, route if `with_route`).
cudaGraphExec_t capture(bool with_evict, bool with_route, const RouteLaunch &launch,
                        RouteParams &p, uint4 *buf, cudaStream_t stream) {
  cudaGraph_t graph;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  for (int r = 0; r < kRepeats; ++r) {
    if (with_evict) evict<<<132 * 4, 512, 0, stream>>>(buf, kEvictBytes / 16, uint32_t(r));
    if (with_route && launch.kernel == nullptr) {
      one_store<<<1, 32, 0, stream>>>(p.num_padded);
    } else if (with_route) {
      void *args[] = {&p};
      CHECK(cudaLaunchKernel(launch.kernel, dim3(1), dim3(launch.threads), args, launch.smem,
                             stream));
    }
  }
  CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CHECK(cudaGraphDestroy(graph));
  return exec;
}

}  // namespace

int main() {
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  uint4 *buf = nullptr;
  CHECK(cudaMalloc(&buf, kEvictBytes));
  int device = 0, optin = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  uint64_t seed = 7;
  for (const Case &c : kCases) {
    const bool floor = c.experts == 0;
    const int pairs = c.tokens * c.top_k, block_m = 8;
    const int slots = int(jax_nvfp4::moe_align::align_capacity(pairs, c.experts, block_m));
    std::vector<float> logits(size_t(c.tokens) * c.experts), bias(c.experts);
    for (auto &v : logits) v = float(int(memcheck::next(seed) % 1001) - 500) / 128.f;
    for (auto &v : bias) v = float(int(memcheck::next(seed) % 101) - 50) / 1024.f;
    RouteParams p{};
    p.logits = memcheck::device_copy(logits);
    p.bias = c.sigmoid ? memcheck::device_copy(bias) : nullptr;
    CHECK(cudaMalloc(&p.weights, pairs * sizeof(float)));
    CHECK(cudaMalloc(&p.ids, pairs * sizeof(int)));
    CHECK(cudaMalloc(&p.sorted_ids, slots * sizeof(int)));
    CHECK(cudaMalloc(&p.block_expert, slots / block_m * sizeof(int)));
    CHECK(cudaMalloc(&p.num_padded, sizeof(int)));
    p.tokens = c.tokens;
    p.experts = c.experts;
    p.top_k = c.top_k;
    p.sigmoid = c.sigmoid;
    p.renormalize = true;
    p.n_group = c.n_group;
    p.topk_group = c.topk_group;
    p.scaling = c.scaling;
    p.block_m = block_m;
    p.slots = slots;
    std::vector<int> decode_ids, decode_sorted;
    std::vector<float> decode_weights;
    for (bool wide : {false, true}) {
      RouteLaunch launch{};
      const std::string why =
          floor ? "" : plan_route_launch(p, LogitType::kF32, true, optin, launch, wide);
      if (!why.empty()) {
        std::fprintf(stderr, "%s: %s\n", c.name, why.c_str());
        return 1;
      }
      if (wide && !launch.wide) continue;   // the wide kernel does not take this case
      if (launch.smem > 48 * 1024)
        CHECK(cudaFuncSetAttribute(launch.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   int(launch.smem)));
      cudaFuncAttributes attr{};
      CHECK(cudaFuncGetAttributes(&attr, floor ? reinterpret_cast<const void *>(one_store)
                                               : launch.kernel));
      cudaGraphExec_t evict_only = capture(true, false, launch, p, buf, stream);
      cudaGraphExec_t cold = capture(true, true, launch, p, buf, stream);
      cudaGraphExec_t warm = capture(false, true, launch, p, buf, stream);
      CHECK(cudaGraphLaunch(warm, stream));  // first touches
      CHECK(cudaStreamSynchronize(stream));
      const float e = graph_us(evict_only, stream), ce = graph_us(cold, stream);
      const float w = graph_us(warm, stream);
      // The wide kernel's outputs against the decode kernel's (the same bits, as the tests and
      // memcheck_route check more thoroughly).
      std::vector<int> ids(pairs), sorted(slots);
      std::vector<float> weights(pairs);
      CHECK(cudaMemcpy(ids.data(), p.ids, pairs * sizeof(int), cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(sorted.data(), p.sorted_ids, slots * sizeof(int), cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(weights.data(), p.weights, pairs * sizeof(float), cudaMemcpyDeviceToHost));
      const char *agree = "";
      if (wide) {
        agree = ids == decode_ids && sorted == decode_sorted &&
                        std::memcmp(weights.data(), decode_weights.data(), pairs * 4) == 0
                    ? ", same bits as decode"
                    : ", DIFFERS FROM DECODE";
      } else {
        decode_ids = ids;
        decode_sorted = sorted;
        decode_weights = weights;
      }
      std::printf("%s %s kernel, %d regs: cold %.2f us, warm %.2f us (evict alone %.1f us)%s\n",
                  c.name,
                  floor ? "store  " : launch.wide ? "wide   " : launch.decode ? "decode " : "general",
                  attr.numRegs, ce - e, w, e, agree);
#if JAX_NVFP4_ROUTE_LAB_CLOCK
      if (!floor && launch.decode) {  // the last (warm) launch's phases, in SM cycles
        long long t[8];
        CHECK(cudaMemcpyFromSymbol(t, route_lab_clock, sizeof t));
        std::printf("  cycles: %lld / %lld / %lld / %lld / %lld\n", t[1] - t[0], t[2] - t[1],
                    t[3] - t[2], t[4] - t[3], t[5] - t[4]);
      }
#endif
      for (cudaGraphExec_t g : {evict_only, cold, warm}) CHECK(cudaGraphExecDestroy(g));
      if (floor) break;
    }
  }
  CHECK(cudaFree(buf));
  return 0;
}

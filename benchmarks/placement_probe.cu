// Where the hardware puts the blocks of one wave (not a test): each block records its SM and
// spins long enough for the whole grid to be resident together, so the histogram is that of a
// launch like the GEMM's (same threads, same dynamic shared memory).
//   nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -I csrc benchmarks/placement_probe.cu -o probe
//   ./probe BLOCKS SMEM_BYTES      prints blocks per SM and which block ids share an SM
//   ./probe                        prints the GEMM configurations' shared memory and residency
#include <cstdio>
#include <cstdlib>
#include <map>
#include <vector>

#include "cuda_tool.h"

__global__ void __launch_bounds__(256) where(int *sm_of_block, long long spin) {
  extern __shared__ unsigned char smem[];
  if (threadIdx.x == 0) {
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    sm_of_block[blockIdx.x] = static_cast<int>(sm);
    smem[0] = 1;
  }
  const long long start = clock64();
  while (clock64() - start < spin) {
  }
}

int main(int argc, char **argv) {
  using namespace jax_nvfp4;
  if (argc < 3) {
    std::printf("k-sliced 1-row: %d B, %d/SM; k-sliced m_tile 2: %d B, %d/SM; m_tile 2: %d B, "
                "%d/SM; m_tile 1: %d B, %d/SM\n",
                TileConfig<1, kDecodeKSlices, 1>::kSmemBytes,
                blocks_per_sm_typed<__nv_bfloat16, 1, false, kDecodeKSlices, 1>(),
                TileConfig<2, kDecodeKSlices>::kSmemBytes,
                blocks_per_sm_typed<__nv_bfloat16, 2, false, kDecodeKSlices>(),
                TileConfig<2>::kSmemBytes, blocks_per_sm_typed<__nv_bfloat16, 2, false, 1>(),
                TileConfig<1>::kSmemBytes, blocks_per_sm_typed<__nv_bfloat16, 1, false, 1>());
    return 0;
  }
  const int blocks = std::atoi(argv[1]), smem = std::atoi(argv[2]);
  int *d;
  CHECK(cudaMalloc(&d, blocks * sizeof(int)));
  CHECK(cudaFuncSetAttribute(where, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, where, 256, smem));
  where<<<blocks, 256, smem>>>(d, 40000);  // warm-up
  where<<<blocks, 256, smem>>>(d, 40000);
  CHECK(cudaDeviceSynchronize());
  std::vector<int> sm(blocks);
  CHECK(cudaMemcpy(sm.data(), d, blocks * sizeof(int), cudaMemcpyDeviceToHost));
  std::map<int, std::vector<int>> by_sm;
  for (int b = 0; b < blocks; ++b) by_sm[sm[b]].push_back(b);
  std::map<size_t, int> hist;
  for (auto &kv : by_sm) ++hist[kv.second.size()];
  std::printf("%d blocks, %d B smem, %d resident per SM, %zu SMs used; blocks per SM:", blocks,
              smem, per_sm, by_sm.size());
  for (auto &kv : hist) std::printf(" %zu x %d SMs", kv.first, kv.second);
  std::printf("\n  first SMs:");
  int shown = 0;
  for (auto &kv : by_sm) {
    if (shown++ == 12) break;
    std::printf(" sm%d{", kv.first);
    for (int b : kv.second) std::printf("%d ", b);
    std::printf("}");
  }
  std::printf("\n");
  return 0;
}

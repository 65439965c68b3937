// jax_nvfp4._C: hands the XLA FFI handlers to Python as capsules (jax.ffi.register_ffi_target).
#include <nanobind/nanobind.h>

#include <vector>

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

#ifdef JAX_NVFP4_WITH_CUDA
XLA_FFI_DECLARE_HANDLER_SYMBOL(Nvfp4GemmCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Nvfp4MoeGemmCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Nvfp4MoePairCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Nvfp4DequantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Nvfp4MoeAlignCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Nvfp4MoeRouteAlignCuda);
extern "C" int jax_nvfp4_sm_count();
extern "C" int jax_nvfp4_blocks_per_sm(int mt, int bf16, int k_slices, int rows);
extern "C" int jax_nvfp4_moe_blocks_per_sm(int mt, int bf16, int k_slices, int rows);
extern "C" int jax_nvfp4_cluster_limit(int mt, int bf16);
extern "C" int jax_nvfp4_moe_cluster_limit(int mt, int bf16);
extern "C" int jax_nvfp4_moe_lab_timeline(int n16, unsigned long long *out, int blocks);
extern "C" void jax_nvfp4_loaded_code(int mt, int bf16, int *out);
extern "C" void jax_nvfp4_moe_loaded_code(int mt, int bf16, int *out);
extern "C" int jax_nvfp4_smem_limit();
#endif
#ifndef JAX_NVFP4_CUDA_ARCHITECTURES
#define JAX_NVFP4_CUDA_ARCHITECTURES ""
#endif

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule EncapsulateFfiHandler(T *fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error *, T, XLA_FFI_CallFrame *>,
                "an XLA FFI handler must take an XLA_FFI_CallFrame*");
  return nb::capsule(reinterpret_cast<void *>(fn));
}

}  // namespace

NB_MODULE(_C, m) {
  m.def("registrations", []() {
    nb::dict registrations;
#ifdef JAX_NVFP4_WITH_CUDA
    registrations["jax_nvfp4_gemm_cuda"] = EncapsulateFfiHandler(Nvfp4GemmCuda);
    registrations["jax_nvfp4_moe_gemm_cuda"] = EncapsulateFfiHandler(Nvfp4MoeGemmCuda);
    registrations["jax_nvfp4_moe_pair_cuda"] = EncapsulateFfiHandler(Nvfp4MoePairCuda);
    registrations["jax_nvfp4_dequantize_cuda"] = EncapsulateFfiHandler(Nvfp4DequantizeCuda);
    registrations["jax_nvfp4_moe_align_cuda"] = EncapsulateFfiHandler(Nvfp4MoeAlignCuda);
    registrations["jax_nvfp4_moe_route_align_cuda"] =
        EncapsulateFfiHandler(Nvfp4MoeRouteAlignCuda);
#endif
    return registrations;
  }, "Names and capsules of the XLA FFI handlers built into this module.");
  m.def("sm_count", []() {
#ifdef JAX_NVFP4_WITH_CUDA
    return jax_nvfp4_sm_count();
#else
    return 0;
#endif
  }, "Multiprocessors of the current CUDA device (0 without CUDA or without a device).");
  m.def("blocks_per_sm", [](int mt, bool bf16, int k_slices, int rows) {
#ifdef JAX_NVFP4_WITH_CUDA
    return jax_nvfp4_blocks_per_sm(mt, bf16 ? 1 : 0, k_slices, rows);
#else
    return 0;
#endif
  }, "Resident blocks per SM of the dense kernel for token tile mt, k_slices and the launch's "
     "rows (M; 0: the 8-row tile) (0 when unknown or not launchable).");
  m.def("moe_blocks_per_sm", [](int mt, bool bf16, int k_slices, int rows) {
#ifdef JAX_NVFP4_WITH_CUDA
    return jax_nvfp4_moe_blocks_per_sm(mt, bf16 ? 1 : 0, k_slices, rows);
#else
    return 0;
#endif
  }, "Resident blocks per SM of the MoE kernel for token tile mt, k_slices and the "
     "expert_rows hint (0: none) (0 when unknown or not launchable).");
  m.def("cluster_limit", [](int mt, bool bf16, bool moe) {
#ifdef JAX_NVFP4_WITH_CUDA
    return moe ? jax_nvfp4_moe_cluster_limit(mt, bf16 ? 1 : 0)
               : jax_nvfp4_cluster_limit(mt, bf16 ? 1 : 0);
#else
    return 0;
#endif
  }, "Largest K split the cluster reduction launches for token tile mt (0: not on this device).");
  m.def("loaded_code", [](int mt, bool bf16, bool moe) {
    int code[3] = {0, 0, 0};
#ifdef JAX_NVFP4_WITH_CUDA
    if (moe) {
      jax_nvfp4_moe_loaded_code(mt, bf16 ? 1 : 0, code);
    } else {
      jax_nvfp4_loaded_code(mt, bf16 ? 1 : 0, code);
    }
#endif
    nb::dict d;
    d["arch"] = code[0];
    d["pdl"] = code[1] != 0;
    d["cluster_limit"] = code[2];
    return d;
  }, "What the loaded code of the kernel for token tile mt is on the current device: the "
     "architecture it was compiled for (90 for sm_90a code, 80 for sm_80 PTX the driver compiled "
     "for a newer GPU; 0: unknown), whether its launches overlap the previous kernel (pdl) and "
     "its cluster_limit.");
  m.def("smem_limit", []() {
#ifdef JAX_NVFP4_WITH_CUDA
    return jax_nvfp4_smem_limit();
#else
    return 0;
#endif
  }, "Bytes of shared memory one block may have on the current device (0: no device).");
  m.def("cuda_architectures", []() { return nb::str(JAX_NVFP4_CUDA_ARCHITECTURES); },
        "The CUDA architectures the kernels were built for, comma-separated as CMake's "
        "CUDA_ARCHITECTURES (80-virtual: PTX only); empty without CUDA.");
  m.def("moe_lab_timeline_reset", [](int n16) {
#ifdef JAX_NVFP4_WITH_CUDA
    return jax_nvfp4_moe_lab_timeline(n16, nullptr, 0) >= 0;
#else
    return false;
#endif
  }, "Clears the grouped GEMM's lab timeline and records only weights of n16 N tiles (0: all); "
     "False in a build without it (benchmarks/moe_timeline.py).");
  m.def("moe_lab_timeline", [](int blocks) {
#ifdef JAX_NVFP4_WITH_CUDA
    std::vector<unsigned long long> records(size_t(blocks) * 9);
    const int n = jax_nvfp4_moe_lab_timeline(0, records.data(), blocks);
    if (n < 0) return nb::bytes("", 0);
    return nb::bytes(reinterpret_cast<const char *>(records.data()), size_t(n) * 9 * 8);
#else
    return nb::bytes("", 0);
#endif
  }, "The grouped GEMM's lab timeline, `blocks` records of 9 uint64 (empty in a build "
     "without it).");
  m.def("built_with_cuda", []() {
#ifdef JAX_NVFP4_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

// XLA FFI handler of the fused MoE routing + token alignment for small batches (target
// jax_nvfp4_moe_route_align_cuda): checks the call, then launches moe_route_kernels.cuh's
// kernels (whose header comment states the algorithm), one block. The CUDA twin of
// jax_nvfp4/ops/moe_route.py's reference.

#include <algorithm>
#include <cstdlib>
#include <string>

#include "ffi_util.h"
#include "moe_route_kernels.cuh"

namespace jax_nvfp4 {
namespace {

using namespace moe_route;

// JAX_NVFP4_ROUTE_SMALL=0 sends decode batches to the general kernel too (plan_route_launch):
// the A/B switch of the benchmarks and of the GPU tests that compare the two. Read at every
// call (it is cheap beside a launch), so that one process can run both.
bool decode_kernel_enabled() {
  const char *env = std::getenv("JAX_NVFP4_ROUTE_SMALL");
  return env == nullptr || std::string(env) != "0";
}

// The wide decode kernel (one warp per 32 experts, NOTES_moe.md v24, v26) for p: where it was
// measured faster (wide_route_wins), or JAX_NVFP4_ROUTE_WIDE=1 wherever it fits and "0" never
// (the A/B switch of the tests and benchmarks). Read at every call, as above.
bool wide_kernel_wanted(const RouteParams &p) {
  const char *env = std::getenv("JAX_NVFP4_ROUTE_WIDE");
  const std::string setting = env != nullptr ? env : "";
  return setting == "1" || (setting != "0" && wide_route_wins(p));
}

ffi::Error invalid(const std::string &msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_nvfp4_moe_route_align: " + msg);
}

ffi::Error MoeRouteAlignImpl(cudaStream_t stream, ffi::AnyBuffer logits,
                             ffi::Buffer<ffi::F32> correction_bias,
                             ffi::Buffer<ffi::S32> expert_map,
                             ffi::Result<ffi::Buffer<ffi::F32>> weights,
                             ffi::Result<ffi::Buffer<ffi::S32>> ids,
                             ffi::Result<ffi::Buffer<ffi::S32>> sorted,
                             ffi::Result<ffi::Buffer<ffi::S32>> block_expert,
                             ffi::Result<ffi::Buffer<ffi::S32>> num_padded, int64_t top_k,
                             int64_t sigmoid, int64_t renormalize, int64_t n_group,
                             int64_t topk_group, int64_t group_max, float scaling,
                             int64_t block_m) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2) return invalid("logits must be [M, E], got " + dims_str(dims));
  const ffi::DataType dtype = logits.element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16 &&
      dtype != ffi::DataType::F16)
    return invalid("logits must be float32, bfloat16 or float16");
  const int64_t m = dims[0], e = dims[1];
  if (e < 1 || e > kRouteMaxExperts)
    return invalid("E = " + std::to_string(e) + " must be in [1, " +
                   std::to_string(kRouteMaxExperts) + "]");
  if (top_k < 1 || top_k > std::min<int64_t>(e, kRouteMaxTopK))
    return invalid("top_k must be in [1, min(E, " + std::to_string(kRouteMaxTopK) + ")]");
  const int64_t pairs = m * top_k;
  if (pairs > kRouteMaxPairs)
    return invalid(std::to_string(pairs) + " (token, k) pairs, more than one block's " +
                   std::to_string(kRouteMaxPairs));
  if (n_group < 1 || n_group > kRouteMaxGroups || e % n_group != 0)
    return invalid("n_group must be in [1, " + std::to_string(kRouteMaxGroups) +
                   "] and divide E");
  if (n_group > 1 && (topk_group < 1 || topk_group > n_group || top_k > topk_group * (e / n_group)))
    return invalid("topk_group must be in [1, n_group] with top_k <= topk_group * E / n_group");
  const int64_t bias_len = correction_bias.element_count();
  if (bias_len != 0 && bias_len != e) return invalid("correction_bias must have E entries or none");
  if (weights->element_count() != pairs || ids->element_count() != pairs)
    return invalid("topk_weights and topk_ids must have M * top_k entries");
  const int64_t map_len = expert_map.element_count();
  const int64_t slots = sorted->element_count();
  const std::string problem =
      moe_align::alignment_problem(pairs, e, block_m, map_len, slots,
                                   block_expert->element_count(), num_padded->element_count());
  if (!problem.empty()) return invalid(problem);

  RouteParams p{};
  p.logits = logits.untyped_data();
  p.bias = bias_len ? correction_bias.typed_data() : nullptr;
  p.expert_map = map_len ? expert_map.typed_data() : nullptr;
  p.weights = weights->typed_data();
  p.ids = ids->typed_data();
  p.sorted_ids = sorted->typed_data();
  p.block_expert = block_expert->typed_data();
  p.num_padded = num_padded->typed_data();
  p.tokens = static_cast<int>(m);
  p.experts = static_cast<int>(e);
  p.top_k = static_cast<int>(top_k);
  p.sigmoid = sigmoid != 0;
  p.renormalize = renormalize != 0;
  p.group_max = group_max != 0;
  p.n_group = static_cast<int>(n_group);
  p.topk_group = static_cast<int>(topk_group);
  p.scaling = scaling;
  p.block_m = static_cast<int>(block_m);
  p.slots = static_cast<int>(slots);

  int optin = 0;
  if (ffi::Error err = smem_optin_bytes(optin, "jax_nvfp4_moe_route_align"); err.failure())
    return err;
  const LogitType type = dtype == ffi::DataType::F32    ? LogitType::kF32
                         : dtype == ffi::DataType::BF16 ? LogitType::kBF16
                                                        : LogitType::kF16;
  RouteLaunch launch{};
  if (const std::string why = plan_route_launch(p, type, decode_kernel_enabled(), optin, launch,
                                                wide_kernel_wanted(p));
      !why.empty())
    return invalid(why);
  if (ffi::Error err = allow_dynamic_smem(launch.kernel, launch.smem, "jax_nvfp4_moe_route_align");
      err.failure())
    return err;
  void *args[] = {&p};
  if (cudaError_t err = cudaLaunchKernel(launch.kernel, dim3(1), dim3(launch.threads), args,
                                         launch.smem, stream);
      err != cudaSuccess)
    return cuda_error("jax_nvfp4_moe_route_align launch", err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_nvfp4

XLA_FFI_DEFINE_HANDLER_SYMBOL(Nvfp4MoeRouteAlignCuda, jax_nvfp4::MoeRouteAlignImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // router logits [M, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // correction_bias [E] or [0]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_map [E] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // topk_weights [M, k]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // topk_ids [M, k]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // sorted_ids [P]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // block_expert [P / block_m]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // num_padded [1]
                                  .Attr<int64_t>("top_k")
                                  .Attr<int64_t>("sigmoid")
                                  .Attr<int64_t>("renormalize")
                                  .Attr<int64_t>("n_group")
                                  .Attr<int64_t>("topk_group")
                                  .Attr<int64_t>("group_max")
                                  .Attr<float>("routed_scaling_factor")
                                  .Attr<int64_t>("block_m"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

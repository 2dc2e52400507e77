// CUDA binding of fastrlhf::packed_gae: validates with TORCH_CHECK, allocates the
// outputs and the scratch through the caching allocator, and calls the plain C++
// launcher of csrc/cuda/gae_kernel.cu on the current stream.
//
// The cu_seqlens values (starts at 0, never decreases, ends at N) are checked only
// when validate=True: that copies [B+1] ints to the host and so synchronizes, which
// the hot path must not do. Without it, malformed cu_seqlens give wrong numbers but
// never an out-of-bounds access (the kernel clamps its sequence lookup).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../gae_checks.h"
#include "gae_cuda.h"

namespace fastrlhf {
namespace {

cuda::GaeDtype gae_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return cuda::GaeDtype::kFloat32;
    case at::kDouble:
      return cuda::GaeDtype::kFloat64;
    case at::kHalf:
      return cuda::GaeDtype::kFloat16;
    case at::kBFloat16:
      return cuda::GaeDtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "packed_gae: unsupported dtype ", s);
  }
}

std::tuple<at::Tensor, at::Tensor> packed_gae_cuda(
    const at::Tensor& rewards_in, const at::Tensor& values_in, const at::Tensor& cu_seqlens,
    double gamma, double lam, const std::optional<at::Tensor>& mask_in,
    const std::optional<at::Tensor>& bootstrap_in, bool validate) {
  check_packed_gae_inputs(rewards_in, values_in, cu_seqlens, mask_in, bootstrap_in);
  TORCH_CHECK_VALUE(rewards_in.is_cuda(), "packed_gae: expected CUDA tensors; got rewards with ",
                    describe(rewards_in));
  const int64_t total = rewards_in.numel();
  const int64_t batch = cu_seqlens.numel() - 1;
  if (validate) {
    const at::Tensor cu_host = cu_seqlens.to(at::kCPU);  // synchronizes: opt-in only
    check_cu_seqlens_values(cu_host.data_ptr<int32_t>(), batch, total);
  }

  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const at::Tensor rewards = rewards_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const at::Tensor bootstrap =
      bootstrap_in.has_value() ? bootstrap_in->to(at::kFloat).contiguous() : at::Tensor();

  auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({total}, opts);  // [N]
  at::Tensor ret = at::empty({total}, opts);  // [N]
  if (total == 0) return {adv, ret};

  const size_t scratch_bytes = cuda::packed_gae_workspace_bytes(total);
  at::Tensor scratch = at::empty({static_cast<int64_t>(scratch_bytes)}, opts.dtype(at::kByte));
  const cudaError_t err = cuda::packed_gae_launch(
      gae_dtype(rewards.scalar_type()), rewards.data_ptr(), values.data_ptr(),
      mask.defined() ? mask.data_ptr<bool>() : nullptr, cu_seqlens.data_ptr<int32_t>(), batch,
      total,
      bootstrap.defined() ? bootstrap.data_ptr<float>() : nullptr, static_cast<float>(gamma),
      static_cast<float>(gamma * lam), adv.data_ptr<float>(), ret.data_ptr<float>(),
      scratch_bytes ? scratch.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "packed_gae: CUDA launch failed: ", cudaGetErrorString(err));
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) { m.impl("packed_gae", &packed_gae_cuda); }

}  // namespace fastrlhf

// Input validation of fastrlhf::packed_gae, shared by the CPU and CUDA bindings.
//
// Errors follow Python's kinds so that the compiled op and the PyTorch fallback in
// fastrlhf/ops/advantages.py raise the same exceptions: a wrong dtype is a TypeError
// (TORCH_CHECK_TYPE), a wrong shape, device, layout or cu_seqlens value is a
// ValueError (TORCH_CHECK_VALUE). Every message names the argument and its
// shape/dtype/device.
//
// Shapes: N = packed tokens, B = sequences.
//   rewards, values [N] float (same dtype), mask [N] bool, bootstrap [B] float,
//   cu_seqlens [B+1] int32 contiguous.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

namespace fastrlhf {

inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return os.str();
}

inline bool is_gae_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// Metadata checks only (dtype, device, shape, layout): they read no tensor data and
// so cost nothing on any device.
inline void check_packed_gae_inputs(const at::Tensor& rewards, const at::Tensor& values,
                                    const at::Tensor& cu_seqlens,
                                    const std::optional<at::Tensor>& mask,
                                    const std::optional<at::Tensor>& bootstrap) {
  TORCH_CHECK_VALUE(rewards.dim() == 1, "packed_gae: rewards must be 1-D [N] (packed tokens); got ",
                    describe(rewards));
  TORCH_CHECK_TYPE(is_gae_float(rewards.scalar_type()),
                   "packed_gae: rewards must be float16, bfloat16, float32 or float64; got ",
                   describe(rewards));
  TORCH_CHECK_TYPE(values.scalar_type() == rewards.scalar_type(),
                   "packed_gae: values must have the dtype of rewards (", rewards.scalar_type(),
                   "); got ", describe(values));
  TORCH_CHECK_VALUE(values.sizes() == rewards.sizes(),
                    "packed_gae: values must have the shape of rewards ", rewards.sizes(), "; got ",
                    describe(values));
  TORCH_CHECK_VALUE(values.device() == rewards.device(),
                    "packed_gae: values must be on the device of rewards (", rewards.device(),
                    "); got ", describe(values));

  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt,
                   "packed_gae: cu_seqlens must be int32; got ", describe(cu_seqlens));
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
                    "packed_gae: cu_seqlens must be 1-D [B+1] with B >= 0; got ",
                    describe(cu_seqlens));
  TORCH_CHECK_VALUE(cu_seqlens.is_contiguous(), "packed_gae: cu_seqlens must be contiguous; got ",
                    describe(cu_seqlens), " with strides ", cu_seqlens.strides());
  TORCH_CHECK_VALUE(cu_seqlens.device() == rewards.device(),
                    "packed_gae: cu_seqlens must be on the device of rewards (", rewards.device(),
                    "); got ", describe(cu_seqlens));
  TORCH_CHECK_VALUE(rewards.numel() <= INT32_MAX,
                    "packed_gae: at most 2^31 - 1 tokens (cu_seqlens is int32); got ",
                    describe(rewards));

  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "packed_gae: mask must be bool; got ",
                     describe(*mask));
    TORCH_CHECK_VALUE(mask->sizes() == rewards.sizes(),
                      "packed_gae: mask must have the shape of rewards ", rewards.sizes(),
                      "; got ", describe(*mask));
    TORCH_CHECK_VALUE(mask->device() == rewards.device(),
                      "packed_gae: mask must be on the device of rewards (", rewards.device(),
                      "); got ", describe(*mask));
  }
  if (bootstrap.has_value()) {
    const int64_t batch = cu_seqlens.numel() - 1;
    TORCH_CHECK_TYPE(is_gae_float(bootstrap->scalar_type()),
                     "packed_gae: bootstrap must be a float tensor; got ", describe(*bootstrap));
    TORCH_CHECK_VALUE(bootstrap->dim() == 1 && bootstrap->numel() == batch,
                      "packed_gae: bootstrap must be 1-D [B] with B = len(cu_seqlens) - 1 = ",
                      batch, "; got ", describe(*bootstrap));
    TORCH_CHECK_VALUE(bootstrap->device() == rewards.device(),
                      "packed_gae: bootstrap must be on the device of rewards (", rewards.device(),
                      "); got ", describe(*bootstrap));
  }
}

// Value checks of cu_seqlens, on a host copy: starts at 0, never decreases, ends at N.
// The first offending index is named.
inline void check_cu_seqlens_values(const int32_t* cu, int64_t batch, int64_t total) {
  TORCH_CHECK_VALUE(cu[0] == 0, "packed_gae: cu_seqlens must start at 0; got cu_seqlens[0] = ",
                    cu[0]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(cu[b + 1] >= cu[b],
                      "packed_gae: cu_seqlens must not decrease; got cu_seqlens[", b, "] = ", cu[b],
                      " > cu_seqlens[", b + 1, "] = ", cu[b + 1]);
  }
  TORCH_CHECK_VALUE(cu[batch] == total, "packed_gae: cu_seqlens must end at total_tokens = ", total,
                    " (len(rewards)); got cu_seqlens[", batch, "] = ", cu[batch]);
}

}  // namespace fastrlhf

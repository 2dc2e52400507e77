// CPU kernel of fastrlhf::packed_gae: GAE over packed sequences, one reverse pass.
//
// For sequence b with tokens [s, e) = [cu_seqlens[b], cu_seqlens[b+1]), going from
// t = e-1 down to s with the running state (nv, a) = (bootstrap[b] or 0, 0):
//   unmasked t:  a = r_t + gamma*nv - v_t + gamma*lam*a;  nv = v_t;  adv_t = a
//   masked t:    (nv, a) unchanged;                       adv_t = 0
//   ret_t = adv_t + v_t
// (the masking rule of verl's compute_gae_advantage_return; the reward of a masked
// token is dropped). Outputs are float32.
//
// Parallel over sequences with at::parallel_for; each sequence is one tight serial
// loop. The running state is kept in double: a serial recurrence is latency-bound,
// and a double FMA has the latency of a float one, so the extra precision is free
// and makes this kernel a float64-accurate reference for the CUDA one.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "gae_checks.h"

namespace fastrlhf {
namespace {

template <typename scalar_t, bool kHasMask>
void gae_sequence(const scalar_t* __restrict__ r, const scalar_t* __restrict__ v,
                  const bool* __restrict__ m, int64_t start, int64_t end, double next_value,
                  double gamma, double gamma_lam, float* __restrict__ adv,
                  float* __restrict__ ret) {
  double nv = next_value;
  double a = 0.0;
  for (int64_t t = end - 1; t >= start; --t) {
    const double vt = static_cast<double>(v[t]);
    if (kHasMask && !m[t]) {
      adv[t] = 0.0f;
      ret[t] = static_cast<float>(vt);
      continue;
    }
    a = static_cast<double>(r[t]) - vt + gamma * nv + gamma_lam * a;
    nv = vt;
    adv[t] = static_cast<float>(a);
    ret[t] = static_cast<float>(a + vt);
  }
}

std::tuple<at::Tensor, at::Tensor> packed_gae_cpu(
    const at::Tensor& rewards_in, const at::Tensor& values_in, const at::Tensor& cu_seqlens,
    double gamma, double lam, const std::optional<at::Tensor>& mask_in,
    const std::optional<at::Tensor>& bootstrap_in, bool validate) {
  (void)validate;  // on the CPU the cu_seqlens values are always checked: it costs nothing
  check_packed_gae_inputs(rewards_in, values_in, cu_seqlens, mask_in, bootstrap_in);
  const int64_t total = rewards_in.numel();
  const int64_t batch = cu_seqlens.numel() - 1;
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  check_cu_seqlens_values(cu, batch, total);

  const at::Tensor rewards = rewards_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const at::Tensor bootstrap =
      bootstrap_in.has_value() ? bootstrap_in->to(at::kDouble).contiguous() : at::Tensor();

  auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({total}, opts);  // [N]
  at::Tensor ret = at::empty({total}, opts);  // [N]
  if (total == 0) return {adv, ret};

  const bool* m = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const double* boot = bootstrap.defined() ? bootstrap.data_ptr<double>() : nullptr;
  float* adv_p = adv.data_ptr<float>();
  float* ret_p = ret.data_ptr<float>();
  const double gamma_lam = gamma * lam;
  // Grain: about 16K tokens of work per task, so that short sequences are batched
  // and thread start-up does not dominate.
  const int64_t avg_len = std::max<int64_t>(1, total / std::max<int64_t>(1, batch));
  const int64_t grain = std::max<int64_t>(1, 16384 / avg_len);

  const auto dtype = rewards.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "packed_gae_cpu", [&] {
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    const scalar_t* v = values.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const double nv = boot ? boot[b] : 0.0;
        // the mask test is hoisted out of the token loop (two instantiations)
        if (m) {
          gae_sequence<scalar_t, true>(r, v, m, cu[b], cu[b + 1], nv, gamma, gamma_lam, adv_p,
                                       ret_p);
        } else {
          gae_sequence<scalar_t, false>(r, v, m, cu[b], cu[b + 1], nv, gamma, gamma_lam, adv_p,
                                        ret_p);
        }
      }
    });
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) { m.impl("packed_gae", &packed_gae_cpu); }

}  // namespace fastrlhf

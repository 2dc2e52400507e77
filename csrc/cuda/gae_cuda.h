// Plain C++ interface of the packed-GAE CUDA kernels (csrc/cuda/gae_kernel.cu).
//
// No torch types cross this boundary: the .cu file includes only CUDA headers and
// compiles with nvcc alone (`make cuda-check`), and csrc/cuda/gae_cuda.cpp does the
// validation and the torch.library registration.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fastrlhf {
namespace cuda {

enum class GaeDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Bytes of device scratch that packed_gae_launch needs for `total_tokens` tokens
// (one affine map and one carried state per tile of 2048 tokens; 0 for one tile).
size_t packed_gae_workspace_bytes(int64_t total_tokens);

// advantages[t], returns[t] (float32, [N]) for packed rewards/values ([N], dtype
// `dtype`), optional mask ([N] bool, nullptr = all tokens), cu_seqlens ([B+1] int32,
// assumed valid), optional bootstrap ([B] float32, nullptr = terminal). `workspace`
// holds packed_gae_workspace_bytes(N) bytes, 16-byte aligned. All pointers are device
// pointers; the work is enqueued on `stream`. Returns the launch error, if any.
cudaError_t packed_gae_launch(GaeDtype dtype, const void* rewards, const void* values,
                              const bool* mask, const int32_t* cu_seqlens, int64_t batch,
                              int64_t total_tokens, const float* bootstrap, float gamma,
                              float gamma_lam, float* advantages, float* returns, void* workspace,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace fastrlhf

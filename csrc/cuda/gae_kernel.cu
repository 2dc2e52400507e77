// CUDA kernels of fastrlhf::packed_gae: GAE over packed sequences as one reverse
// associative scan over the flat token array, parallel over tokens (so over
// sequences and within long ones alike). Accumulation is in float32.
//
// The recurrence (see csrc/gae_cpu.cpp) runs from right to left on the state
// s = (nv, a) = (next value, running advantage). Every token is an affine map of s:
//   unmasked t:  (nv, a) -> (v_t, (r_t - v_t) + gamma*nv + gamma*lam*a)
//   masked t:    identity (the state is carried across, the token gets 0)
// and the last token of sequence b first resets the state to R_b = (bootstrap[b], 0),
// a constant map. All of these are lower-triangular affine maps
//   (nv, a) -> (m11*nv + e1, m21*nv + m22*a + e2),
// a family closed under composition, and composition is associative; so the state
// to the right of every token is an exclusive reverse scan of the maps. Because each
// sequence's last token holds a constant map, the scan needs no segment flags: a
// sequence boundary simply forgets everything to its right.
//
// Reduce, then scan: for tiles of 2048 tokens,
//   1. tile_aggregate: the composed map of each tile;
//   2. tile_carry:     one block scans the tile maps -> the state entering each tile;
//   3. tile_scan:      each tile scans its threads' maps, then every thread runs the
//                      plain recurrence over its 8 tokens from its entering state.
// A single tile skips 1 and 2. Up to kFusedCarryTiles tiles (2M tokens) step 2 is
// folded into step 3: each tile composes the (L2-resident, 20-byte) maps of the tiles
// to its right itself, one launch fewer for O(tiles^2 / 2) small reads; past that the
// quadratic term would outgrow the inputs and the carry launch returns. The grid is 1-D over tiles (at most 2^20 tiles for
// 2^31 tokens), so no grid dimension limit is near.
//
// Includes only CUDA headers (no torch), so `nvcc -c` alone compiles it.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gae_cuda.h"

namespace fastrlhf {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;
constexpr int kTile = kThreads * kItems;  // tokens per block
constexpr int kCarryThreads = 1024;
// The tile kernels declare __launch_bounds__(kThreads, 1): with the default (no minimum
// of blocks) ptxas capped them at 32-48 registers and spilled 4-20 bytes
// (`make kernel-check`); allowed more, they take 40-56 with no spill, which still fits
// four 256-thread blocks per SM, plenty for a memory-bound scan.

// (nv, a) -> (m11*nv + e1, m21*nv + m22*a + e2)
struct Map {
  float m11, m21, m22, e1, e2;
};

struct State {
  float nv, a;
};

__device__ __forceinline__ Map identity_map() { return {1.f, 0.f, 1.f, 0.f, 0.f}; }

// g after f (f is applied first: it is the part to the right in time).
__device__ __forceinline__ Map compose(const Map& g, const Map& f) {
  Map h;
  h.m11 = g.m11 * f.m11;
  h.m21 = fmaf(g.m21, f.m11, g.m22 * f.m21);
  h.m22 = g.m22 * f.m22;
  h.e1 = fmaf(g.m11, f.e1, g.e1);
  h.e2 = fmaf(g.m21, f.e1, fmaf(g.m22, f.e2, g.e2));
  return h;
}

__device__ __forceinline__ State apply(const Map& f, const State& s) {
  return {fmaf(f.m11, s.nv, f.e1), fmaf(f.m21, s.nv, fmaf(f.m22, s.a, f.e2))};
}

__device__ __forceinline__ Map shfl_down(const Map& x, int d) {
  constexpr unsigned kAll = 0xffffffffu;
  return {__shfl_down_sync(kAll, x.m11, d), __shfl_down_sync(kAll, x.m21, d),
          __shfl_down_sync(kAll, x.m22, d), __shfl_down_sync(kAll, x.e1, d),
          __shfl_down_sync(kAll, x.e2, d)};
}

template <typename T>
__device__ __forceinline__ float load_float(const T* p, int64_t i);
template <>
__device__ __forceinline__ float load_float<float>(const float* p, int64_t i) {
  return __ldg(p + i);
}
template <>
__device__ __forceinline__ float load_float<double>(const double* p, int64_t i) {
  return static_cast<float>(__ldg(p + i));
}
template <>
__device__ __forceinline__ float load_float<__half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <>
__device__ __forceinline__ float load_float<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// For thread `threadIdx.x`: the composition of the maps of threads threadIdx.x+1 ..
// NT-1 (identity for the last one), i.e. everything to its right in the block.
// `.total` is the whole block's map. Every thread of the block must call it. Both come
// back by value: an out-pointer to a local put it on the stack (a 4-byte spill).
struct Suffix {
  Map exclusive, total;
};

template <int NT>
__device__ __forceinline__ Suffix block_exclusive_suffix(const Map& x) {
  constexpr int kWarps = NT / 32;
  __shared__ Map warp_total[kWarps];
  __shared__ Map warp_right[kWarps];  // composition of all warps to the right
  __shared__ Map block_total;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  Map inc = x;  // inclusive reverse scan within the warp: lanes lane..31
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const Map o = shfl_down(inc, d);
    if (lane + d < 32) inc = compose(inc, o);
  }
  Map exc = shfl_down(inc, 1);  // lanes lane+1..31
  if (lane == 31) exc = identity_map();
  if (lane == 0) warp_total[warp] = inc;
  __syncthreads();
  if (threadIdx.x == 0) {
    // at most 32 warps: a serial pass is cheaper than another shuffle round
    Map acc = identity_map();
    for (int w = kWarps - 1; w >= 0; --w) {
      warp_right[w] = acc;
      acc = compose(warp_total[w], acc);
    }
    block_total = acc;
  }
  __syncthreads();
  return {compose(exc, warp_right[warp]), block_total};
}

// A tile of tokens staged in shared memory (float32), loaded coalesced: thread i
// then reads its kItems consecutive tokens from here. Slot `skew(j)` holds token j:
// one pad word per 32 makes thread i's token i*kItems + k land in bank
// (8i + i/4 + k) mod 32, distinct across a warp, where unpadded rows of 8 floats
// would be an 8-way bank conflict on every read.
constexpr int kSkewed = kTile + kTile / 32;

__device__ __forceinline__ int skew(int j) { return j + (j >> 5); }

struct Tile {
  float r[kSkewed];
  float v[kSkewed];
  unsigned char m[kSkewed];
};

template <typename T>
__device__ __forceinline__ void load_tile(Tile& tile, const T* rewards, const T* values, const bool* mask,
                          int64_t start, int64_t total) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int local = i * kThreads + threadIdx.x;
    const int64_t g = start + local;
    if (g < total) {
      tile.r[skew(local)] = load_float(rewards, g);
      tile.v[skew(local)] = load_float(values, g);
      tile.m[skew(local)] = mask == nullptr ? 1 : static_cast<unsigned char>(mask[g]);
    }
  }
  __syncthreads();
}

// Index b of the sequence holding token t: the largest b with cu[b] <= t. Clamped to
// [0, batch), so malformed (unvalidated) cu_seqlens never read out of bounds.
__device__ __forceinline__ int64_t find_sequence(const int32_t* cu, int64_t batch, int64_t t) {
  int64_t lo = 0, hi = batch;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (__ldg(cu + mid) <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Walks the thread's tokens [first, first+count) right to left, keeping track of the
// sequence each one belongs to; calls step(k, is_last_of_sequence, b) per token.
template <typename Step>
__device__ __forceinline__ void walk_tokens(const int32_t* cu, int64_t batch, int64_t first,
                                            int count, Step step) {
  int64_t b = find_sequence(cu, batch, first + count - 1);
  int64_t seq_start = __ldg(cu + b);
  int64_t seq_end = __ldg(cu + b + 1);
  for (int k = count - 1; k >= 0; --k) {
    const int64_t t = first + k;
    while (t < seq_start && b > 0) {  // skips empty sequences too
      --b;
      seq_end = seq_start;
      seq_start = __ldg(cu + b);
    }
    step(k, t == seq_end - 1, b);
  }
}

struct Params {
  const bool* mask;
  const int32_t* cu;
  const float* bootstrap;
  int64_t batch;
  int64_t total;
  float gamma;
  float gamma_lam;
};

// The composed map of this thread's tokens (applied right to left).
__device__ __forceinline__ Map thread_map(const Tile& tile, const Params& p, int64_t tile_start, int count) {
  Map agg = identity_map();
  if (count <= 0) return agg;
  const int base = threadIdx.x * kItems;
  walk_tokens(p.cu, p.batch, tile_start + base, count, [&](int k, bool last, int64_t b) {
    if (last) agg = {0.f, 0.f, 0.f, p.bootstrap ? __ldg(p.bootstrap + b) : 0.f, 0.f};
    const int j = skew(base + k);
    if (tile.m[j]) {
      const float v = tile.v[j];
      // (0, gamma, gamma*lam, v, r - v) after agg
      agg = {0.f, fmaf(p.gamma, agg.m11, p.gamma_lam * agg.m21), p.gamma_lam * agg.m22, v,
             fmaf(p.gamma, agg.e1, fmaf(p.gamma_lam, agg.e2, tile.r[j] - v))};
    }
  });
  return agg;
}

__device__ __forceinline__ int thread_count(int64_t tile_start, int64_t total) {
  const int64_t first = tile_start + static_cast<int64_t>(threadIdx.x) * kItems;
  const int64_t left = total - first;
  return left <= 0 ? 0 : (left < kItems ? static_cast<int>(left) : kItems);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    tile_aggregate_kernel(const T* rewards, const T* values, Params p, Map* tile_maps) {
  __shared__ Tile tile;
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTile;
  load_tile(tile, rewards, values, p.mask, tile_start, p.total);
  const Map mine = thread_map(tile, p, tile_start, thread_count(tile_start, p.total));
  const Map total = block_exclusive_suffix<kThreads>(mine).total;
  if (threadIdx.x == 0) tile_maps[blockIdx.x] = total;
}

// One block: the state entering each tile from its right, carry[j] =
// (map_{j+1} o ... o map_{last})(0, 0). Each thread first composes a run of tiles.
__global__ void __launch_bounds__(kCarryThreads)
    tile_carry_kernel(const Map* tile_maps, int64_t num_tiles, State* carry) {
  const int64_t per = (num_tiles + kCarryThreads - 1) / kCarryThreads;
  const int64_t lo = threadIdx.x * per;
  const int64_t hi = lo + per < num_tiles ? lo + per : num_tiles;
  Map run = identity_map();
  for (int64_t j = hi - 1; j >= lo; --j) run = compose(tile_maps[j], run);
  const Map right = block_exclusive_suffix<kCarryThreads>(run).exclusive;
  State s = apply(right, State{0.f, 0.f});
  for (int64_t j = hi - 1; j >= lo; --j) {
    carry[j] = s;
    s = apply(tile_maps[j], s);
  }
}

// map_lo o ... o map_{hi-1} (map_{hi-1} applied first), by the whole block: thread t
// composes the t-th run of consecutive maps, the block composes the runs in order.
__device__ __forceinline__ Map tiles_composed(const Map* maps, int64_t lo, int64_t hi) {
  const int64_t per = (hi - lo + kThreads - 1) / kThreads;
  const int64_t first = lo + static_cast<int64_t>(threadIdx.x) * per;
  const int64_t last = first + per < hi ? first + per : hi;
  Map run = identity_map();
  for (int64_t i = last - 1; i >= first; --i) run = compose(maps[i], run);
  return block_exclusive_suffix<kThreads>(run).total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    tile_scan_kernel(const T* rewards, const T* values, Params p, const State* carry,
                     const Map* tile_maps, int64_t num_tiles, float* advantages,
                     float* returns) {
  __shared__ Tile tile;
  __shared__ float out[kSkewed];
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTile;
  load_tile(tile, rewards, values, p.mask, tile_start, p.total);
  const int count = thread_count(tile_start, p.total);
  const Map mine = thread_map(tile, p, tile_start, count);
  const Map right = block_exclusive_suffix<kThreads>(mine).exclusive;
  State entering{0.f, 0.f};  // a single tile: nothing to its right
  if (carry != nullptr) {
    entering = carry[blockIdx.x];
  } else if (tile_maps != nullptr) {  // uniform over the block: the barriers inside are safe
    entering = apply(tiles_composed(tile_maps, blockIdx.x + 1, num_tiles), State{0.f, 0.f});
  }
  State s = apply(right, entering);

  if (count > 0) {
    const int base = threadIdx.x * kItems;
    walk_tokens(p.cu, p.batch, tile_start + base, count, [&](int k, bool last, int64_t b) {
      if (last) s = {p.bootstrap ? __ldg(p.bootstrap + b) : 0.f, 0.f};
      float adv = 0.f;
      const int j = skew(base + k);
      if (tile.m[j]) {
        const float v = tile.v[j];
        adv = fmaf(p.gamma, s.nv, fmaf(p.gamma_lam, s.a, tile.r[j] - v));
        s = {v, adv};
      }
      out[j] = adv;
    });
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kItems; ++i) {  // coalesced stores
    const int local = i * kThreads + threadIdx.x;
    const int64_t g = tile_start + local;
    if (g < p.total) {
      advantages[g] = out[skew(local)];
      returns[g] = out[skew(local)] + tile.v[skew(local)];
    }
  }
}

constexpr int64_t kFusedCarryTiles = 1024;

int64_t num_tiles_for(int64_t total) { return (total + kTile - 1) / kTile; }

template <typename T>
cudaError_t launch(const T* rewards, const T* values, const Params& p, float* advantages,
                   float* returns, void* workspace, cudaStream_t stream) {
  const int64_t num_tiles = num_tiles_for(p.total);
  const State* carry = nullptr;
  const Map* maps = nullptr;
  if (num_tiles > 1) {
    Map* tile_maps = static_cast<Map*>(workspace);
    // State is 8 bytes: placed after the maps, rounded up to keep 8-byte alignment
    State* carry_w = reinterpret_cast<State*>(
        static_cast<char*>(workspace) + ((num_tiles * sizeof(Map) + 15) / 16) * 16);
    tile_aggregate_kernel<T><<<static_cast<unsigned>(num_tiles), kThreads, 0, stream>>>(
        rewards, values, p, tile_maps);
    maps = tile_maps;
    if (num_tiles > kFusedCarryTiles) {
      tile_carry_kernel<<<1, kCarryThreads, 0, stream>>>(tile_maps, num_tiles, carry_w);
      carry = carry_w;
    }
  }
  tile_scan_kernel<T><<<static_cast<unsigned>(num_tiles), kThreads, 0, stream>>>(
      rewards, values, p, carry, maps, num_tiles, advantages, returns);
  return cudaGetLastError();
}

}  // namespace

size_t packed_gae_workspace_bytes(int64_t total_tokens) {
  const int64_t num_tiles = num_tiles_for(total_tokens);
  if (num_tiles <= 1) return 0;
  return ((num_tiles * sizeof(Map) + 15) / 16) * 16 + num_tiles * sizeof(State);
}

cudaError_t packed_gae_launch(GaeDtype dtype, const void* rewards, const void* values,
                              const bool* mask, const int32_t* cu_seqlens, int64_t batch,
                              int64_t total_tokens, const float* bootstrap, float gamma,
                              float gamma_lam, float* advantages, float* returns, void* workspace,
                              cudaStream_t stream) {
  if (total_tokens <= 0 || batch <= 0) return cudaSuccess;
  const Params p{mask, cu_seqlens, bootstrap, batch, total_tokens, gamma, gamma_lam};
  switch (dtype) {
    case GaeDtype::kFloat32:
      return launch(static_cast<const float*>(rewards), static_cast<const float*>(values), p,
                    advantages, returns, workspace, stream);
    case GaeDtype::kFloat64:
      return launch(static_cast<const double*>(rewards), static_cast<const double*>(values), p,
                    advantages, returns, workspace, stream);
    case GaeDtype::kFloat16:
      return launch(static_cast<const __half*>(rewards), static_cast<const __half*>(values), p,
                    advantages, returns, workspace, stream);
    case GaeDtype::kBFloat16:
      return launch(static_cast<const __nv_bfloat16*>(rewards),
                    static_cast<const __nv_bfloat16*>(values), p, advantages, returns, workspace,
                    stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastrlhf

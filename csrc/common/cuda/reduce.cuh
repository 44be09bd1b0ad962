// Warp and block reductions of the CUDA kernels, written once. Every launch uses a multiple of 32 threads.
#pragma once

#include "common/host_device.h"

namespace deqkern {
namespace cuda {

constexpr unsigned kFullWarpMask = 0xffffffffu;

// The sum of v over the warp, in every lane (all 32 lanes must call it).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullWarpMask, v, offset);
  return v;
}

// The sums over the block of N values per thread, returned to every thread; every thread of the block must call it.
// scratch: shared memory for (blockDim.x / 32) * N values. The leading barrier lets the caller reuse scratch from
// one call to the next; the second publishes the warps' partial sums.
template <typename T, int N>
__device__ __forceinline__ void block_sum(T (&v)[N], T* scratch) {
  DEQKERN_DEVICE_ASSERT(blockDim.x % 32 == 0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = warp_sum(v[j]);
  __syncthreads();
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < N; ++j) scratch[warp * N + j] = v[j];
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) {
    T s = T(0);
    for (int w = 0; w < warps; ++w) s += scratch[w * N + j];
    v[j] = s;
  }
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  T values[1] = {v};
  block_sum<T, 1>(values, scratch);
  return values[0];
}

}  // namespace cuda
}  // namespace deqkern

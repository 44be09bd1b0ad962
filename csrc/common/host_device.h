// DEQKERN_HOST_DEVICE marks the functions that the CPU build and the CUDA build both compile: the per-sample
// contract, the Anderson weight solve, the activations. The CPU tests run exactly the code the CUDA kernels run.
#pragma once

#if defined(__CUDACC__)
#define DEQKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DEQKERN_HOST_DEVICE inline
#endif

// DEQKERN_DEVICE_ASSERT(cond): a device-side assert in DEQKERN_DEBUG=1 builds (setup.py), nothing otherwise. The
// kernels state their launch assumptions with it, so a debug build catches a launcher that breaks them.
#if defined(__CUDACC__) && defined(DEQKERN_DEBUG)
#include <cassert>
#define DEQKERN_DEVICE_ASSERT(cond) assert(cond)
#else
#define DEQKERN_DEVICE_ASSERT(cond) ((void)0)
#endif

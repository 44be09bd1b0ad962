// The dynamic shared memory of a launch, written once for every CUDA launcher.
//
// A block's shared memory is its dynamic bytes plus the kernel's static __shared__ arrays, and the sum must stay within
// the device's opt-in limit per block (232,448 bytes on sm_90); above 48 KB of dynamic memory the kernel must also opt
// in. A launcher that compared only its dynamic bytes with the limit would fail at launch for sizes within the kernel's
// static bytes of it, with an error that names no size.
#pragma once

#include <cstddef>

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace deqkern {
namespace cuda {

// The most dynamic shared memory `kernel` may be launched with on `device`: the opt-in limit less its static bytes.
template <typename Kernel>
size_t max_dynamic_shared_memory(Kernel kernel, int device) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return size_t(optin) > attributes.sharedSizeBytes ? size_t(optin) - attributes.sharedSizeBytes : size_t(0);
}

// Lets `kernel` be launched on `device` with up to max_dynamic_shared_memory bytes of dynamic shared memory (the opt-in
// is required above 48 KB). Always the maximum, never one launch's size: the attribute belongs to the kernel, shared by
// every host thread, so a thread setting its smaller size between another thread's call and launch would make that
// launch fail; every caller setting the same value cannot. (It caps the dynamic size only: occupancy follows each
// launch's own size.)
template <typename Kernel>
void allow_dynamic_shared_memory(Kernel kernel, int device) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      int(max_dynamic_shared_memory(kernel, device))));
}

}  // namespace cuda
}  // namespace deqkern

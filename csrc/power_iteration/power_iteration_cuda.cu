// CUDA kernel of power_iteration (schema: power_iteration.cpp, semantics: deqkern/reference/power_iteration.py). One launch for
// the whole iteration: one block per sample keeps v, z and J v in shared memory and iterates until its value
// settles or max_iter; W (m, n) is read from global memory (L2-resident across iterations and blocks). No host
// synchronisation and no allocation between iterations. Per iteration:
//   pass 1, a warp per row i:          y_i = s_i (W_i . v)   (coalesced along the row)
//   pass 2, a thread per column j:     gram: z_j = sum_i W_ij s_i y_i;  symmetric: z_j = (y_j + sum_i W_ij s_i v_i) / 2
//                                      + shift v_j           (coalesced across the threads of a row)
//   pass 3:                            v = z / ||z|| unless ||z|| = 0
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cmath>
#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/cuda/reduce.cuh"
#include "common/cuda/shared_memory.cuh"
#include "common/params.h"
#include "common/params_from_tensors.h"

namespace deqkern {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using cuda::block_sum;
using cuda::warp_sum;

// Shared memory, in elements of T: v (n), z (n), y (m), sv (m, symmetric: s_i v_i), red (kWarps).
template <typename T>
size_t power_smem_bytes(int m, int n) {
  return (2 * size_t(n) + 2 * size_t(m) + kWarps) * sizeof(T);
}

template <typename T, bool SYMMETRIC>
__global__ void __launch_bounds__(kThreads) power_iteration_kernel(const PowerIterationParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int m = int(p.m), n = int(p.n);
  DEQKERN_DEVICE_ASSERT(blockDim.x == kThreads);  // the rows are split between kWarps warps
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x;
  T* v = reinterpret_cast<T*>(smem_raw);
  T* z = v + n;
  T* y = z + n;  // gram: the coefficients s_i y_i; symmetric: y_i = (J v)_i
  T* sv = y + m;
  T* red = sv + m;
  const T* s = p.row_scale ? p.row_scale + b * m : nullptr;

  // v = u0 / ||u0|| (u0 itself when the norm is 0)
  T part = T(0);
  for (int j = tid; j < n; j += kThreads) {
    const T x = p.u0[b * n + j];
    v[j] = x;
    part += x * x;
  }
  const T norm0 = sqrt(block_sum(part, red));
  if (norm0 > T(0))
    for (int j = tid; j < n; j += kThreads) v[j] /= norm0;
  __syncthreads();

  T value = T(0), previous = T(0);
  int32_t k_done = 0;
  bool converged = false;
  for (int64_t k = 1; k <= p.max_iter; ++k) {
    // pass 1: a warp per row
    part = T(0);
    for (int i = warp; i < m; i += kWarps) {
      const T* w = p.W + int64_t(i) * n;
      T d = T(0);
      for (int j = lane; j < n; j += 32) d += __ldg(w + j) * v[j];
      d = warp_sum(d);
      if (lane == 0) {
        const T si = s ? __ldg(s + i) : T(1);
        const T yi = si * d;
        if constexpr (SYMMETRIC) {
          y[i] = yi;
          sv[i] = si * v[i];
          part += v[i] * yi;
        } else {
          y[i] = si * yi;
          part += yi * yi;
        }
      }
    }
    const T sum = block_sum(part, red);  // its barrier also publishes y and sv
    // pass 2: a thread per column
    part = T(0);
    const T* coef = SYMMETRIC ? sv : y;
    for (int j = tid; j < n; j += kThreads) {
      T acc = T(0);
      const T* w = p.W + j;
#pragma unroll 4
      for (int i = 0; i < m; ++i) acc += __ldg(w + int64_t(i) * n) * coef[i];
      if constexpr (SYMMETRIC) acc = T(0.5) * (y[j] + acc) + p.shift * v[j];
      z[j] = acc;
      part += acc * acc;
    }
    const T norm = sqrt(block_sum(part, red));  // its barrier also publishes z
    // pass 3
    if (norm > T(0)) {
      const T inv = T(1) / norm;
      for (int j = tid; j < n; j += kThreads) v[j] = z[j] * inv;
    }
    __syncthreads();
    // Every thread holds the same sums, so the decision below is uniform across the block.
    value = SYMMETRIC ? sum : sqrt(sum);
    k_done = int32_t(k);
    converged = k > 1 && fabs(value - previous) <= p.tol * fabs(value);
    if (converged || !isfinite(value)) break;
    previous = value;
  }

  for (int j = tid; j < n; j += kThreads) p.u[b * n + j] = v[j];
  if (tid == 0) {
    p.value[b] = value;
    p.iterations[b] = k_done;
    p.converged[b] = converged;
  }
}

template <typename T, bool SYMMETRIC>
void launch(const PowerIterationParams<T>& p, int64_t batch, int device) {
  auto kernel = power_iteration_kernel<T, SYMMETRIC>;
  const size_t smem = power_smem_bytes<T>(int(p.m), int(p.n));
  const size_t limit = cuda::max_dynamic_shared_memory(kernel, device);
  TORCH_CHECK(smem <= limit, "deqkern: W of shape (", p.m, ", ", p.n,
              ") is too large for the CUDA power iteration (needs ", smem, " bytes of shared memory per block, the "
              "device allows ", limit, "); use backend='triton'");
  TORCH_CHECK(batch <= int64_t(INT32_MAX), "deqkern: batch too large: ", batch);
  cuda::allow_dynamic_shared_memory(kernel, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  kernel<<<dim3(unsigned(batch)), dim3(kThreads), smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> power_iteration_cuda(
    const at::Tensor& W_in, const c10::optional<at::Tensor>& row_scale_in, const at::Tensor& u0_in,
    c10::string_view mode, double shift, int64_t max_iter, double tol) {
  const bool symmetric = is_symmetric_power_mode(mode);
  check_power_iteration_args(W_in, row_scale_in, u0_in, symmetric, shift, max_iter, tol);
  // Without the guard the kernel would launch on the current device rather than W's.
  const c10::cuda::CUDAGuard device_guard(W_in.device());
  // Inputs may have any strides (common/checks.h): the kernel reads contiguous rows.
  const at::Tensor W = W_in.contiguous(), u0 = u0_in.contiguous();
  const bool has_scale = row_scale_in.has_value() && row_scale_in->defined();
  const at::Tensor row_scale = has_scale ? row_scale_in->contiguous() : at::Tensor();
  const int64_t batch = u0.size(0);
  at::Tensor value = at::empty({batch}, W.options());
  at::Tensor u = at::empty({batch, W.size(1)}, W.options());
  at::Tensor iterations = at::empty({batch}, W.options().dtype(at::kInt));
  at::Tensor converged = at::empty({batch}, W.options().dtype(at::kBool));
  if (batch == 0) return {value, u, iterations, converged};
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "deqkern_power_iteration_cuda", [&] {
    using T = scalar_t;
    const auto p = power_iteration_params<T>(W, row_scale, u0, value, u, iterations, converged, W.size(0), W.size(1),
                                             symmetric, shift, max_iter, tol);
    if (symmetric) {
      launch<T, true>(p, batch, W.get_device());
    } else {
      launch<T, false>(p, batch, W.get_device());
    }
  });
  return {value, u, iterations, converged};
}

}  // namespace
}  // namespace deqkern

TORCH_LIBRARY_IMPL(deqkern, CUDA, m) { m.impl("power_iteration", &deqkern::power_iteration_cuda); }

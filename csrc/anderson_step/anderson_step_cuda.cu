// CUDA kernel of anderson_step (schema: anderson_step.cpp, semantics: deqkern/reference/anderson_step.py).
// One block per sample. Pass 1 (all threads, strided over n): store x and g = f(x) - x in history slot k % m and
// accumulate ||g||^2, ||f(x)||^2 and the m dot products <g, g_j> (the new row/column of H: O(m n)); a block
// reduction; thread 0 updates H and solves the weights in the accumulation type (float for half / float states;
// common/anderson_weights.h, the one Anderson weight solve of deqkern); pass 2 mixes
// x_next = sum_j a_j (x_j + beta g_j). Each thread re-reads only the slot elements it wrote itself.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cmath>

#include "common/anderson_weights.h"
#include "common/checks.h"
#include "common/cuda/reduce.cuh"
#include "common/params.h"
#include "common/params_from_tensors.h"
#include "common/stop_rule.h"

namespace deqkern {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxHistory = kAndersonMaxHistory;
constexpr int kSums = kMaxHistory + 2;  // <g, g_j> for every slot j, ||g||^2, ||f(x)||^2

template <typename T, typename A>
__device__ void copy_row(const T* src, int64_t stride, T* dst, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i * stride];
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) anderson_step_kernel(const AndersonStepParams<T, A> p) {
  __shared__ double scratch[(kThreads / 32) * kSums];
  __shared__ A coef[kMaxHistory];
  __shared__ AndersonWorkspace<A, kMaxHistory> workspace;
  __shared__ int state;  // bit 0: mix (else x_next = x), bit 1: fx is the best so far
  const int64_t b = blockIdx.x;
  const int64_t n = p.n, m = p.m;
  DEQKERN_DEVICE_ASSERT(blockDim.x == kThreads && m >= 1 && m <= kMaxHistory);  // scratch is sized for kThreads
  const int slot = static_cast<int>(p.k % m);
  const int nh = static_cast<int>(p.k + 1 < m ? p.k + 1 : m);
  const T* x = p.x + b * p.stride_x_b;
  const T* fx = p.fx + b * p.stride_f_b;
  T* x_next = p.x_next + b * n;
  if (!p.active[b]) {
    copy_row<T, A>(x, p.stride_x_n, x_next, n);
    return;
  }
  T* X = p.X + b * m * n;
  T* G = p.G + b * m * n;
  // Pass 1: acc[j] = <g, g_j> (j < nh; slot: ||g||^2 of the rounded g), acc[kMaxHistory] = ||g||^2,
  // acc[kMaxHistory + 1] = ||fx||^2, summed in float64 (stop_rule.h: no finite float32 state overflows them).
  double acc[kSums];
  for (int j = 0; j < kSums; ++j) acc[j] = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const T xv = x[i * p.stride_x_n], fv = fx[i * p.stride_f_n];
    const double fa = double(fv), ga = fa - double(xv);
    const T gs = T(A(fv) - A(xv));  // rounded as the reference's g = (fx - x) in the accumulation type
    X[slot * n + i] = xv;
    G[slot * n + i] = gs;
    acc[kMaxHistory] += ga * ga;
    acc[kMaxHistory + 1] += fa * fa;
    const double gr = double(gs);
    // Unrolled over the cap so that acc is indexed by constants and stays in registers (not local memory).
#pragma unroll
    for (int j = 0; j < kMaxHistory; ++j)
      if (j < nh) acc[j] += gr * (j == slot ? gr : double(G[j * n + i]));
  }
  cuda::block_sum<double, kSums>(acc, scratch);
  if (threadIdx.x == 0) {
    const A r = A(relative_residual(acc[kMaxHistory], acc[kMaxHistory + 1]));
    p.residual[b] = r;
    p.iterations[b] = static_cast<int32_t>(p.k + 1);
    const A best = p.residual_best[b];
    const bool better = isnan(best) || r < best;
    if (better) p.residual_best[b] = r;
    state = better ? 2 : 0;
    if (keeps_iterating(r, p.tol)) {
      A* H = p.H + b * m * m;
#pragma unroll
      for (int j = 0; j < kMaxHistory; ++j) {  // constant indices: acc stays in registers
        if (j < nh) {
          H[slot * m + j] = A(acc[j]);
          H[j * m + slot] = A(acc[j]);
        }
      }
      if (!anderson_weights<A, kMaxHistory>(H, static_cast<int>(m), nh, double(p.lam), coef, workspace))
        for (int i = 0; i < nh; ++i) coef[i] = i == slot ? A(1) : A(0);  // the plain damped step
      state |= 1;
    } else {
      p.active[b] = false;
    }
  }
  __syncthreads();
  if (state & 2) copy_row<T, A>(fx, p.stride_f_n, p.z_best + b * n, n);
  if (!(state & 1)) {
    copy_row<T, A>(x, p.stride_x_n, x_next, n);
    return;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    A s = 0;
    for (int j = 0; j < nh; ++j) s += coef[j] * (A(X[j * n + i]) + p.beta * A(G[j * n + i]));
    x_next[i] = T(s);
  }
}

void anderson_step_cuda(const at::Tensor& X_hist, const at::Tensor& G_hist, const at::Tensor& H, const at::Tensor& x,
                        const at::Tensor& fx, const at::Tensor& x_next, const at::Tensor& z_best,
                        const at::Tensor& residual_best, const at::Tensor& residual, const at::Tensor& active,
                        const at::Tensor& iterations, int64_t k, double beta, double lam, double tol) {
  check_anderson_step_args(X_hist, G_hist, H, x, fx, x_next, z_best, residual_best, residual, active, iterations, k,
                           beta, lam, tol);
  const int64_t B = X_hist.size(0);
  if (B == 0) return;
  // Otherwise the kernel launches on the current device, not the tensors' one.
  const c10::cuda::CUDAGuard device_guard(X_hist.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(X_hist.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X_hist.scalar_type(), "deqkern_anderson_step_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const auto p = anderson_step_params<T, A>(X_hist, G_hist, H, x, fx, x_next, z_best, residual_best, residual,
                                              active, iterations, k, beta, lam, tol);
    TORCH_CHECK(B <= int64_t(INT32_MAX), "deqkern.anderson_step: batch too large: ", B);
    anderson_step_kernel<T, A><<<dim3(unsigned(B)), dim3(kThreads), 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(deqkern, CUDA, m) { m.impl("anderson_step", &anderson_step_cuda); }

}  // namespace deqkern

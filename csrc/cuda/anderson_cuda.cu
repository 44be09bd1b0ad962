// CUDA kernel of anderson_step (schema in csrc/ops.cpp, semantics in deqkern/reference.py: anderson_step_ref).
// One block per sample. Pass 1 (all threads, strided over n): store x and g = f(x) - x in history slot k % m and
// accumulate ||g||^2, ||f(x)||^2 and the m dot products <g, g_j> (the new row/column of H: O(m n)); a block
// reduction in shared memory; thread 0 updates H, solves the small system (H + lam_eff I) w = 1 by Gauss-Jordan in
// the accumulation type (float for half / float states) and publishes a = w / sum w; pass 2 mixes
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

#include "solver_checks.h"

namespace deqkern {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxHistory = 32;         // MAX_HISTORY in deqkern/solvers.py
constexpr double kResidualEps = 1e-12;  // RESIDUAL_EPS in deqkern/reference.py

template <typename T, typename A>
struct StepParams {
  T* X;
  T* G;
  A* H;
  const T* x;
  const T* fx;
  T* x_next;
  T* z_best;
  A* residual_best;
  A* residual;
  bool* active;
  int32_t* iterations;
  int64_t n, m, k, stride_x_b, stride_x_n, stride_f_b, stride_f_n;
  A beta, lam, tol;
};

template <typename T, typename A>
__device__ void copy_row(const T* src, int64_t stride, T* dst, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i * stride];
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) anderson_step_kernel(StepParams<T, A> p) {
  __shared__ A partial[kMaxHistory + 2][kThreads / 32];
  __shared__ A coef[kMaxHistory];
  __shared__ int state;  // 0: stop (copy x), 1: mix
  const int64_t b = blockIdx.x;
  const int64_t n = p.n, m = p.m;
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
  // Pass 1: acc[j] = <g, g_j> (j < nh, slot: ||g||^2 of the rounded g), acc[m] = ||g||^2, acc[m + 1] = ||fx||^2.
  A acc[kMaxHistory + 2];
  for (int j = 0; j < kMaxHistory + 2; ++j) acc[j] = A(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const T xv = x[i * p.stride_x_n], fv = fx[i * p.stride_f_n];
    const A fa = A(fv), ga = fa - A(xv);
    const T gs = T(ga);
    X[slot * n + i] = xv;
    G[slot * n + i] = gs;
    acc[kMaxHistory] += ga * ga;
    acc[kMaxHistory + 1] += fa * fa;
    const A gr = A(gs);
#pragma unroll 4
    for (int j = 0; j < nh; ++j) acc[j] += gr * (j == slot ? gr : A(G[j * n + i]));
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int j = 0; j < kMaxHistory + 2; ++j) {
    if (j >= nh && j < kMaxHistory) continue;
    A v = acc[j];
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) partial[j][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    A sums[kMaxHistory + 2];
    for (int j = 0; j < kMaxHistory + 2; ++j) {
      sums[j] = A(0);
      if (j >= nh && j < kMaxHistory) continue;
      for (int w = 0; w < warps; ++w) sums[j] += partial[j][w];
    }
    const A r = sqrt(sums[kMaxHistory]) / (sqrt(sums[kMaxHistory + 1]) + A(kResidualEps));
    p.residual[b] = r;
    p.iterations[b] = static_cast<int32_t>(p.k + 1);
    const A best = p.residual_best[b];
    const bool better = isnan(best) || r < best;
    if (better) p.residual_best[b] = r;
    state = (better ? 2 : 0);
    if (r > p.tol && isfinite(r)) {
      A* H = p.H + b * m * m;
      for (int j = 0; j < nh; ++j) {
        H[slot * m + j] = sums[j];
        H[j * m + slot] = sums[j];
      }
      // (H + lam_eff I) w = 1, Gauss-Jordan without pivoting (SPD), a = w / sum w.
      A M[kMaxHistory][kMaxHistory], w[kMaxHistory];
      A trace = 0;
      for (int i = 0; i < nh; ++i) trace += H[i * m + i];
      const A reg = p.lam * trace / A(nh);
      for (int i = 0; i < nh; ++i) {
        for (int j = 0; j < nh; ++j) M[i][j] = H[i * m + j] + (i == j ? reg : A(0));
        w[i] = A(1);
      }
      bool ok = true;
      for (int q = 0; q < nh && ok; ++q) {
        const A pivot = M[q][q];
        ok = pivot > A(0);
        if (!ok) break;
        for (int r2 = 0; r2 < nh; ++r2) {
          if (r2 == q) continue;
          const A factor = M[r2][q] / pivot;
          for (int j = q; j < nh; ++j) M[r2][j] -= factor * M[q][j];
          w[r2] -= factor * w[q];
        }
      }
      A total = 0;
      if (ok) {
        for (int i = 0; i < nh; ++i) {
          w[i] /= M[i][i];
          total += w[i];
        }
        ok = isfinite(total) && total != A(0);
      }
      for (int i = 0; i < nh; ++i) {
        coef[i] = ok ? w[i] / total : A(0);
        ok = ok && isfinite(coef[i]);
      }
      if (!ok)
        for (int i = 0; i < nh; ++i) coef[i] = i == slot ? A(1) : A(0);
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
                           lam, kMaxHistory);
  const int64_t B = X_hist.size(0), m = X_hist.size(1), n = X_hist.size(2);
  if (B == 0) return;
  // Otherwise the kernel launches on the current device, not the tensors' one.
  const c10::cuda::CUDAGuard device_guard(X_hist.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(X_hist.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X_hist.scalar_type(), "deqkern_anderson_step_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    StepParams<T, A> p{};
    p.X = X_hist.data_ptr<T>();
    p.G = G_hist.data_ptr<T>();
    p.H = H.data_ptr<A>();
    p.x = x.data_ptr<T>();
    p.fx = fx.data_ptr<T>();
    p.x_next = x_next.data_ptr<T>();
    p.z_best = z_best.data_ptr<T>();
    p.residual_best = residual_best.data_ptr<A>();
    p.residual = residual.data_ptr<A>();
    p.active = active.data_ptr<bool>();
    p.iterations = iterations.data_ptr<int32_t>();
    p.n = n;
    p.m = m;
    p.k = k;
    p.stride_x_b = x.stride(0);
    p.stride_x_n = x.stride(1);
    p.stride_f_b = fx.stride(0);
    p.stride_f_n = fx.stride(1);
    p.beta = A(beta);
    p.lam = A(lam);
    p.tol = A(tol);
    anderson_step_kernel<T, A><<<dim3(unsigned(B)), dim3(kThreads), 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(deqkern, CUDA, m) { m.impl("anderson_step", &anderson_step_cuda); }

}  // namespace deqkern

// CUDA kernels of fixed_point_dense_anderson and its backward (schemas in csrc/ops.cpp, semantics in
// deqkern/reference.py: _anderson_ref). One persistent launch per solve, one block per batch row for the whole solve:
// the iterate and T(x) in shared memory, the row's history (x_i, g_i) in a global scratch allocated before the
// launch, its Gram matrix and weights in shared memory. Per step: the matrix-vector product (columns of M read
// coalesced), the epilogue, one new Gram row (n block reductions fused into one pass), the bordered solve by one
// thread in float64 (partial pivoting, as the reference's torch.linalg.solve_ex), and the mixing.
// A row whose inputs are not all finite (any entry of W, or of its c, z0 / z, grad_z) is never iterated.
// Compiles in CI; never run on a GPU yet.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include "activations.h"
#include "anderson_weights.h"
#include "solver_checks.h"

namespace deqkern {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHistory = 16;          // ANDERSON_MAX_M of deqkern/reference.py
constexpr double kResidualEps = 1e-12;  // RESIDUAL_EPS of deqkern/reference.py

template <typename T>
struct AndersonParams {
  const T* M;       // (d, d) read by columns: (x M)_i = sum_k M[k][i] x_k. Forward: W^T; adjoint: W.
  const T* Wt;      // (d, d) W^T, for s = act'(z W^T + c) (adjoint only)
  const T* c;       // (batch, d)
  const T* z;       // (batch, d) forward: z0; adjoint: the fixed point z
  const T* grad_z;  // (batch, d) adjoint only
  T* hist;          // (batch, 2, m, d): x_i then g_i
  T* out;
  int32_t* iterations;
  T* residual;
  bool* converged;
  int d, m;
  ActivationId act;
  T beta, tol;
  double lam;
  int64_t max_iter;
  bool adjoint;
};

// Sum over the block of up to kMaxHistory + 2 values per thread; every thread gets the sums. `scratch`: kWarps x N.
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N], double* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < N; ++j)
    for (int offset = 16; offset > 0; offset >>= 1) v[j] += __shfl_xor_sync(0xffffffffu, v[j], offset);
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < N; ++j) scratch[warp * N + j] = v[j];
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) {
    double s = 0;
    for (int w = 0; w < kWarps; ++w) s += scratch[w * N + j];
    v[j] = s;
  }
}

// Dynamic shared memory: x (d), t (d), s (d, adjoint) as T.
template <typename T>
__global__ void __launch_bounds__(kThreads) anderson_kernel(AndersonParams<T> p) {
  extern __shared__ unsigned char smem_raw[];
  T* x = reinterpret_cast<T*>(smem_raw);
  T* t = x + p.d;
  T* s = t + p.d;
  __shared__ double gram[kMaxHistory * kMaxHistory];
  __shared__ double weights[kMaxHistory];
  __shared__ double scratch[kWarps * (kMaxHistory + 2)];
  __shared__ int keep_going;
  const int64_t row = blockIdx.x;
  const int d = p.d, m = p.m, tid = threadIdx.x;
  const T* bias = (p.adjoint ? p.grad_z : p.c) + row * d;
  T* hx = p.hist + row * 2 * m * int64_t(d);
  T* hg = hx + m * int64_t(d);

  // Prologue: the start, s = act'(z W^T + c) in the adjoint, and the finiteness of this row's inputs and of W.
  double bad[1] = {0.0};
  for (int i = tid; i < d; i += kThreads) {
    const T zi = p.z[row * d + i], ci = p.c[row * d + i];
    bool finite = isfinite(zi) && isfinite(ci);
    if (p.adjoint) finite = finite && isfinite(p.grad_z[row * d + i]);
    if (!finite) bad[0] = 1.0;
    x[i] = p.adjoint ? T(0) : zi;
  }
  for (int64_t e = tid; e < int64_t(d) * d; e += kThreads)
    if (!isfinite(p.M[e])) bad[0] = 1.0;
  if (p.adjoint) {
    for (int i = tid; i < d; i += kThreads) {
      T u = p.c[row * d + i];
      for (int k = 0; k < d; ++k) u += p.z[row * d + k] * p.Wt[int64_t(k) * d + i];
      s[i] = activation_derivative(p.act, u);
    }
  }
  block_sum<1>(bad, scratch);
  T res = std::numeric_limits<T>::quiet_NaN();
  int64_t k = 0;
  if (bad[0] == 0.0) {
    for (k = 1; k <= p.max_iter; ++k) {
      const int slot = int((k - 1) % m);
      const int n = int(k < m ? k : m);
      // t = T(x); the new pair into the history; squared norms of g and t.
      double sums[kMaxHistory + 2] = {};
      for (int i = tid; i < d; i += kThreads) {
        T acc = 0;
        for (int kk = 0; kk < d; ++kk) acc += x[kk] * p.M[int64_t(kk) * d + i];
        const T ti = p.adjoint ? s[i] * (acc + bias[i]) : activation_forward(p.act, acc + bias[i]);
        const T gi = ti - x[i];
        t[i] = ti;
        hx[slot * int64_t(d) + i] = x[i];
        hg[slot * int64_t(d) + i] = gi;
        sums[kMaxHistory] += double(gi * gi);
        sums[kMaxHistory + 1] += double(ti * ti);
      }
      __syncthreads();  // x is read by every thread above before anyone overwrites it below
      // One new Gram row: <g_slot, g_j>, each thread over its own elements (written by itself above).
      for (int i = tid; i < d; i += kThreads) {
        const T gi = hg[slot * int64_t(d) + i];
        for (int j = 0; j < n; ++j) sums[j] += double(gi * hg[j * int64_t(d) + i]);
      }
      block_sum<kMaxHistory + 2>(sums, scratch);
      const T diff_sq = T(sums[kMaxHistory]), t_sq = T(sums[kMaxHistory + 1]);
      res = sqrt(diff_sq) / (sqrt(t_sq) + T(kResidualEps));
      if (tid == 0) {
        for (int j = 0; j < n; ++j) {
          const double v = j == slot ? double(diff_sq) : sums[j];
          gram[slot * m + j] = v;
          gram[j * m + slot] = v;
        }
        anderson_weights_bordered<kMaxHistory>(gram, m, n, slot, p.lam, weights);
        keep_going = res > p.tol && isfinite(res);
      }
      __syncthreads();
      for (int i = tid; i < d; i += kThreads) {
        T acc = 0;
        for (int j = 0; j < n; ++j) {
          const T w = T(weights[j]);
          acc += w * hx[j * int64_t(d) + i] + (w * p.beta) * hg[j * int64_t(d) + i];
        }
        x[i] = acc;
      }
      __syncthreads();
      if (!keep_going) break;
    }
    if (k > p.max_iter) k = p.max_iter;
  }
  for (int i = tid; i < d; i += kThreads) p.out[row * d + i] = x[i];
  if (tid == 0) {
    p.iterations[row] = int32_t(k);
    p.residual[row] = res;
    p.converged[row] = res <= p.tol;
  }
}

using SolveOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

SolveOutputs anderson_solve(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z, const at::Tensor& grad_z,
                            ActivationId act, bool adjoint, int64_t m, double beta, double lam, double tol,
                            int64_t max_iter) {
  const c10::cuda::CUDAGuard device_guard(W.device());  // otherwise the kernel launches on the current device
  const int64_t batch = c.size(0), d = W.size(0);
  TORCH_CHECK(d <= 1 << 20, "deqkern: d too large for the Anderson CUDA kernel: ", d);
  at::Tensor out = at::empty({batch, d}, W.options());
  at::Tensor iterations = at::empty({batch}, W.options().dtype(at::kInt));
  at::Tensor residual = at::empty({batch}, W.options());
  at::Tensor converged = at::empty({batch}, W.options().dtype(at::kBool));
  if (batch == 0) return {out, iterations, residual, converged};
  at::Tensor hist = at::empty({batch, 2, m, d}, W.options());
  const at::Tensor Wt = W.t().contiguous();
  auto run = [&](auto zero) {
    using T = decltype(zero);
    AndersonParams<T> p;
    p.M = adjoint ? W.const_data_ptr<T>() : Wt.const_data_ptr<T>();
    p.Wt = Wt.const_data_ptr<T>();
    p.c = c.const_data_ptr<T>();
    p.z = z.const_data_ptr<T>();
    p.grad_z = adjoint ? grad_z.const_data_ptr<T>() : nullptr;
    p.hist = hist.mutable_data_ptr<T>();
    p.out = out.mutable_data_ptr<T>();
    p.iterations = iterations.mutable_data_ptr<int32_t>();
    p.residual = residual.mutable_data_ptr<T>();
    p.converged = converged.mutable_data_ptr<bool>();
    p.d = int(d);
    p.m = int(m);
    p.act = act;
    p.beta = static_cast<T>(beta);
    p.tol = static_cast<T>(tol);
    p.lam = lam;
    p.max_iter = max_iter;
    p.adjoint = adjoint;
    const size_t smem = size_t(3) * d * sizeof(T);
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(anderson_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    anderson_kernel<T><<<dim3(unsigned(batch)), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (W.scalar_type() == at::kFloat) {
    run(float(0));
  } else {
    run(double(0));
  }
  return {out, iterations, residual, converged};
}

SolveOutputs fixed_point_dense_anderson_cuda(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z0,
                                             c10::string_view activation, int64_t m, double beta, double lam,
                                             double tol, int64_t max_iter) {
  check_anderson_options(m, beta, lam, kMaxHistory);
  check_dense_solve_args(W, {c, z0}, beta, tol, max_iter);
  const ActivationId act = parse_activation(std::string(activation));
  return anderson_solve(W, c, z0, at::Tensor(), act, /*adjoint=*/false, m, beta, lam, tol, max_iter);
}

SolveOutputs fixed_point_dense_anderson_backward_cuda(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z,
                                                      const at::Tensor& grad_z, c10::string_view activation,
                                                      int64_t m, double beta, double lam, double tol,
                                                      int64_t max_iter) {
  check_anderson_options(m, beta, lam, kMaxHistory);
  check_dense_solve_args(W, {c, z, grad_z}, beta, tol, max_iter);
  const ActivationId act = parse_activation(std::string(activation));
  return anderson_solve(W, c, z, grad_z, act, /*adjoint=*/true, m, beta, lam, tol, max_iter);
}

}  // namespace
}  // namespace deqkern

TORCH_LIBRARY_IMPL(deqkern, CUDA, m) {
  m.impl("fixed_point_dense_anderson", &deqkern::fixed_point_dense_anderson_cuda);
  m.impl("fixed_point_dense_anderson_backward", &deqkern::fixed_point_dense_anderson_backward_cuda);
}

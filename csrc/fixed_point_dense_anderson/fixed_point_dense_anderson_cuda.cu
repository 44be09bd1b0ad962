// CUDA kernels of fixed_point_dense_anderson and its backward (schemas: fixed_point_dense_anderson.cpp, semantics:
// deqkern/reference/fixed_point_dense_anderson.py; the per-sample contract: common/stop_rule.h). One persistent launch per solve, one block per batch row for the whole solve:
// the iterate (and s) in shared memory, the row's history (x_i, g_i) in a global scratch allocated before the
// launch, its Gram matrix and weights in shared memory. Per step: the matrix-vector product (columns of M read
// coalesced), the epilogue, one new Gram row (n block reductions fused into one pass), the weights by one thread in
// float64 (common/anderson_weights.h, the one Anderson weight solve of deqkern), and the mixing.
// A row whose inputs are not all finite (any entry of W, or of its c, z0 / z, grad_z) is never iterated.
// Compiles in CI; never run on a GPU yet.
#include <ATen/Dispatch.h>
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

#include "common/activations.h"
#include "common/anderson_weights.h"
#include "common/checks.h"
#include "common/cuda/reduce.cuh"
#include "common/cuda/shared_memory.cuh"
#include "common/params.h"
#include "common/params_from_tensors.h"
#include "common/stop_rule.h"

namespace deqkern {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHistory = kAndersonMaxHistory;

// The Anderson parameters plus the iteration matrix, read by columns: (x M)_i = sum_k M[k][i] x_k (forward: W^T;
// adjoint: W, and Wt = W^T for s = act'(z W^T + c)), and the history scratch.
template <typename T>
struct SolveParams : AndersonParams<T> {
  const T* M = nullptr;
  const T* Wt = nullptr;
  T* hist = nullptr;  // (batch, 2, m, d): x_i then g_i
  T* penalty_columns = nullptr;  // (batch, d) with a penalty: act'(u)^2 of each row (prepare_device_penalty)
};

using cuda::block_sum;

// Dynamic shared memory (anderson_smem_bytes): x (d), then s (d) in the adjoint, as T.
template <typename T>
size_t anderson_smem_bytes(int64_t d, bool adjoint) {
  return size_t(adjoint ? 2 : 1) * size_t(d) * sizeof(T);
}

// PENALTY: the adjoint with the Jacobian penalty (its own instantiation, so that the solve without one keeps its
// registers).
template <typename T, bool PENALTY>
__global__ void __launch_bounds__(kThreads) anderson_kernel(const SolveParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* x = reinterpret_cast<T*>(smem_raw);
  T* s = x + p.d;  // adjoint only
  __shared__ double gram[kMaxHistory * kMaxHistory];
  __shared__ double weights[kMaxHistory];
  __shared__ AndersonWorkspace<double, kMaxHistory> workspace;
  __shared__ double scratch[kWarps * (kMaxHistory + 2)];
  __shared__ int keep_going;
  const int64_t row = blockIdx.x;
  const int d = int(p.d), m = p.m, tid = threadIdx.x;
  DEQKERN_DEVICE_ASSERT(blockDim.x == kThreads && m >= 1 && m <= kMaxHistory);  // scratch is sized for kThreads
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
      if constexpr (!PENALTY) {
        s[i] = activation_derivative(p.activation, u);
      } else {  // p.out starts as the penalty's term; the epilogue adds the solve's result (same thread, same i)
        T second;
        s[i] = activation_derivatives(p.activation, u, second);
        p.out[row * d + i] = p.penalty_scale * s[i] * second * p.penalty_row_norms[i];
        p.penalty_columns[row * d + i] = s[i] * s[i];
      }
    }
  }
  block_sum<double, 1>(bad, scratch);
  T res = not_iterated_residual<T>();
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
        const T ti = p.adjoint ? s[i] * (acc + bias[i]) : activation_forward(p.activation, acc + bias[i]);
        const T gi = ti - x[i];
        hx[slot * int64_t(d) + i] = x[i];
        hg[slot * int64_t(d) + i] = gi;
        // The residual's squared norms in float64 (stop_rule.h): no finite float32 iterate overflows them.
        const double gd = double(ti) - double(x[i]);
        sums[kMaxHistory] += gd * gd;
        sums[kMaxHistory + 1] += double(ti) * double(ti);
      }
      __syncthreads();  // x is read by every thread above before anyone overwrites it below
      // One new Gram row: <g_slot, g_j>, each thread over its own elements (written by itself above).
      for (int i = tid; i < d; i += kThreads) {
        const T gi = hg[slot * int64_t(d) + i];
        // Unrolled over the cap so that sums is indexed by constants and stays in registers (not local memory).
#pragma unroll
        for (int j = 0; j < kMaxHistory; ++j)
          if (j < n) sums[j] += double(gi) * double(hg[j * int64_t(d) + i]);
      }
      block_sum<double, kMaxHistory + 2>(sums, scratch);
      res = T(relative_residual(sums[kMaxHistory], sums[kMaxHistory + 1]));
      if (tid == 0) {
#pragma unroll
        for (int j = 0; j < kMaxHistory; ++j) {  // <g_slot, g_j> of the stored g, as the reference's Gram matrix
          if (j < n) {
            gram[slot * m + j] = sums[j];
            gram[j * m + slot] = sums[j];
          }
        }
        if (!anderson_weights<double, kMaxHistory>(gram, m, n, p.lam, weights, workspace))
          for (int j = 0; j < n; ++j) weights[j] = j == slot ? 1.0 : 0.0;  // the plain mixed Picard step
        keep_going = keeps_iterating(res, p.tol);
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
  for (int i = tid; i < d; i += kThreads) p.out[row * d + i] = PENALTY ? x[i] + p.out[row * d + i] : x[i];
  if (tid == 0) {
    p.iterations[row] = int32_t(k);
    p.residual[row] = res;
    p.converged[row] = is_converged(res, p.tol);
  }
}

BackwardOutputs anderson_solve(const at::Tensor& W_in, const at::Tensor& c_in, const at::Tensor& z_in,
                               const at::Tensor& grad_z_in, ActivationId act, int64_t m, double beta, double lam,
                               double tol, int64_t max_iter, double jacobian_penalty) {
  const c10::cuda::CUDAGuard device_guard(W_in.device());  // otherwise the kernel launches on the current device
  DenseSolveTensors t(W_in, c_in, z_in, grad_z_in, jacobian_penalty);
  const int64_t batch = t.batch(), d = t.d();
  if (batch == 0) return t.backward_outputs();
  at::Tensor hist = at::empty({batch, 2, m, d}, t.W.options());
  const at::Tensor Wt = t.W.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(t.W.scalar_type(), "deqkern_fixed_point_dense_anderson_cuda", [&] {
    using T = scalar_t;
    SolveParams<T> p;
    t.fill(p, act, tol, max_iter);
    set_anderson_options(p, m, beta, lam);
    p.M = t.adjoint() ? t.W.const_data_ptr<T>() : Wt.const_data_ptr<T>();
    p.Wt = Wt.const_data_ptr<T>();
    p.hist = hist.mutable_data_ptr<T>();
    p.penalty_columns = t.prepare_device_penalty(p);
    auto kernel = p.penalty_columns != nullptr ? anderson_kernel<T, true> : anderson_kernel<T, false>;
    const size_t smem = anderson_smem_bytes<T>(d, t.adjoint());
    const size_t limit = cuda::max_dynamic_shared_memory(kernel, t.W.get_device());
    TORCH_CHECK(smem <= limit, "deqkern.fixed_point_dense_anderson: d = ", d, " is too large for the CUDA kernel "
                "(needs ", smem, " bytes of shared memory per block, the device allows ", limit, ")");
    cuda::allow_dynamic_shared_memory(kernel, t.W.get_device());
    TORCH_CHECK(batch <= int64_t(INT32_MAX), "deqkern.fixed_point_dense_anderson: batch too large: ", batch);
    kernel<<<dim3(unsigned(batch)), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  t.finish_penalty();
  return t.backward_outputs();
}

SolveOutputs fixed_point_dense_anderson_cuda(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z0,
                                             c10::string_view activation, int64_t m, double beta, double lam,
                                             double tol, int64_t max_iter) {
  check_dense_solve_args("fixed_point_dense_anderson", W, {c, z0}, tol, max_iter);
  check_anderson_options("fixed_point_dense_anderson", m, beta, lam);
  const ActivationId act = parse_activation(std::string(activation));
  return forward_outputs(solve_in_accumulation_dtype(W, c, z0, at::Tensor(), [&](const auto&... wide) {
    return anderson_solve(wide..., act, m, beta, lam, tol, max_iter, 0.0);
  }));
}

BackwardOutputs fixed_point_dense_anderson_backward_cuda(const at::Tensor& W, const at::Tensor& c,
                                                         const at::Tensor& z, const at::Tensor& grad_z,
                                                         c10::string_view activation, int64_t m, double beta,
                                                         double lam, double tol, int64_t max_iter,
                                                         double jacobian_penalty) {
  check_dense_solve_args("fixed_point_dense_anderson_backward", W, {c, z, grad_z}, tol, max_iter);
  check_anderson_options("fixed_point_dense_anderson_backward", m, beta, lam);
  check_jacobian_penalty("fixed_point_dense_anderson_backward", jacobian_penalty);
  const ActivationId act = parse_activation(std::string(activation));
  return solve_in_accumulation_dtype(W, c, z, grad_z, [&](const auto&... wide) {
    return anderson_solve(wide..., act, m, beta, lam, tol, max_iter, jacobian_penalty);
  });
}

}  // namespace
}  // namespace deqkern

TORCH_LIBRARY_IMPL(deqkern, CUDA, m) {
  m.impl("fixed_point_dense_anderson", &deqkern::fixed_point_dense_anderson_cuda);
  m.impl("fixed_point_dense_anderson_backward", &deqkern::fixed_point_dense_anderson_backward_cuda);
}

// CUDA kernels of fixed_point_dense and fixed_point_dense_backward (schemas: fixed_point_dense.cpp, semantics:
// deqkern/reference/fixed_point_dense.py; the per-sample contract: common/stop_rule.h). One persistent launch per solve: each block owns a tile of batch rows for the whole
// solve, keeps its iterate in shared memory and stops when all of its rows have stopped; no host
// synchronisation and no allocation between iterations. A row whose inputs are not all finite (any entry of
// W, or of the row's c, z0 / z, grad_z) is flagged by its block in the prologue and never iterated.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>

#include "common/activations.h"
#include "common/checks.h"
#include "common/cuda/reduce.cuh"
#include "common/cuda/shared_memory.cuh"
#include "common/params.h"
#include "common/params_from_tensors.h"
#include "common/stop_rule.h"

namespace deqkern {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kTileRows = 4;  // batch rows per block; 1 when such a tile does not fit in shared memory

// Forward: x <- act(x W^T + c). Adjoint (backward): h <- s * (h W + grad_z), s = act'(z W^T + c).
enum class Mode { Forward, Adjoint };

// The Picard parameters plus the iteration matrix, read by columns: (x M)_i = sum_k M[k][i] x_k. Forward: M = W^T;
// adjoint: M = W, and Wt = W^T for s = act'(z W^T + c).
template <typename T>
struct SolveParams : PicardParams<T> {
  const T* M = nullptr;
  const T* Wt = nullptr;
  // (batch, d), zeros, with a penalty: a tile's sums of act'(u)^2 over its rows, in the row of its first batch row
  T* penalty_columns = nullptr;
};

template <bool FROM_SMEM, typename T>
__device__ __forceinline__ T load_matrix(const T* p) {
  if constexpr (FROM_SMEM) {
    return *p;
  } else {
    return __ldg(p);
  }
}

// acc[r] = sum_k M[k][i] xs[k][r] for the ROWS rows of a tile; M_col = M + i. Consecutive threads take
// consecutive i, so M is read coalesced (global) or conflict-free (shared), and xs[k][.] is a broadcast.
template <bool FROM_SMEM, int ROWS, typename T>
__device__ __forceinline__ void column_matvec(const T* M_col, const T* xs, int d, T (&acc)[ROWS]) {
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = T(0);
#pragma unroll 4
  for (int k = 0; k < d; ++k) {
    const T w = load_matrix<FROM_SMEM>(M_col);
    M_col += d;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] += w * xs[k * ROWS + r];
  }
}

using cuda::kFullWarpMask;
using cuda::warp_sum;

// Dynamic shared memory, in elements of T: [x, x_next (ROWS*d each, laid out [i][r])] [s (ROWS*d) if adjoint]
// [M (d*d) if W_SMEM], then ints: [active (ROWS)] [any_active (1)]. The tiles come first so that x[k][0..ROWS) stays
// 16-byte aligned (vector loads). The per-warp residual sums are a static array of doubles (stop_rule.h).
template <typename T, Mode MODE, int ROWS>
size_t tile_smem_bytes(int d) {
  const size_t tiles = MODE == Mode::Adjoint ? 3 : 2;
  return tiles * ROWS * d * sizeof(T) + (ROWS + 1) * sizeof(int);
}

// One block per tile of ROWS batch rows, blockDim.x a multiple of 32 (at most kMaxThreads). Thread tid owns
// the outputs i = tid, tid + blockDim.x, ... of every row of the tile, in the prologue and in every iteration.
template <typename T, Mode MODE, int ROWS, bool W_SMEM>
__global__ void __launch_bounds__(kMaxThreads) dense_solve_kernel(const SolveParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int d = int(p.d);
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nwarps = nthreads >> 5;
  const int64_t row0 = int64_t(blockIdx.x) * ROWS;
  const int rows = int(min(int64_t(ROWS), p.batch - row0));  // valid rows of this tile, >= 1
  DEQKERN_DEVICE_ASSERT(rows >= 1 && nthreads % 32 == 0 && nthreads <= kMaxThreads);

  T* x = reinterpret_cast<T*>(smem_raw);
  T* x_next = x + ROWS * d;
  T* s = x_next + ROWS * d;  // adjoint only
  T* M_smem = s + (MODE == Mode::Adjoint ? ROWS * d : 0);
  // ||t - x||^2 and ||t||^2 per warp and row, summed in float64 so that no finite float32 iterate overflows them.
  __shared__ double warp_sums[kMaxWarps * 2 * ROWS];
  int* active = reinterpret_cast<int*>(M_smem + (W_SMEM ? int64_t(d) * d : 0));
  int* any_active = active + ROWS;
  const T* M = p.M;
  // Non-finite inputs. Bit r of `bad`: this thread saw one in row r of the tile; every bit: it saw one in its
  // strided share of M (M is W or W^T, so the block covers all of W).
  unsigned bad = 0u;
  bool w_bad = false;
  if constexpr (W_SMEM) {
    for (int64_t e = tid; e < int64_t(d) * d; e += nthreads) {
      const T w = __ldg(p.M + e);
      w_bad |= !isfinite(w);
      M_smem[e] = w;
    }
    M = M_smem;  // visible to all threads after the barriers below
  } else {
    for (int64_t e = tid; e < int64_t(d) * d; e += nthreads) w_bad |= !isfinite(__ldg(p.M + e));
  }
  if (w_bad) bad = (1u << ROWS) - 1u;

  // Prologue. Rows past the batch are zero and never active. Forward: x = z0. Adjoint: x = 0, and z goes
  // to x_next for one matvec s = act'(z W^T + c). The row's c (and grad_z) are read here for the check only.
  for (int e = tid; e < ROWS * d; e += nthreads) {
    const int r = e / d;
    const int i = e - r * d;
    T v = T(0);
    if (r < rows) {
      const int64_t g = (row0 + r) * d + i;
      v = p.z[g];
      bool finite = isfinite(v) && isfinite(__ldg(p.c + g));
      if constexpr (MODE == Mode::Adjoint) finite = finite && isfinite(__ldg(p.grad_z + g));
      if (!finite) bad |= 1u << r;
    }
    if constexpr (MODE == Mode::Forward) {
      x[i * ROWS + r] = v;
    } else {
      x[i * ROWS + r] = T(0);
      x_next[i * ROWS + r] = v;
    }
  }
  // Block-wide row flags, the same in every thread. These barriers also publish x, x_next and M_smem.
  unsigned valid = 0u;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (!__syncthreads_or(int((bad >> r) & 1u)) && r < rows) valid |= 1u << r;
  }
  if (tid < ROWS) active[tid] = int((valid >> tid) & 1u);
  __syncthreads();
  // A tile without a valid row neither computes s nor iterates (uniform: `valid` is the same in every thread), unless
  // the Jacobian penalty needs s (its terms enter every row, as the reference's).
  // int32 (max_iter <= 2^31 - 1 is checked on the host): a 64-bit bound was spilled around the division slow path.
  const int32_t max_iter = valid != 0u ? int32_t(p.max_iter) : 0;
  const bool penalty = p.penalty_row_norms != nullptr;
  if constexpr (MODE == Mode::Adjoint) {
    if (valid != 0u || penalty) {
      for (int i = tid; i < d; i += nthreads) {
        T acc[ROWS];
        column_matvec<false>(p.Wt + i, x_next, d, acc);
        T column = T(0);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (r >= rows) {
            s[i * ROWS + r] = T(0);
          } else if (!penalty) {
            s[i * ROWS + r] = activation_derivative(p.activation, acc[r] + p.c[(row0 + r) * d + i]);
          } else {  // p.out starts as the penalty's term; the epilogue adds the solve's result
            T second;
            const T si = activation_derivatives(p.activation, acc[r] + p.c[(row0 + r) * d + i], second);
            s[i * ROWS + r] = si;
            p.out[(row0 + r) * d + i] = p.penalty_scale * si * second * p.penalty_row_norms[i];
            column += si * si;
          }
        }
        if (penalty) p.penalty_columns[row0 * d + i] = column;
      }
      __syncthreads();  // the first iteration overwrites x_next, which still holds z
    }
  }

  // The decider of row r is thread r (warp 0); it keeps the row's residual and iteration count: NaN and 0
  // until the row's first iteration, so for good in a row that is never iterated.
  T res = not_iterated_residual<T>();
  int32_t iters = 0;
  for (int32_t done = 0; done < max_iter; ++done) {  // `done` never overflows, even at max_iter = 2^31 - 1
    const int32_t k = done + 1;
    // Phase 1: t = T(x) for my outputs, x_next = damped update (frozen rows copy x), partial sums.
    bool row_active[ROWS];
    double sq_diff[ROWS];
    double sq_t[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      row_active[r] = active[r] != 0;
      sq_diff[r] = 0.0;
      sq_t[r] = 0.0;
    }
    for (int i = tid; i < d; i += nthreads) {
      T acc[ROWS];
      column_matvec<W_SMEM>(M + i, x, d, acc);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const T x_old = x[i * ROWS + r];
        T x_new = x_old;
        if (row_active[r]) {
          const int64_t g = (row0 + r) * d + i;
          T t;
          if constexpr (MODE == Mode::Forward) {
            t = activation_forward(p.activation, acc[r] + __ldg(p.c + g));
          } else {
            t = s[i * ROWS + r] * (acc[r] + __ldg(p.grad_z + g));
          }
          const double diff = double(t) - double(x_old);
          sq_diff[r] += diff * diff;
          sq_t[r] += double(t) * double(t);
          x_new = p.one_minus_alpha * x_old + p.alpha * t;
        }
        x_next[i * ROWS + r] = x_new;
      }
    }
    // Phase 2: block sums of ||t - x||^2 and ||t||^2 per row.
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const double a = warp_sum(sq_diff[r]);
      const double b = warp_sum(sq_t[r]);
      if (lane == 0) {
        warp_sums[(warp * ROWS + r) * 2] = a;
        warp_sums[(warp * ROWS + r) * 2 + 1] = b;
      }
    }
    __syncthreads();  // (1) x_next and warp_sums complete; every read of x, active, any_active done
    // Phase 3: the deciders record the residual and stop their row if it converged or is not finite.
    if (warp == 0) {
      bool keep_going = false;
      if (lane < ROWS && active[lane]) {
        double a = 0.0, b = 0.0;
        for (int w = 0; w < nwarps; ++w) {
          a += warp_sums[(w * ROWS + lane) * 2];
          b += warp_sums[(w * ROWS + lane) * 2 + 1];
        }
        res = T(relative_residual(a, b));
        iters = int32_t(k);
        keep_going = keeps_iterating(res, p.tol);
        active[lane] = keep_going;
      }
      const bool any = __any_sync(kFullWarpMask, keep_going);
      if (lane == 0) *any_active = any;
    }
    __syncthreads();  // (2) active, any_active written; warp_sums read
    T* const tmp = x;
    x = x_next;
    x_next = tmp;
    if (!*any_active) break;  // uniform: read after (2), next written after (1) of the next iteration
  }

  for (int e = tid; e < rows * d; e += nthreads) {
    const int r = e / d;
    const int i = e - r * d;
    const int64_t g = (row0 + r) * d + i;
    // The penalty's term was written by another thread of this block, before the barriers of the solve.
    p.out[g] = penalty ? x[i * ROWS + r] + p.out[g] : x[i * ROWS + r];
  }
  if (tid < rows) {
    p.iterations[row0 + tid] = iters;
    p.residual[row0 + tid] = res;
    p.converged[row0 + tid] = is_converged(res, p.tol);
  }
}

template <typename T, Mode MODE, int ROWS, bool W_SMEM>
void launch_kernel(const SolveParams<T>& p, size_t smem, cudaStream_t stream, int device) {
  auto kernel = dense_solve_kernel<T, MODE, ROWS, W_SMEM>;
  cuda::allow_dynamic_shared_memory(kernel, device);
  const int64_t blocks = (p.batch + ROWS - 1) / ROWS;
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "deqkern: batch too large: ", p.batch);
  const int threads = int(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (p.d + 31) / 32 * 32)));
  kernel<<<dim3(unsigned(blocks)), dim3(threads), smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the tile height and whether M fits in shared memory next to the tile, each variant against what it may use
// (the device's opt-in limit less its static shared memory).
template <typename T, Mode MODE>
void launch_dense_solve(const SolveParams<T>& p, int device) {
  const int d = int(p.d);
  const size_t w_bytes = size_t(d) * d * sizeof(T);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const size_t tile = tile_smem_bytes<T, MODE, kTileRows>(d);
  if (tile + w_bytes <= cuda::max_dynamic_shared_memory(dense_solve_kernel<T, MODE, kTileRows, true>, device)) {
    launch_kernel<T, MODE, kTileRows, true>(p, tile + w_bytes, stream, device);
  } else if (tile <= cuda::max_dynamic_shared_memory(dense_solve_kernel<T, MODE, kTileRows, false>, device)) {
    launch_kernel<T, MODE, kTileRows, false>(p, tile, stream, device);
  } else {
    const size_t row = tile_smem_bytes<T, MODE, 1>(d);
    const size_t limit = cuda::max_dynamic_shared_memory(dense_solve_kernel<T, MODE, 1, false>, device);
    TORCH_CHECK(row <= limit, "deqkern: d = ", p.d, " is too large for the CUDA dense solver (needs ", row,
                " bytes of shared memory per block, the device allows ", limit, "); use backend='triton'");
    launch_kernel<T, MODE, 1, false>(p, row, stream, device);
  }
}

// z is z0 (forward) or the fixed point (adjoint); grad_z is undefined in the forward.
template <Mode MODE>
BackwardOutputs dense_solve(const at::Tensor& W_in, const at::Tensor& c_in, const at::Tensor& z_in,
                            const at::Tensor& grad_z_in, ActivationId act, double alpha, double tol, int64_t max_iter,
                            double jacobian_penalty) {
  // Without the guard the kernel would launch on the current device rather than W's.
  const c10::cuda::CUDAGuard device_guard(W_in.device());
  DenseSolveTensors t(W_in, c_in, z_in, grad_z_in, jacobian_penalty);
  TORCH_CHECK(t.d() <= int64_t(INT32_MAX), "deqkern.fixed_point_dense: d too large: ", t.d());
  if (t.batch() == 0) return t.backward_outputs();
  // Both modes read their iteration matrix by columns (coalesced): the forward needs W^T, the adjoint W
  // itself plus W^T once for s.
  const at::Tensor Wt = t.W.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(t.W.scalar_type(), "deqkern_fixed_point_dense_cuda", [&] {
    using T = scalar_t;
    SolveParams<T> p;
    t.fill(p, act, tol, max_iter);
    set_picard_options(p, alpha);
    p.M = MODE == Mode::Forward ? Wt.const_data_ptr<T>() : t.W.const_data_ptr<T>();
    p.Wt = Wt.const_data_ptr<T>();
    p.penalty_columns = t.prepare_device_penalty(p);
    launch_dense_solve<T, MODE>(p, t.W.get_device());
  });
  t.finish_penalty();
  return t.backward_outputs();
}

SolveOutputs fixed_point_dense_cuda(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z0,
                                    c10::string_view activation, double alpha, double tol, int64_t max_iter) {
  check_dense_solve_args("fixed_point_dense", W, {c, z0}, tol, max_iter);
  check_picard_options("fixed_point_dense", alpha);
  const ActivationId act = parse_activation(std::string(activation));
  return forward_outputs(solve_in_accumulation_dtype(W, c, z0, at::Tensor(), [&](const auto&... wide) {
    return dense_solve<Mode::Forward>(wide..., act, alpha, tol, max_iter, 0.0);
  }));
}

BackwardOutputs fixed_point_dense_backward_cuda(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z,
                                                const at::Tensor& grad_z, c10::string_view activation, double alpha,
                                                double tol, int64_t max_iter, double jacobian_penalty) {
  check_dense_solve_args("fixed_point_dense_backward", W, {c, z, grad_z}, tol, max_iter);
  check_picard_options("fixed_point_dense_backward", alpha);
  check_jacobian_penalty("fixed_point_dense_backward", jacobian_penalty);
  const ActivationId act = parse_activation(std::string(activation));
  return solve_in_accumulation_dtype(W, c, z, grad_z, [&](const auto&... wide) {
    return dense_solve<Mode::Adjoint>(wide..., act, alpha, tol, max_iter, jacobian_penalty);
  });
}

}  // namespace
}  // namespace deqkern

TORCH_LIBRARY_IMPL(deqkern, CUDA, m) {
  m.impl("fixed_point_dense", &deqkern::fixed_point_dense_cuda);
  m.impl("fixed_point_dense_backward", &deqkern::fixed_point_dense_backward_cuda);
}

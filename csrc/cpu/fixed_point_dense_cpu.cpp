// CPU kernels of fixed_point_dense and fixed_point_dense_backward: the whole solve in one call.
//
// Batch rows are split once between threads (at::parallel_for); each thread then runs the complete
// iteration for its rows with no synchronisation at all. Per iteration a thread multiplies its still
// active rows by the packed matrix with a register-blocked micro-kernel (GCC vector extensions), then one
// fused pass per row applies the epilogue (activation or adjoint scaling), the residual norms and the damped
// update. Stopped rows leave the active list, so converged samples cost nothing. The micro-kernel and the
// epilogue are compiled for AVX-512, AVX2+FMA and the baseline ISA, each with its own tile shape, and
// picked at run time. All buffers are allocated in one piece before the first iteration.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

#include "activations.h"
#include "dense_kernels.h"
#include "solver_checks.h"

namespace deqkern {
namespace {

using namespace cpu;

constexpr int kMaxRowInputs = 3;  // forward: c, z0; adjoint: grad_z, z, c

// Everything one thread needs to solve rows [row_begin, row_end). Scratch matrices are row-major with
// leading dimension `ld`.
template <typename T>
struct ChunkArgs {
  const T* packed;   // (d, ld): y = x @ packed, i.e. packed = W^T (forward) or W (adjoint)
  const T* x0;       // (B, d): the start; null: zeros
  const T* bias;     // (B, d): c (forward) or grad_z (adjoint)
  const T* scale;    // (B, d): act'(u) (adjoint only)
  T* x;              // (B, ld): scratch, the iterate
  T* y;              // (B, ld): scratch for x @ packed
  int64_t* active;   // (B,): scratch list of active rows
  T* z_out;          // (B, d)
  int32_t* iterations;
  T* residual;
  bool* converged;
  const T* inputs[kMaxRowInputs];  // (B, d) each: a sample is solved only if its rows of these are finite
  int n_inputs;
  bool matrix_finite;
  int64_t d, ld, row_begin, row_end, max_iter;
  T alpha, tol;
  ActivationId activation;
  bool adjoint;
};

// Epilogue of one row: t = T(x) into y, then the residual norms and x <- (1 - alpha) x + alpha t.
// Returns ||t - x|| / (||t|| + eps).
template <typename T, typename TILE>
DEQKERN_ALWAYS_INLINE T update_row(const ChunkArgs<T>& a, int64_t row) {
  T* x = a.x + row * a.ld;
  T* t = a.y + row * a.ld;
  const T* bias = a.bias + row * a.d;
  if (a.adjoint) {
    const T* s = a.scale + row * a.d;
    for (int64_t i = 0; i < a.d; ++i) t[i] = s[i] * (t[i] + bias[i]);
  } else {
    apply_activation(a.activation, t, bias, a.d);
  }
  // Vector partial sums let the reduction vectorise without reassociation flags.
  using V = typename VecOf<T, TILE::kBytes>::type;
  constexpr int64_t L = TILE::kBytes / sizeof(T);
  V diff_v{}, t_v{};
  int64_t i = 0;
  for (; i + L <= a.d; i += L) {
    const V tv = *reinterpret_cast<const V*>(t + i);
    const V dv = tv - *reinterpret_cast<const V*>(x + i);
    diff_v += dv * dv;
    t_v += tv * tv;
  }
  T diff_sq = horizontal_sum<T, TILE::kBytes>(diff_v), t_sq = horizontal_sum<T, TILE::kBytes>(t_v);
  for (; i < a.d; ++i) {
    diff_sq += (t[i] - x[i]) * (t[i] - x[i]);
    t_sq += t[i] * t[i];
  }
  if (a.alpha == T(1)) {
    for (i = 0; i < a.d; ++i) x[i] = t[i];
  } else {
    T keep = T(1) - a.alpha;
    for (i = 0; i < a.d; ++i) x[i] = keep * x[i] + a.alpha * t[i];
  }
  return std::sqrt(diff_sq) / (std::sqrt(t_sq) + T(kResidualEps));
}

template <typename T, typename TILE>
DEQKERN_ALWAYS_INLINE void solve_chunk(const ChunkArgs<T>& a) {
  // The chunk's rows of the iterate: x0 with zero padding. Samples with a non-finite input are never
  // iterated (reference.py): iterations 0, residual NaN.
  int64_t* active = a.active + a.row_begin;
  int64_t n_active = 0;
  for (int64_t row = a.row_begin; row < a.row_end; ++row) {
    T* x = a.x + row * a.ld;
    if (a.x0 != nullptr) {
      std::memcpy(x, a.x0 + row * a.d, a.d * sizeof(T));
      std::memset(x + a.d, 0, (a.ld - a.d) * sizeof(T));
    } else {
      std::memset(x, 0, a.ld * sizeof(T));
    }
    bool valid = a.matrix_finite;
    for (int j = 0; j < a.n_inputs && valid; ++j) valid = all_finite(a.inputs[j] + row * a.d, a.d);
    a.iterations[row] = 0;
    a.residual[row] = std::numeric_limits<T>::quiet_NaN();
    if (valid) active[n_active++] = row;
  }
  for (int64_t k = 1; k <= a.max_iter && n_active > 0; ++k) {
    multiply_active_rows<T, TILE>(a, active, n_active);
    int64_t still_active = 0;
    for (int64_t i = 0; i < n_active; ++i) {
      const int64_t row = active[i];
      const T r = update_row<T, TILE>(a, row);
      a.iterations[row] = static_cast<int32_t>(k);
      a.residual[row] = r;
      if (r > a.tol && std::isfinite(r)) active[still_active++] = row;  // NaN compares false: stops
    }
    n_active = still_active;
  }
  for (int64_t row = a.row_begin; row < a.row_end; ++row) {
    std::memcpy(a.z_out + row * a.d, a.x + row * a.ld, a.d * sizeof(T));
    a.converged[row] = a.residual[row] <= a.tol;
  }
}

#ifdef DEQKERN_X86_DISPATCH
template <typename T>
DEQKERN_TARGET_AVX512 void solve_chunk_avx512(const ChunkArgs<T>& a) { solve_chunk<T, TileAvx512>(a); }
template <typename T>
DEQKERN_TARGET_AVX2 void solve_chunk_avx2(const ChunkArgs<T>& a) { solve_chunk<T, TileAvx2>(a); }
#endif

// The widest instruction set this CPU has, asked once.
template <typename T>
void solve_chunk_dispatch(const ChunkArgs<T>& a) {
#ifdef DEQKERN_X86_DISPATCH
  const int isa = cpu_isa();
  if (isa == 2) return solve_chunk_avx512(a);
  if (isa == 1) return solve_chunk_avx2(a);
#endif
  solve_chunk<T, TileBaseline>(a);
}

// Runs x = T(x) from x0 (undefined: zeros) on every row. `matrix` (d, d), possibly strided, is packed so that y = x @ matrix;
// `row_inputs` are the (batch, d) tensors whose rows must be finite for a sample to be solved.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> solve(const at::Tensor& matrix, const at::Tensor& x0,
                                                                 const at::Tensor& bias, const at::Tensor& scale,
                                                                 std::initializer_list<at::Tensor> row_inputs,
                                                                 ActivationId activation, bool adjoint, double alpha,
                                                                 double tol, int64_t max_iter) {
  const int64_t batch = bias.size(0), d = bias.size(1);
  const auto options = bias.options();
  at::Tensor z = at::empty({batch, d}, options);
  at::Tensor iterations = at::empty({batch}, options.dtype(at::kInt));
  at::Tensor residual = at::empty({batch}, options);
  at::Tensor converged = at::empty({batch}, options.dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(bias.scalar_type(), "deqkern_fixed_point_dense_cpu", [&] {
    using T = scalar_t;
    const int64_t ld = (d * int64_t(sizeof(T)) + kRowAlignBytes - 1) / kRowAlignBytes * kRowAlignBytes / sizeof(T);
    int64_t bytes = 0;
    const int64_t packed_at = carve(bytes, d * ld * sizeof(T));
    const int64_t x_at = carve(bytes, batch * ld * sizeof(T));
    const int64_t y_at = carve(bytes, batch * ld * sizeof(T));
    const int64_t active_at = carve(bytes, batch * sizeof(int64_t));
    at::Tensor scratch = at::empty({bytes}, options.dtype(at::kByte));
    char* base = static_cast<char*>(scratch.data_ptr());
    T* packed = reinterpret_cast<T*>(base + packed_at);
    const T* m = matrix.data_ptr<T>();
    const bool matrix_finite = pack_matrix(m, matrix.stride(0), matrix.stride(1), d, ld, packed);
    ChunkArgs<T> args{};
    args.packed = packed;
    args.x0 = x0.defined() ? x0.data_ptr<T>() : nullptr;
    args.bias = bias.data_ptr<T>();
    args.scale = adjoint ? scale.data_ptr<T>() : nullptr;
    args.x = reinterpret_cast<T*>(base + x_at);
    args.y = reinterpret_cast<T*>(base + y_at);
    args.active = reinterpret_cast<int64_t*>(base + active_at);
    args.z_out = z.data_ptr<T>();
    args.iterations = iterations.data_ptr<int32_t>();
    args.residual = residual.data_ptr<T>();
    args.converged = converged.data_ptr<bool>();
    TORCH_INTERNAL_ASSERT(row_inputs.size() <= kMaxRowInputs);
    for (const at::Tensor& t : row_inputs) args.inputs[args.n_inputs++] = t.data_ptr<T>();
    args.matrix_finite = matrix_finite;
    args.d = d;
    args.ld = ld;
    args.max_iter = max_iter;
    args.alpha = static_cast<T>(alpha);
    args.tol = static_cast<T>(tol);
    args.activation = activation;
    args.adjoint = adjoint;
    // Enough rows per thread to fill micro-tiles; each chunk is then an independent solve.
    const int64_t threads = std::max(1, at::get_num_threads());
    const int64_t grain = std::max<int64_t>(4, (batch + threads - 1) / threads);
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      ChunkArgs<T> chunk = args;
      chunk.row_begin = begin;
      chunk.row_end = end;
      solve_chunk_dispatch(chunk);
    });
  });
  return {z, iterations, residual, converged};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fixed_point_dense_cpu(
    const at::Tensor& W, const at::Tensor& c, const at::Tensor& z0, c10::string_view activation, double alpha,
    double tol, int64_t max_iter) {
  check_dense_solve_args(W, {c, z0}, alpha, tol, max_iter);
  ActivationId id = parse_activation(std::string(activation));
  return solve(W.t(), z0, c, at::Tensor(), {c, z0}, id, /*adjoint=*/false, alpha, tol, max_iter);
}

// Elementwise act'(u), in place.
template <typename T>
void activation_derivative_inplace(ActivationId id, T* u, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) u[i] = activation_derivative(id, u[i]);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fixed_point_dense_backward_cpu(
    const at::Tensor& W, const at::Tensor& c, const at::Tensor& z, const at::Tensor& grad_z,
    c10::string_view activation, double alpha, double tol, int64_t max_iter) {
  check_dense_solve_args(W, {c, z, grad_z}, alpha, tol, max_iter);
  ActivationId id = parse_activation(std::string(activation));
  at::Tensor scale = at::addmm(c, z, W.t());  // u = z W^T + c, once per solve
  AT_DISPATCH_FLOATING_TYPES(scale.scalar_type(), "deqkern_activation_derivative_cpu", [&] {
    activation_derivative_inplace(id, scale.data_ptr<scalar_t>(), scale.numel());
  });
  return solve(W, /*x0=*/at::Tensor(), grad_z, scale, {grad_z, z, c}, id, /*adjoint=*/true, alpha,
               tol, max_iter);
}

}  // namespace

TORCH_LIBRARY_IMPL(deqkern, CPU, m) {
  m.impl("fixed_point_dense", &fixed_point_dense_cpu);
  m.impl("fixed_point_dense_backward", &fixed_point_dense_backward_cpu);
}

}  // namespace deqkern

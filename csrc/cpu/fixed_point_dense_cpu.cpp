// CPU kernels of fixed_point_dense and fixed_point_dense_backward: the whole solve in one call.
//
// Batch rows are split once between threads (at::parallel_for); each thread then runs the complete
// iteration for its rows with no synchronisation at all. Per iteration a thread multiplies its still
// active rows by the packed matrix with a register-blocked micro-kernel (GCC vector extensions, compiled
// for AVX-512, AVX2 and baseline x86-64 and chosen at load time by target_clones), then one fused pass
// per row applies the epilogue (activation or adjoint scaling), the residual norms and the damped update.
// Stopped rows leave the active list, so converged samples cost nothing. All buffers are allocated
// before the first iteration.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <tuple>
#include <vector>

#include "activations.h"
#include "solver_checks.h"

namespace deqkern {
namespace {

constexpr double kResidualEps = 1e-12;  // RESIDUAL_EPS in deqkern/reference.py

// One 64-byte SIMD register's worth of T; aligned(sizeof(T)) makes loads and stores unaligned-safe.
// (A member typedef: GCC ignores vector attributes on a dependent alias template.)
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64), aligned(sizeof(T))));
};
template <typename T>
using Vec = typename VecOf<T>::type;
static_assert(sizeof(Vec<float>) == 64 && sizeof(Vec<double>) == 64, "vector extension not applied");
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

constexpr int kTileRows = 4;     // rows of a micro-tile
constexpr int kTileVecs = 2;     // vectors (of kLanes columns) of a micro-tile
template <typename T>
constexpr int64_t kTileCols = kTileVecs * kLanes<T>;

#if defined(__GNUC__)
#define DEQKERN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DEQKERN_ALWAYS_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DEQKERN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DEQKERN_ISA_CLONES
#endif

// Everything one thread needs to solve rows [row_begin, row_end). Matrices are row-major with
// leading dimension `ld` (d rounded up to a multiple of kTileCols; the padding columns of `packed` are 0).
template <typename T>
struct ChunkArgs {
  const T* packed;      // (d, ld): y = x @ packed, i.e. packed = W^T (forward) or W (adjoint)
  const T* bias;        // (B, d): c (forward) or grad_z (adjoint)
  const T* scale;       // (B, d): act'(u) (adjoint only)
  T* x;                 // (B, ld): the iterate, updated in place
  T* y;                 // (B, ld): scratch for x @ packed
  int32_t* iterations;  // (B,)
  T* residual;          // (B,)
  int64_t* active;      // (B,): scratch list of active rows
  int64_t d, ld, row_begin, row_end, max_iter;
  T alpha, tol;
  ActivationId activation;
  bool adjoint;
};

// y[rows] = x[rows] @ packed for up to kTileRows rows, all ld columns.
template <typename T>
DEQKERN_ALWAYS_INLINE void multiply_tile(const ChunkArgs<T>& a, const int64_t* rows, int n_rows) {
  const T* x_rows[kTileRows];
  T* y_rows[kTileRows];
  for (int r = 0; r < kTileRows; ++r) {  // short tiles repeat their last row; the copy's result is discarded
    int64_t row = rows[r < n_rows ? r : n_rows - 1];
    x_rows[r] = a.x + row * a.ld;
    y_rows[r] = a.y + row * a.ld;
  }
  for (int64_t n0 = 0; n0 < a.ld; n0 += kTileCols<T>) {
    Vec<T> acc[kTileRows][kTileVecs];
    for (int r = 0; r < kTileRows; ++r)
      for (int v = 0; v < kTileVecs; ++v) acc[r][v] = Vec<T>{} ;
    const T* p = a.packed + n0;
    for (int64_t k = 0; k < a.d; ++k, p += a.ld) {
      Vec<T> w[kTileVecs];
      for (int v = 0; v < kTileVecs; ++v) w[v] = *reinterpret_cast<const Vec<T>*>(p + v * kLanes<T>);
      for (int r = 0; r < kTileRows; ++r) {
        T xk = x_rows[r][k];
        for (int v = 0; v < kTileVecs; ++v) acc[r][v] += xk * w[v];
      }
    }
    for (int r = 0; r < n_rows; ++r)
      for (int v = 0; v < kTileVecs; ++v)
        *reinterpret_cast<Vec<T>*>(y_rows[r] + n0 + v * kLanes<T>) = acc[r][v];
  }
}

// tanh to a few ulp with only multiply-add, divide and clamp, so that loops over it vectorise
// (the rational approximation of Eigen's generic_fast_tanh_float). float only; double uses std::tanh.
DEQKERN_ALWAYS_INLINE float fast_tanh(float x) {
  const float clamp = 7.90531110763549805f;  // |tanh| rounds to 1 beyond this
  float xc = x > clamp ? clamp : (x < -clamp ? -clamp : x);
  float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  float t = xc * p / q;
  return (x < 0.0004f && x > -0.0004f) ? x : t;
}

// t[i] = act(y[i] + c[i]) in place, one activation per loop so that each loop vectorises.
template <typename T>
DEQKERN_ALWAYS_INLINE void apply_activation(ActivationId id, T* y, const T* c, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (id == ActivationId::Tanh) {
      for (int64_t i = 0; i < n; ++i) y[i] = fast_tanh(y[i] + c[i]);
      return;
    }
    if (id == ActivationId::Sigmoid) {  // sigmoid(u) = (1 + tanh(u / 2)) / 2
      for (int64_t i = 0; i < n; ++i) y[i] = 0.5f + 0.5f * fast_tanh(0.5f * (y[i] + c[i]));
      return;
    }
  }
  switch (id) {
    case ActivationId::Identity:
      for (int64_t i = 0; i < n; ++i) y[i] = y[i] + c[i];
      break;
    case ActivationId::Relu:
      for (int64_t i = 0; i < n; ++i) {
        T u = y[i] + c[i];
        y[i] = u > T(0) ? u : T(0);
      }
      break;
    case ActivationId::Softsign:
      for (int64_t i = 0; i < n; ++i) {
        T u = y[i] + c[i];
        y[i] = u / (T(1) + (u < T(0) ? -u : u));
      }
      break;
    case ActivationId::Relu6:
      for (int64_t i = 0; i < n; ++i) {
        T u = y[i] + c[i];
        y[i] = u < T(0) ? T(0) : (u > T(6) ? T(6) : u);
      }
      break;
    default:
      for (int64_t i = 0; i < n; ++i) y[i] = activation_forward(id, y[i] + c[i]);
  }
}

// Epilogue of one row: t = T(x) into y, then the residual norms and x <- (1 - alpha) x + alpha t.
// Returns ||t - x|| / (||t|| + eps).
template <typename T>
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
  // Several partial sums per norm let the reduction vectorise without reassociation flags.
  constexpr int kPartials = 16;
  T diff2[kPartials] = {}, t2[kPartials] = {};
  int64_t i = 0;
  for (; i + kPartials <= a.d; i += kPartials)
    for (int j = 0; j < kPartials; ++j) {
      T dj = t[i + j] - x[i + j];
      diff2[j] += dj * dj;
      t2[j] += t[i + j] * t[i + j];
    }
  for (int j = 0; i < a.d; ++i, ++j) {
    T dj = t[i] - x[i];
    diff2[j] += dj * dj;
    t2[j] += t[i] * t[i];
  }
  T diff_sq = 0, t_sq = 0;
  for (int j = 0; j < kPartials; ++j) {
    diff_sq += diff2[j];
    t_sq += t2[j];
  }
  if (a.alpha == T(1)) {
    for (i = 0; i < a.d; ++i) x[i] = t[i];
  } else {
    T keep = T(1) - a.alpha;
    for (i = 0; i < a.d; ++i) x[i] = keep * x[i] + a.alpha * t[i];
  }
  return std::sqrt(diff_sq) / (std::sqrt(t_sq) + T(kResidualEps));
}

template <typename T>
DEQKERN_ALWAYS_INLINE void solve_chunk(const ChunkArgs<T>& a) {
  int64_t n_active = 0;
  for (int64_t row = a.row_begin; row < a.row_end; ++row) a.active[a.row_begin + n_active++] = row;
  int64_t* active = a.active + a.row_begin;
  for (int64_t k = 1; k <= a.max_iter && n_active > 0; ++k) {
    for (int64_t i = 0; i < n_active; i += kTileRows)
      multiply_tile(a, active + i, static_cast<int>(std::min<int64_t>(kTileRows, n_active - i)));
    int64_t still_active = 0;
    for (int64_t i = 0; i < n_active; ++i) {
      int64_t row = active[i];
      T r = update_row(a, row);
      a.iterations[row] = static_cast<int32_t>(k);
      a.residual[row] = r;
      if (r > a.tol && std::isfinite(r)) active[still_active++] = row;  // NaN compares false: stops
    }
    n_active = still_active;
  }
}

DEQKERN_ISA_CLONES void solve_chunk_float(const ChunkArgs<float>& a) { solve_chunk(a); }
DEQKERN_ISA_CLONES void solve_chunk_double(const ChunkArgs<double>& a) { solve_chunk(a); }
void solve_chunk_dispatch(const ChunkArgs<float>& a) { solve_chunk_float(a); }
void solve_chunk_dispatch(const ChunkArgs<double>& a) { solve_chunk_double(a); }

int64_t padded_width(int64_t d, int64_t tile_cols) { return (d + tile_cols - 1) / tile_cols * tile_cols; }

// Copies the (batch, d) tensor src into the first d columns of a zeroed (batch, ld) buffer.
template <typename T>
at::Tensor pad_columns(const at::Tensor& src, int64_t ld) {
  at::Tensor out = at::zeros({src.size(0), ld}, src.options());
  if (src.numel() > 0) out.narrow(1, 0, src.size(1)).copy_(src);
  return out;
}

// Runs the solve x = T(x) from x0 on every row; `matrix` is packed so that y = x @ matrix.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> solve(const at::Tensor& matrix, const at::Tensor& x0,
                                                                 const at::Tensor& bias, const at::Tensor& scale,
                                                                 ActivationId activation, bool adjoint, double alpha,
                                                                 double tol, int64_t max_iter) {
  const int64_t batch = x0.size(0), d = x0.size(1);
  at::Tensor iterations = at::zeros({batch}, x0.options().dtype(at::kInt));
  at::Tensor residual = at::empty({batch}, x0.options());
  at::Tensor x_out;
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "deqkern_fixed_point_dense_cpu", [&] {
    const int64_t ld = padded_width(d, kTileCols<scalar_t>);
    at::Tensor packed = pad_columns<scalar_t>(matrix, ld);
    at::Tensor x = pad_columns<scalar_t>(x0, ld);
    at::Tensor y = at::empty({batch, ld}, x0.options());
    at::Tensor active = at::empty({batch}, x0.options().dtype(at::kLong));
    ChunkArgs<scalar_t> args{packed.data_ptr<scalar_t>(),
                             bias.data_ptr<scalar_t>(),
                             adjoint ? scale.data_ptr<scalar_t>() : nullptr,
                             x.data_ptr<scalar_t>(),
                             y.data_ptr<scalar_t>(),
                             iterations.data_ptr<int32_t>(),
                             residual.data_ptr<scalar_t>(),
                             active.data_ptr<int64_t>(),
                             d, ld, 0, 0, max_iter,
                             static_cast<scalar_t>(alpha), static_cast<scalar_t>(tol),
                             activation, adjoint};
    // Enough rows per thread to fill micro-tiles; each chunk is then an independent solve.
    const int64_t grain = std::max<int64_t>(kTileRows, (batch + at::get_num_threads() - 1) /
                                                           std::max(1, at::get_num_threads()));
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      ChunkArgs<scalar_t> chunk = args;
      chunk.row_begin = begin;
      chunk.row_end = end;
      solve_chunk_dispatch(chunk);
    });
    x_out = x.narrow(1, 0, d).contiguous();
  });
  at::Tensor converged = residual.le(tol);
  return {x_out, iterations, residual, converged};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fixed_point_dense_cpu(
    const at::Tensor& W, const at::Tensor& c, const at::Tensor& z0, c10::string_view activation, double alpha,
    double tol, int64_t max_iter) {
  check_dense_solve_args(W, {c, z0}, alpha, tol, max_iter);
  ActivationId id = parse_activation(std::string(activation));
  return solve(W.t(), z0, c, at::Tensor(), id, /*adjoint=*/false, alpha, tol, max_iter);
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
  return solve(W, at::zeros(z.sizes(), z.options()), grad_z, scale, id, /*adjoint=*/true, alpha, tol, max_iter);
}

}  // namespace

TORCH_LIBRARY_IMPL(deqkern, CPU, m) {
  m.impl("fixed_point_dense", &fixed_point_dense_cpu);
  m.impl("fixed_point_dense_backward", &fixed_point_dense_backward_cpu);
}

}  // namespace deqkern

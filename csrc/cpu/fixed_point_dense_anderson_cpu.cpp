// CPU kernels of fixed_point_dense_anderson and its backward: a type-II Anderson solve in one call.
//
// The layout is the Picard solver's (fixed_point_dense_cpu.cpp): batch rows split once between threads, each thread
// runs the whole solve for its rows, the layer's matrix product goes through the shared register-blocked micro-kernel
// (dense_kernels.h) on the still active rows only. What Anderson adds per row and iteration is O(m d): the new pair
// (T(x), g = T(x) - x) goes into the row's ring buffer, one new row of its Gram matrix is formed, the (n+1) x (n+1)
// bordered system is solved in float64 on the stack, and the next iterate is mixed from the history. The buffer
// holds T(x_j) rather than x_j because x_j + beta g_j = T(x_j) - (1 - beta) g_j: at the default beta = 1 the mix
// reads one history instead of two.
// Semantics: deqkern/reference.py (_anderson_ref, _anderson_weights).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "activations.h"
#include "anderson_weights.h"
#include "dense_kernels.h"
#include "solver_checks.h"

namespace deqkern {
namespace {

using namespace cpu;

constexpr int kMaxHistory = 16;  // ANDERSON_MAX_M in deqkern/reference.py
constexpr int kMaxRowInputs = 3;
// A thread solves its rows in blocks of this many, each to the end: the block's ring buffers (2 m d values per row)
// then stay in L2 across the record, weights and mix passes of a step. Measured (AMD EPYC, 2 threads, m=5, float):
// 11-18% faster than one block per thread at B=256, d in {64, 256} and B=1024, d=256, 2% at d=512; blocks of 8 or
// 16 rows were slower at d=256 (W is streamed once per block and step).
constexpr int64_t kRowsPerBlock = 32;

// Everything one thread needs to solve rows [row_begin, row_end). Row-major scratch with leading dimension ld.
template <typename T>
struct AndersonArgs {
  const T* packed;  // (d, ld): y = x @ packed (W^T forward, W adjoint); the name the micro-kernel expects
  const T* x0;      // (B, d) or null: zeros
  const T* bias;    // (B, d): c or grad_z
  const T* scale;   // (B, d): act'(u), adjoint only
  T* x;             // (B, ld): the iterate
  T* y;             // (B, ld): x @ packed, then T(x)
  T* hist_f;        // (B, m, ld): ring buffer of T(x_j)
  T* hist_g;        // (B, m, ld): ring buffer of residuals T(x) - x
  double* gram;     // (B, m, m): Gram matrix of hist_g
  double* weights;  // (B, kMaxHistory): the mixing weights of the current step
  int64_t* active;  // (B,)
  T* z_out;
  int32_t* iterations;
  T* residual;
  bool* converged;
  const T* inputs[kMaxRowInputs];
  int n_inputs;
  bool matrix_finite;
  int64_t d, ld, row_begin, row_end, max_iter;
  int m;
  T beta, tol;
  double lam;
  ActivationId activation;
  bool adjoint;
};

// Rows of x, y and the history are padded with zeros to ld >= d (dense_kernels.h): the padding of the packed matrix
// is 0, so y's padding is 0, the epilogue leaves it alone, and every update below keeps x's padding 0. So the
// per-row vector loops run over ceil(d / lanes) vectors rounded up to a multiple of 4 (ld / lanes is one, so this
// stays inside the row), without a scalar tail.
template <typename T, typename TILE>
DEQKERN_ALWAYS_INLINE int64_t padded_vectors(int64_t d) {
  constexpr int64_t L = TILE::kBytes / sizeof(T);
  static_assert(kRowAlignBytes % (4 * TILE::kBytes) == 0, "padded rows must hold whole groups of 4 vectors");
  return ((d + L - 1) / L + 3) / 4 * 4;
}

// Weights of _anderson_weights for P rows at once, one row per SIMD lane (P = lanes of double in TILE). The bordered
// system's solution is a = y / (1^T y) with A y = 1, A = G + lam diag(G); A is symmetric positive definite whenever
// lam > 0 and no stored residual is zero, so y comes from an L D L^T factorisation (n^3 / 6 flops, no pivoting).
// One solve is a chain of dependent divisions and multiply-adds; running P independent ones side by side in the
// lanes hides that latency. A lane whose pivot is not positive or whose sum is zero or not finite falls back to
// the general bordered solve, which decides the degenerate cases exactly as the reference does. N = n is a
// template parameter so that every loop is unrolled.
template <typename TILE, int N>
DEQKERN_ALWAYS_INLINE void anderson_weights_lanes(const double* const* grams, double* const* out, int count, int m,
                                                  int slot, double lam) {
  using VD = typename VecOf<double, TILE::kBytes>::type;
  constexpr int P = TILE::kBytes / sizeof(double);
  VD l[N][N];  // lower triangle: L_ij D_j during the factorisation, then L_ij; l[j][j] = 1 / D_j
  VD dv[N];
  for (int i = 0; i < N; ++i)
    for (int j = 0; j <= i; ++j)
      for (int p = 0; p < P; ++p) l[i][j][p] = grams[p < count ? p : 0][i * m + j];
  for (int j = 0; j < N; ++j) {
    VD dj = l[j][j] + lam * l[j][j];
    for (int k = 0; k < j; ++k) dj -= l[j][k] * l[j][k] * l[k][k];
    dv[j] = dj;
    const VD inv = 1.0 / dj;
    for (int i = j + 1; i < N; ++i) {
      VD t = l[i][j];
      for (int k = 0; k < j; ++k) t -= l[i][k] * l[j][k] * l[k][k];
      l[i][j] = t;
    }
    l[j][j] = inv;
  }
  for (int j = 0; j < N; ++j)
    for (int i = j + 1; i < N; ++i) l[i][j] *= l[j][j];
  VD y[N];
  for (int i = 0; i < N; ++i) {  // L z = 1
    VD t = VD{} + 1.0;
    for (int k = 0; k < i; ++k) t -= l[i][k] * y[k];
    y[i] = t;
  }
  VD sum{};
  for (int i = N - 1; i >= 0; --i) {  // L^T y = D^-1 z
    VD t = y[i] * l[i][i];
    for (int k = i + 1; k < N; ++k) t -= l[k][i] * y[k];
    y[i] = t;
    sum += t;
  }
  const VD inv_sum = 1.0 / sum;
  for (int p = 0; p < count; ++p) {
    bool ok = sum[p] != 0.0 && std::isfinite(sum[p]);
    for (int j = 0; j < N; ++j) ok = ok && dv[j][p] > 0.0 && std::isfinite(dv[j][p]);
    if (ok) {
      for (int i = 0; i < N; ++i) out[p][i] = y[i][p] * inv_sum[p];
    } else {
      anderson_weights_bordered<kMaxHistory>(grams[p], m, N, slot, lam, out[p]);
    }
  }
}

// Weights for every row in rows[0 .. n_rows), P rows at a time; n is the same for all (they are all at step k).
template <typename TILE, int... Ns>
DEQKERN_ALWAYS_INLINE void anderson_weights_rows(std::integer_sequence<int, Ns...>, const double* gram,
                                                 double* weights, const int64_t* rows, int64_t n_rows, int m, int n,
                                                 int slot, double lam) {
  constexpr int P = TILE::kBytes / sizeof(double);
  for (int64_t i = 0; i < n_rows; i += P) {
    const int count = static_cast<int>(std::min<int64_t>(P, n_rows - i));
    const double* grams[P];
    double* out[P];
    for (int p = 0; p < P; ++p) {
      const int64_t row = rows[i + (p < count ? p : 0)];
      grams[p] = gram + row * m * m;
      out[p] = weights + row * kMaxHistory;
    }
    ((n == Ns + 1 ? anderson_weights_lanes<TILE, Ns + 1>(grams, out, count, m, slot, lam) : void()), ...);
  }
}

template <typename TILE>
DEQKERN_ALWAYS_INLINE void anderson_weights_all(const double* gram, double* weights, const int64_t* rows,
                                                int64_t n_rows, int m, int n, int slot, double lam) {
  anderson_weights_rows<TILE>(std::make_integer_sequence<int, kMaxHistory>{}, gram, weights, rows, n_rows, m, n, slot,
                              lam);
}

// The weights are the largest code in this file (16 unrolled sizes): compile them once per instruction set.
#ifdef DEQKERN_X86_DISPATCH
DEQKERN_TARGET_AVX512 void anderson_weights_avx512(const double* gram, double* weights, const int64_t* rows,
                                                   int64_t n_rows, int m, int n, int slot, double lam) {
  anderson_weights_all<TileAvx512>(gram, weights, rows, n_rows, m, n, slot, lam);
}
DEQKERN_TARGET_AVX2 void anderson_weights_avx2(const double* gram, double* weights, const int64_t* rows,
                                               int64_t n_rows, int m, int n, int slot, double lam) {
  anderson_weights_all<TileAvx2>(gram, weights, rows, n_rows, m, n, slot, lam);
}
#endif
void anderson_weights_baseline(const double* gram, double* weights, const int64_t* rows, int64_t n_rows, int m,
                               int n, int slot, double lam) {
  anderson_weights_all<TileBaseline>(gram, weights, rows, n_rows, m, n, slot, lam);
}

template <typename TILE>
DEQKERN_ALWAYS_INLINE void anderson_weights_isa(const double* gram, double* weights, const int64_t* rows,
                                                int64_t n_rows, int m, int n, int slot, double lam) {
#ifdef DEQKERN_X86_DISPATCH
  if constexpr (std::is_same_v<TILE, TileAvx512>) return anderson_weights_avx512(gram, weights, rows, n_rows, m, n, slot, lam);
  if constexpr (std::is_same_v<TILE, TileAvx2>) return anderson_weights_avx2(gram, weights, rows, n_rows, m, n, slot, lam);
#endif
  anderson_weights_baseline(gram, weights, rows, n_rows, m, n, slot, lam);
}

// The dot products of q with up to four rows p[0..3], in one pass over q: 4 x 2 independent accumulator chains keep
// both FMA pipes busy where a single chain would wait on its own latency. n_vec is even (padded_vectors), and
// the padding is zero.
template <typename T, typename TILE>
DEQKERN_ALWAYS_INLINE void dot4(const T* __restrict q, const T* const* p, int64_t n_vec, double* out) {
  using V = typename VecOf<T, TILE::kBytes>::type;
  const V* qv = reinterpret_cast<const V*>(q);
  const V* pv[4];
  for (int j = 0; j < 4; ++j) pv[j] = reinterpret_cast<const V*>(p[j]);
  V acc[4][2] = {};
  for (int64_t b = 0; b < n_vec; b += 2) {
    const V q0 = qv[b], q1 = qv[b + 1];
    for (int j = 0; j < 4; ++j) {
      acc[j][0] += q0 * pv[j][b];
      acc[j][1] += q1 * pv[j][b + 1];
    }
  }
  for (int j = 0; j < 4; ++j) {
    out[j] = double(horizontal_sum<T, TILE::kBytes>(acc[j][0] + acc[j][1]));
  }
}

// First half of an Anderson step of one row, after y = x @ packed: T(x), the new pair into the ring buffer and
// the new row of the Gram matrix. Returns ||T(x) - x|| / (||T(x)|| + eps).
template <typename T, typename TILE>
DEQKERN_ALWAYS_INLINE T anderson_record(const AndersonArgs<T>& a, int64_t row, int64_t k) {
  using V = typename VecOf<T, TILE::kBytes>::type;
  const int64_t n_vec = padded_vectors<T, TILE>(a.d);
  T* x = a.x + row * a.ld;
  T* t = a.y + row * a.ld;
  const T* bias = a.bias + row * a.d;
  if (a.adjoint) {
    const T* s = a.scale + row * a.d;
    for (int64_t i = 0; i < a.d; ++i) t[i] = s[i] * (t[i] + bias[i]);
  } else {
    apply_activation(a.activation, t, bias, a.d);
  }
  const int m = a.m;
  const int slot = static_cast<int>((k - 1) % m);
  const int n = static_cast<int>(std::min<int64_t>(k, m));
  T* hf = a.hist_f + row * m * a.ld;
  T* hg = a.hist_g + row * m * a.ld;
  // The new pair into the ring buffer, with the squared norms of g and T(x) in the same pass.
  V* __restrict fs = reinterpret_cast<V*>(hf + slot * a.ld);
  V* __restrict gs = reinterpret_cast<V*>(hg + slot * a.ld);
  const V* xv = reinterpret_cast<const V*>(x);
  const V* tv = reinterpret_cast<const V*>(t);
  V diff_v{}, t_v{};
  for (int64_t b = 0; b < n_vec; ++b) {
    const V g = tv[b] - xv[b];
    fs[b] = tv[b];
    gs[b] = g;
    diff_v += g * g;
    t_v += tv[b] * tv[b];
  }
  const T diff_sq = horizontal_sum<T, TILE::kBytes>(diff_v), t_sq = horizontal_sum<T, TILE::kBytes>(t_v);
  // The new row and column of the Gram matrix: n - 1 dot products of length d, four per pass over the new g.
  double* gram = a.gram + row * m * m;
  const T* g_new = hg + slot * a.ld;
  for (int j0 = 0; j0 < n; j0 += 4) {
    const T* p[4];
    for (int j = 0; j < 4; ++j) p[j] = j0 + j < n ? hg + (j0 + j) * a.ld : g_new;  // spare lanes: discarded
    double v[4];
    dot4<T, TILE>(g_new, p, n_vec, v);
    for (int j = j0; j < std::min(n, j0 + 4); ++j) {
      const double value = j == slot ? double(diff_sq) : v[j - j0];
      gram[slot * m + j] = value;
      gram[j * m + slot] = value;
    }
  }
  return std::sqrt(diff_sq) / (std::sqrt(t_sq) + T(kResidualEps));
}

// x <- sum_j w_j (x_j + beta g_j) = sum_j w_j T(x_j) - (1 - beta) sum_j w_j g_j, four vectors at a time so that
// four accumulator chains run side by side; the g history is read only when beta != 1.
template <typename T, typename TILE>
DEQKERN_ALWAYS_INLINE void anderson_mix(const AndersonArgs<T>& a, int64_t row, int n) {
  using V = typename VecOf<T, TILE::kBytes>::type;
  constexpr int U = 4;  // padded_vectors is a multiple of U
  const int64_t n_vec = padded_vectors<T, TILE>(a.d);
  const int m = a.m;
  const T* hf = a.hist_f + row * m * a.ld;
  const T* hg = a.hist_g + row * m * a.ld;
  const double* w = a.weights + row * kMaxHistory;
  T wf[kMaxHistory], wg[kMaxHistory];
  for (int j = 0; j < n; ++j) {
    wf[j] = static_cast<T>(w[j]);
    wg[j] = wf[j] * (a.beta - T(1));
  }
  V* xo = reinterpret_cast<V*>(a.x + row * a.ld);
  const bool with_g = a.beta != T(1);
  for (int64_t b = 0; b < n_vec; b += U) {
    V acc[U] = {};
    for (int j = 0; j < n; ++j) {
      const V* f = reinterpret_cast<const V*>(hf + j * a.ld) + b;
      for (int u = 0; u < U; ++u) acc[u] += wf[j] * f[u];
    }
    if (with_g) {
      for (int j = 0; j < n; ++j) {
        const V* g = reinterpret_cast<const V*>(hg + j * a.ld) + b;
        for (int u = 0; u < U; ++u) acc[u] += wg[j] * g[u];
      }
    }
    for (int u = 0; u < U; ++u) xo[b + u] = acc[u];
  }
}

template <typename T, typename TILE>
DEQKERN_ALWAYS_INLINE void anderson_chunk(const AndersonArgs<T>& a) {
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
    // Three passes over the active rows: record the new pair (and residual), solve every row's weights (in SIMD
    // lanes across rows), mix the next iterate. Every active row is at step k, so all share n and slot.
    const int slot = static_cast<int>((k - 1) % a.m);
    const int n = static_cast<int>(std::min<int64_t>(k, a.m));
    for (int64_t i = 0; i < n_active; ++i) {
      const int64_t row = active[i];
      a.residual[row] = anderson_record<T, TILE>(a, row, k);
      a.iterations[row] = static_cast<int32_t>(k);
    }
    anderson_weights_isa<TILE>(a.gram, a.weights, active, n_active, a.m, n, slot, a.lam);
    int64_t still_active = 0;
    for (int64_t i = 0; i < n_active; ++i) {
      const int64_t row = active[i];
      anderson_mix<T, TILE>(a, row, n);
      const T r = a.residual[row];
      if (r > a.tol && std::isfinite(r)) active[still_active++] = row;
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
DEQKERN_TARGET_AVX512 void anderson_chunk_avx512(const AndersonArgs<T>& a) { anderson_chunk<T, TileAvx512>(a); }
template <typename T>
DEQKERN_TARGET_AVX2 void anderson_chunk_avx2(const AndersonArgs<T>& a) { anderson_chunk<T, TileAvx2>(a); }
#endif

template <typename T>
void anderson_chunk_dispatch(const AndersonArgs<T>& a) {
#ifdef DEQKERN_X86_DISPATCH
  const int isa = cpu_isa();
  if (isa == 2) return anderson_chunk_avx512(a);
  if (isa == 1) return anderson_chunk_avx2(a);
#endif
  anderson_chunk<T, TileBaseline>(a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> solve(
    const at::Tensor& matrix, const at::Tensor& x0, const at::Tensor& bias, const at::Tensor& scale,
    std::initializer_list<at::Tensor> row_inputs, ActivationId activation, bool adjoint, int64_t m, double beta,
    double lam, double tol, int64_t max_iter) {
  const int64_t batch = bias.size(0), d = bias.size(1);
  const auto options = bias.options();
  at::Tensor z = at::empty({batch, d}, options);
  at::Tensor iterations = at::empty({batch}, options.dtype(at::kInt));
  at::Tensor residual = at::empty({batch}, options);
  at::Tensor converged = at::empty({batch}, options.dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(bias.scalar_type(), "deqkern_fixed_point_dense_anderson_cpu", [&] {
    using T = scalar_t;
    const int64_t ld = (d * int64_t(sizeof(T)) + kRowAlignBytes - 1) / kRowAlignBytes * kRowAlignBytes / sizeof(T);
    int64_t bytes = 0;  // every buffer in one allocation, before the first iteration
    const int64_t packed_at = carve(bytes, d * ld * sizeof(T));
    const int64_t x_at = carve(bytes, batch * ld * sizeof(T));
    const int64_t y_at = carve(bytes, batch * ld * sizeof(T));
    const int64_t hf_at = carve(bytes, batch * m * ld * sizeof(T));
    const int64_t hg_at = carve(bytes, batch * m * ld * sizeof(T));
    const int64_t gram_at = carve(bytes, batch * m * m * sizeof(double));
    const int64_t weights_at = carve(bytes, batch * kMaxHistory * sizeof(double));
    const int64_t active_at = carve(bytes, batch * sizeof(int64_t));
    at::Tensor scratch = at::empty({bytes}, options.dtype(at::kByte));
    char* base = static_cast<char*>(scratch.data_ptr());
    T* packed = reinterpret_cast<T*>(base + packed_at);
    const T* src = matrix.data_ptr<T>();
    const bool matrix_finite = pack_matrix(src, matrix.stride(0), matrix.stride(1), d, ld, packed);
    AndersonArgs<T> args{};
    args.packed = packed;
    args.x0 = x0.defined() ? x0.data_ptr<T>() : nullptr;
    args.bias = bias.data_ptr<T>();
    args.scale = adjoint ? scale.data_ptr<T>() : nullptr;
    args.x = reinterpret_cast<T*>(base + x_at);
    args.y = reinterpret_cast<T*>(base + y_at);
    args.hist_f = reinterpret_cast<T*>(base + hf_at);
    args.hist_g = reinterpret_cast<T*>(base + hg_at);
    args.gram = reinterpret_cast<double*>(base + gram_at);
    args.weights = reinterpret_cast<double*>(base + weights_at);
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
    args.m = static_cast<int>(m);
    args.beta = static_cast<T>(beta);
    args.tol = static_cast<T>(tol);
    args.lam = lam;
    args.activation = activation;
    args.adjoint = adjoint;
    const int64_t threads = std::max(1, at::get_num_threads());
    const int64_t grain = std::max<int64_t>(4, (batch + threads - 1) / threads);
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      AndersonArgs<T> chunk = args;
      for (int64_t b0 = begin; b0 < end; b0 += kRowsPerBlock) {  // each block solved to the end on its own
        chunk.row_begin = b0;
        chunk.row_end = std::min(end, b0 + kRowsPerBlock);
        anderson_chunk_dispatch(chunk);
      }
    });
  });
  return {z, iterations, residual, converged};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fixed_point_dense_anderson_cpu(
    const at::Tensor& W, const at::Tensor& c, const at::Tensor& z0, c10::string_view activation, int64_t m,
    double beta, double lam, double tol, int64_t max_iter) {
  check_anderson_options(m, beta, lam, kMaxHistory);
  check_dense_solve_args(W, {c, z0}, beta, tol, max_iter);
  ActivationId id = parse_activation(std::string(activation));
  return solve(W.t(), z0, c, at::Tensor(), {c, z0}, id, /*adjoint=*/false, m, beta, lam, tol, max_iter);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fixed_point_dense_anderson_backward_cpu(
    const at::Tensor& W, const at::Tensor& c, const at::Tensor& z, const at::Tensor& grad_z,
    c10::string_view activation, int64_t m, double beta, double lam, double tol, int64_t max_iter) {
  check_anderson_options(m, beta, lam, kMaxHistory);
  check_dense_solve_args(W, {c, z, grad_z}, beta, tol, max_iter);
  ActivationId id = parse_activation(std::string(activation));
  at::Tensor scale = at::addmm(c, z, W.t());  // u = z W^T + c, once per solve
  AT_DISPATCH_FLOATING_TYPES(scale.scalar_type(), "deqkern_anderson_activation_derivative_cpu", [&] {
    scalar_t* u = scale.data_ptr<scalar_t>();
    at::parallel_for(0, scale.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) u[i] = activation_derivative(id, u[i]);
    });
  });
  return solve(W, /*x0=*/at::Tensor(), grad_z, scale, {grad_z, z, c}, id, /*adjoint=*/true, m, beta, lam, tol,
               max_iter);
}

}  // namespace

TORCH_LIBRARY_IMPL(deqkern, CPU, m) {
  m.impl("fixed_point_dense_anderson", &fixed_point_dense_anderson_cpu);
  m.impl("fixed_point_dense_anderson_backward", &fixed_point_dense_anderson_backward_cpu);
}

}  // namespace deqkern

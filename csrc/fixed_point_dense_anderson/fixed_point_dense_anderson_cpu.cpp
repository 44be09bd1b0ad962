// CPU kernels of fixed_point_dense_anderson and its backward: a type-II Anderson solve in one call.
//
// The solve's structure (threads, packing, micro-kernel, active rows, the per-sample contract) is
// common/cpu/dense_solve.h. What Anderson adds per row and iteration is O(m d): the new pair (T(x), g = T(x) - x) goes
// into the row's ring buffer, one new row of its Gram matrix is formed, the weights are solved (common/
// anderson_weights.h, several rows side by side in SIMD lanes) and the next iterate is mixed from the history. The
// buffer holds T(x_j) rather than x_j because x_j + beta g_j = T(x_j) - (1 - beta) g_j: at the default beta = 1 the
// mix reads one history instead of two. Semantics: deqkern/reference/fixed_point_dense_anderson.py.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <utility>

#include "common/anderson_weights.h"
#include "common/checks.h"
#include "common/cpu/dense_solve.h"

namespace deqkern {
namespace {

using namespace cpu;

constexpr int kMaxHistory = kAndersonMaxHistory;

template <typename T>
struct AndersonArgs : CpuDenseArgs<AndersonParams<T>> {
  T* hist_f = nullptr;        // (batch, m, ld): ring buffer of T(x_j)
  T* hist_g = nullptr;        // (batch, m, ld): ring buffer of residuals g_j = T(x_j) - x_j
  double* gram = nullptr;     // (batch, m, m): Gram matrix of hist_g
  double* weights = nullptr;  // (batch, kMaxHistory): the mixing weights of the current step
};

// Rows of x, y and the history are padded with zeros to ld >= d (dense_kernels.h): the padding of the packed matrix
// is 0, so y's padding is 0, the map leaves it alone, and every update below keeps x's padding 0. So the per-row
// vector loops run over ceil(d / lanes) vectors rounded up to a multiple of 4 (ld / lanes is one, so this stays
// inside the row), without a scalar tail.
template <typename T, typename TILE>
DEQKERN_ALWAYS_INLINE int64_t padded_vectors(int64_t d) {
  constexpr int64_t L = TILE::kBytes / sizeof(T);
  static_assert(kRowAlignBytes % (4 * TILE::kBytes) == 0, "padded rows must hold whole groups of 4 vectors");
  return ((d + L - 1) / L + 3) / 4 * 4;
}

// The weights of P rows at once, one row per SIMD lane (P = lanes of double in TILE): one solve is a chain of
// dependent divisions and multiply-adds, and P independent ones side by side hide that latency. N = n is a template
// parameter so that every loop of anderson_ldlt_solve unrolls. A lane whose solve fails takes a = e_slot.
template <typename TILE, int N>
DEQKERN_ALWAYS_INLINE void weights_lanes(const double* const* grams, double* const* out, int count, int m, int slot,
                                         double lam) {
  using VD = typename VecOf<double, TILE::kBytes>::type;
  constexpr int P = TILE::kBytes / sizeof(double);
  VD l[N][N], y[N], pivot[N], sum;
  for (int i = 0; i < N; ++i)
    for (int j = 0; j <= i; ++j)
      for (int p = 0; p < P; ++p) l[i][j][p] = grams[p < count ? p : 0][i * m + j];
  anderson_ldlt_solve<VD, N>(l, N, VD{} + lam, y, pivot, sum);
  const VD inv_sum = 1.0 / sum;
  for (int p = 0; p < count; ++p) {
    bool ok = sum[p] != 0.0 && std::isfinite(sum[p]);
    for (int j = 0; j < N; ++j) ok = ok && pivot[j][p] > 0.0 && std::isfinite(pivot[j][p]);
    for (int i = 0; i < N; ++i) {
      out[p][i] = y[i][p] * inv_sum[p];
      ok = ok && std::isfinite(out[p][i]);
    }
    if (!ok)
      for (int i = 0; i < N; ++i) out[p][i] = i == slot ? 1.0 : 0.0;
  }
}

// The weights of every row in rows[0 .. n_rows), P rows at a time; n is the same for all (they are all at step k).
template <typename TILE, int... Ns>
DEQKERN_ALWAYS_INLINE void weights_rows(std::integer_sequence<int, Ns...>, const double* gram, double* weights,
                                        const int64_t* rows, int64_t n_rows, int m, int n, int slot, double lam) {
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
    ((n == Ns + 1 ? weights_lanes<TILE, Ns + 1>(grams, out, count, m, slot, lam) : void()), ...);
  }
}

template <typename TILE>
DEQKERN_ALWAYS_INLINE void weights_all(const double* gram, double* weights, const int64_t* rows, int64_t n_rows,
                                       int m, int n, int slot, double lam) {
  weights_rows<TILE>(std::make_integer_sequence<int, kMaxHistory>{}, gram, weights, rows, n_rows, m, n, slot, lam);
}

// The weights are the largest code in this file (16 unrolled sizes): compile them once per instruction set.
#ifdef DEQKERN_X86_DISPATCH
DEQKERN_TARGET_AVX512 void weights_avx512(const double* gram, double* weights, const int64_t* rows, int64_t n_rows,
                                          int m, int n, int slot, double lam) {
  weights_all<TileAvx512>(gram, weights, rows, n_rows, m, n, slot, lam);
}
DEQKERN_TARGET_AVX2 void weights_avx2(const double* gram, double* weights, const int64_t* rows, int64_t n_rows, int m,
                                      int n, int slot, double lam) {
  weights_all<TileAvx2>(gram, weights, rows, n_rows, m, n, slot, lam);
}
#endif
void weights_baseline(const double* gram, double* weights, const int64_t* rows, int64_t n_rows, int m, int n,
                      int slot, double lam) {
  weights_all<TileBaseline>(gram, weights, rows, n_rows, m, n, slot, lam);
}

template <typename TILE>
DEQKERN_ALWAYS_INLINE void weights_isa(const double* gram, double* weights, const int64_t* rows, int64_t n_rows,
                                       int m, int n, int slot, double lam) {
#ifdef DEQKERN_X86_DISPATCH
  if constexpr (std::is_same_v<TILE, TileAvx512>) return weights_avx512(gram, weights, rows, n_rows, m, n, slot, lam);
  if constexpr (std::is_same_v<TILE, TileAvx2>) return weights_avx2(gram, weights, rows, n_rows, m, n, slot, lam);
#endif
  weights_baseline(gram, weights, rows, n_rows, m, n, slot, lam);
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
  for (int j = 0; j < 4; ++j) out[j] = double(horizontal_sum<T, TILE::kBytes>(acc[j][0] + acc[j][1]));
}

struct AndersonMethod {
  // A thread solves its rows in blocks of this many, each to the end: the block's ring buffers (2 m d values per row)
  // then stay in L2 across the record, weights and mix passes of a step. Measured (AMD EPYC, 2 threads, m=5, float):
  // 11-18% faster than one block per thread at B=256, d in {64, 256} and B=1024, d=256, 2% at d=512; blocks of 8 or
  // 16 rows were slower at d=256 (W is streamed once per block and step).
  static constexpr int64_t kRowsPerBlock = 32;

  template <typename ARGS>
  static at::Tensor allocate(ARGS& a) {
    using T = typename ARGS::T;
    int64_t bytes = 0;
    const int64_t hf_at = carve(bytes, a.batch * a.m * a.ld * sizeof(T));
    const int64_t hg_at = carve(bytes, a.batch * a.m * a.ld * sizeof(T));
    const int64_t gram_at = carve(bytes, a.batch * a.m * a.m * sizeof(double));
    const int64_t weights_at = carve(bytes, a.batch * kMaxHistory * sizeof(double));
    at::Tensor scratch = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
    char* base = static_cast<char*>(scratch.data_ptr());
    a.hist_f = reinterpret_cast<T*>(base + hf_at);
    a.hist_g = reinterpret_cast<T*>(base + hg_at);
    a.gram = reinterpret_cast<double*>(base + gram_at);
    a.weights = reinterpret_cast<double*>(base + weights_at);
    return scratch;
  }

  // After y = x @ packed: T(x), the new pair into the ring buffer and the new row of the Gram matrix. Returns the
  // relative residual.
  template <typename TILE, typename ARGS>
  static DEQKERN_ALWAYS_INLINE typename ARGS::T record(const ARGS& a, int64_t row, int64_t k) {
    using T = typename ARGS::T;
    using V = typename VecOf<T, TILE::kBytes>::type;
    apply_map(a, row);
    const int64_t n_vec = padded_vectors<T, TILE>(a.d);
    const int m = a.m;
    const int slot = static_cast<int>((k - 1) % m);
    const int n = static_cast<int>(std::min<int64_t>(k, m));
    T* hf = a.hist_f + row * m * a.ld;
    T* hg = a.hist_g + row * m * a.ld;
    // The new pair into the ring buffer, with the squared norms of g and T(x) in the same pass.
    V* __restrict fs = reinterpret_cast<V*>(hf + slot * a.ld);
    V* __restrict gs = reinterpret_cast<V*>(hg + slot * a.ld);
    const V* xv = reinterpret_cast<const V*>(a.x + row * a.ld);
    const V* tv = reinterpret_cast<const V*>(a.y + row * a.ld);
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
    if (!(std::isfinite(diff_sq) && std::isfinite(t_sq)))  // overflowed (or a non-finite entry): redo in float64
      return static_cast<T>(wide_relative_residual(a.y + row * a.ld, a.x + row * a.ld, a.d));
    return relative_residual(diff_sq, t_sq);
  }

  // x <- sum_j w_j (x_j + beta g_j) = sum_j w_j T(x_j) - (1 - beta) sum_j w_j g_j, four vectors at a time so that
  // four accumulator chains run side by side; the g history is read only when beta != 1.
  template <typename TILE, typename ARGS>
  static DEQKERN_ALWAYS_INLINE void mix(const ARGS& a, int64_t row, int n) {
    using T = typename ARGS::T;
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

  // Three passes over the active rows: record the new pair (and residual), solve every row's weights (in SIMD lanes
  // across rows), mix the next iterate. Every active row is at step k, so all share n and slot.
  template <typename TILE, typename ARGS>
  static DEQKERN_ALWAYS_INLINE void iterate(const ARGS& a, const int64_t* active, int64_t n_active, int64_t k) {
    const int slot = static_cast<int>((k - 1) % a.m);
    const int n = static_cast<int>(std::min<int64_t>(k, a.m));
    for (int64_t i = 0; i < n_active; ++i) a.residual[active[i]] = record<TILE>(a, active[i], k);
    weights_isa<TILE>(a.gram, a.weights, active, n_active, a.m, n, slot, a.lam);
    for (int64_t i = 0; i < n_active; ++i) mix<TILE>(a, active[i], n);
  }
};

BackwardOutputs anderson_solve(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z,
                               const at::Tensor& grad_z, c10::string_view activation, int64_t m, double beta,
                               double lam, double tol, int64_t max_iter, double jacobian_penalty) {
  const ActivationId id = parse_activation(std::string(activation));
  DenseSolveTensors t(W, c, z, grad_z, jacobian_penalty);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "deqkern_fixed_point_dense_anderson_cpu", [&] {
    AndersonArgs<scalar_t> args;
    t.fill(args, id, tol, max_iter);
    set_anderson_options(args, m, beta, lam);
    run_dense_solve<AndersonMethod>(args, t);
  });
  return t.backward_outputs();
}

SolveOutputs fixed_point_dense_anderson_cpu(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z0,
                                            c10::string_view activation, int64_t m, double beta, double lam,
                                            double tol, int64_t max_iter) {
  check_dense_solve_args("fixed_point_dense_anderson", W, {c, z0}, tol, max_iter);
  check_anderson_options("fixed_point_dense_anderson", m, beta, lam);
  return forward_outputs(solve_in_accumulation_dtype(W, c, z0, at::Tensor(), [&](const auto&... wide) {
    return anderson_solve(wide..., activation, m, beta, lam, tol, max_iter, 0.0);
  }));
}

BackwardOutputs fixed_point_dense_anderson_backward_cpu(const at::Tensor& W, const at::Tensor& c,
                                                        const at::Tensor& z, const at::Tensor& grad_z,
                                                        c10::string_view activation, int64_t m, double beta,
                                                        double lam, double tol, int64_t max_iter,
                                                        double jacobian_penalty) {
  check_dense_solve_args("fixed_point_dense_anderson_backward", W, {c, z, grad_z}, tol, max_iter);
  check_anderson_options("fixed_point_dense_anderson_backward", m, beta, lam);
  check_jacobian_penalty("fixed_point_dense_anderson_backward", jacobian_penalty);
  return solve_in_accumulation_dtype(W, c, z, grad_z, [&](const auto&... wide) {
    return anderson_solve(wide..., activation, m, beta, lam, tol, max_iter, jacobian_penalty);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(deqkern, CPU, m) {
  m.impl("fixed_point_dense_anderson", &fixed_point_dense_anderson_cpu);
  m.impl("fixed_point_dense_anderson_backward", &fixed_point_dense_anderson_backward_cpu);
}

}  // namespace deqkern

// CPU kernel of anderson_step: one type-II Anderson iteration for every active sample, in place
// (schema in csrc/ops.cpp, semantics in deqkern/reference.py: anderson_step_ref).
//
// Samples are split between threads (at::parallel_for); each sample is independent. Per active sample: one fused
// pass stores x and g = f(x) - x in history slot k % m and accumulates ||g||^2 and ||f(x)||^2; then the ONE new
// row/column of the persistent Gram matrix H is computed (nh - 1 dot products: O(m n), not the O(m^2 n) of a
// rebuild); the small system is solved on the stack in the accumulation type; one more pass mixes
// x_next = sum_i a_i (x_i + beta g_i). float / double passes use GCC vector extensions compiled for AVX-512,
// AVX2+FMA and the baseline ISA and picked at run time; half / bfloat16 run scalar loops with float accumulation.
// The kernel allocates nothing (a non-contiguous x or f(x) is made contiguous before it runs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "solver_checks.h"

namespace deqkern {
namespace {

using cpu::kResidualEps;
using cpu::VecOf;
constexpr int kMaxHistory = 32;  // MAX_HISTORY in deqkern/solvers.py: the stack arrays below

template <typename T, typename A>
struct StepArgs {
  T* X;           // (B, m, n) history of iterates
  T* G;           // (B, m, n) history of residuals g = f(x) - x
  A* H;           // (B, m, m) Gram matrix of G
  const T* x;     // (B, n)
  const T* fx;    // (B, n)
  T* x_next;      // (B, n)
  T* z_best;      // (B, n)
  A* residual_best;
  A* residual;
  bool* active;
  int32_t* iterations;
  int64_t n, m, k;
  A beta, lam, tol;
};

// Mixing weights a = (H + reg I)^{-1} 1 / (1^T (H + reg I)^{-1} 1), reg = lam * trace(H) / nh: the solution of the
// bordered system [0 1^T; 1 H + reg I] [nu; a] = [1; 0] by its Schur complement. Gauss-Jordan without pivoting,
// which is stable because H + reg I is symmetric positive definite. False when the system is numerically singular.
template <typename A>
bool mixing_weights(const A* H, int64_t m, int nh, A lam, A* a) {
  A M[kMaxHistory][kMaxHistory];
  A w[kMaxHistory];
  A trace = 0;
  for (int i = 0; i < nh; ++i) trace += H[i * m + i];
  const A reg = lam * trace / A(nh);
  for (int i = 0; i < nh; ++i) {
    for (int j = 0; j < nh; ++j) M[i][j] = H[i * m + j] + (i == j ? reg : A(0));
    w[i] = 1;
  }
  for (int p = 0; p < nh; ++p) {
    const A pivot = M[p][p];
    if (!(pivot > A(0))) return false;
    for (int r = 0; r < nh; ++r) {
      if (r == p) continue;
      const A factor = M[r][p] / pivot;
      for (int j = p; j < nh; ++j) M[r][j] -= factor * M[p][j];
      w[r] -= factor * w[p];
    }
  }
  A sum = 0;
  for (int i = 0; i < nh; ++i) {
    w[i] /= M[i][i];
    sum += w[i];
  }
  if (!std::isfinite(sum) || sum == A(0)) return false;
  for (int i = 0; i < nh; ++i) {
    a[i] = w[i] / sum;
    if (!std::isfinite(a[i])) return false;
  }
  return true;
}

// Pass 1: X[slot] = x, G[slot] = g = fx - x (rounded to T), returns ||g||^2 and ||fx||^2 (unrounded g).
template <typename T, typename A, int BYTES>
DEQKERN_ALWAYS_INLINE void store_and_norms(const T* x, const T* fx, T* Xs, T* Gs, int64_t n, A& sq_g, A& sq_f) {
  int64_t i = 0;
  sq_g = 0;
  sq_f = 0;
  if constexpr (BYTES > 0) {
    using V = typename VecOf<T, BYTES>::type;
    constexpr int64_t L = BYTES / sizeof(T);
    V vg{}, vf{};
    for (; i + L <= n; i += L) {
      const V xv = *reinterpret_cast<const V*>(x + i);
      const V fv = *reinterpret_cast<const V*>(fx + i);
      const V gv = fv - xv;
      *reinterpret_cast<V*>(Xs + i) = xv;
      *reinterpret_cast<V*>(Gs + i) = gv;
      vg += gv * gv;
      vf += fv * fv;
    }
    sq_g = cpu::horizontal_sum<T, BYTES>(vg);
    sq_f = cpu::horizontal_sum<T, BYTES>(vf);
  }
  for (; i < n; ++i) {
    const A xv = A(x[i]), fv = A(fx[i]), gv = fv - xv;
    Xs[i] = x[i];
    Gs[i] = T(gv);
    sq_g += gv * gv;
    sq_f += fv * fv;
  }
}

template <typename T, typename A, int BYTES>
DEQKERN_ALWAYS_INLINE A dot(const T* u, const T* v, int64_t n) {
  int64_t i = 0;
  A s = 0;
  if constexpr (BYTES > 0) {
    using V = typename VecOf<T, BYTES>::type;
    constexpr int64_t L = BYTES / sizeof(T);
    V acc[4] = {};  // four independent chains: one would wait on the FMA latency every vector
    for (; i + 4 * L <= n; i += 4 * L)
      for (int u4 = 0; u4 < 4; ++u4)
        acc[u4] += *reinterpret_cast<const V*>(u + i + u4 * L) * *reinterpret_cast<const V*>(v + i + u4 * L);
    for (; i + L <= n; i += L) acc[0] += *reinterpret_cast<const V*>(u + i) * *reinterpret_cast<const V*>(v + i);
    s = cpu::horizontal_sum<T, BYTES>((acc[0] + acc[1]) + (acc[2] + acc[3]));
  }
  for (; i < n; ++i) s += A(u[i]) * A(v[i]);
  return s;
}

// out = sum_j ca[j] X[j] + cb[j] G[j], j < nh; four vectors at a time so that four accumulator chains run side by
// side.
template <typename T, typename A, int BYTES>
DEQKERN_ALWAYS_INLINE void mix(const T* X, const T* G, const A* ca, const A* cb, int nh, int64_t n, T* out) {
  int64_t i = 0;
  if constexpr (BYTES > 0) {
    using V = typename VecOf<T, BYTES>::type;
    constexpr int64_t L = BYTES / sizeof(T);
    for (; i + 4 * L <= n; i += 4 * L) {
      V s[4] = {};
      for (int j = 0; j < nh; ++j) {
        const V* x = reinterpret_cast<const V*>(X + j * n + i);
        const V* g = reinterpret_cast<const V*>(G + j * n + i);
        for (int u = 0; u < 4; ++u) s[u] += ca[j] * x[u] + cb[j] * g[u];
      }
      for (int u = 0; u < 4; ++u) reinterpret_cast<V*>(out + i)[u] = s[u];
    }
    for (; i + L <= n; i += L) {
      V s{};
      for (int j = 0; j < nh; ++j)
        s += ca[j] * *reinterpret_cast<const V*>(X + j * n + i) + cb[j] * *reinterpret_cast<const V*>(G + j * n + i);
      *reinterpret_cast<V*>(out + i) = s;
    }
  }
  for (; i < n; ++i) {
    A s = 0;
    for (int j = 0; j < nh; ++j) s += ca[j] * A(X[j * n + i]) + cb[j] * A(G[j * n + i]);
    out[i] = T(s);
  }
}

template <typename T, typename A, int BYTES>
DEQKERN_ALWAYS_INLINE void step_rows(const StepArgs<T, A>& p, int64_t begin, int64_t end) {
  const int64_t n = p.n, m = p.m;
  const int slot = static_cast<int>(p.k % m);
  const int nh = static_cast<int>(std::min<int64_t>(p.k + 1, m));
  for (int64_t b = begin; b < end; ++b) {
    const T* x = p.x + b * n;
    T* x_next = p.x_next + b * n;
    if (!p.active[b]) {
      std::memcpy(x_next, x, n * sizeof(T));
      continue;
    }
    const T* fx = p.fx + b * n;
    T* X = p.X + b * m * n;
    T* G = p.G + b * m * n;
    A sq_g, sq_f;
    store_and_norms<T, A, BYTES>(x, fx, X + slot * n, G + slot * n, n, sq_g, sq_f);
    const A r = std::sqrt(sq_g) / (std::sqrt(sq_f) + A(kResidualEps));
    p.residual[b] = r;
    p.iterations[b] = static_cast<int32_t>(p.k + 1);
    if (std::isnan(p.residual_best[b]) || r < p.residual_best[b]) {
      p.residual_best[b] = r;
      std::memcpy(p.z_best + b * n, fx, n * sizeof(T));
    }
    if (!(r > p.tol) || !std::isfinite(r)) {  // converged, or NaN / Inf: the sample stops here
      p.active[b] = false;
      std::memcpy(x_next, x, n * sizeof(T));
      continue;
    }
    // The new row and column of H, from the stored (rounded) g as the reference does.
    A* H = p.H + b * m * m;
    const T* g = G + slot * n;
    for (int j = 0; j < nh; ++j) {
      const A h = j == slot ? dot<T, A, BYTES>(g, g, n) : dot<T, A, BYTES>(g, G + j * n, n);
      H[slot * m + j] = h;
      H[j * m + slot] = h;
    }
    A a[kMaxHistory], ab[kMaxHistory];
    if (!mixing_weights<A>(H, m, nh, p.lam, a)) {  // singular: a plain damped step from x
      for (int j = 0; j < nh; ++j) a[j] = j == slot ? A(1) : A(0);
    }
    for (int j = 0; j < nh; ++j) ab[j] = a[j] * p.beta;
    mix<T, A, BYTES>(X, G, a, ab, nh, n, x_next);
  }
}

template <typename T, typename A>
void step_rows_dispatch(const StepArgs<T, A>& p, int64_t begin, int64_t end);

#ifdef DEQKERN_X86_DISPATCH
template <typename T, typename A>
DEQKERN_TARGET_AVX512 void step_rows_avx512(const StepArgs<T, A>& p, int64_t begin, int64_t end) {
  step_rows<T, A, 64>(p, begin, end);
}
template <typename T, typename A>
DEQKERN_TARGET_AVX2 void step_rows_avx2(const StepArgs<T, A>& p, int64_t begin, int64_t end) {
  step_rows<T, A, 32>(p, begin, end);
}
#endif

// float / double: the widest instruction set this CPU has, asked once; half types: scalar loops.
template <typename T, typename A>
void step_rows_dispatch(const StepArgs<T, A>& p, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
#ifdef DEQKERN_X86_DISPATCH
    const int isa = cpu::cpu_isa();
    if (isa == 2) return step_rows_avx512<T, A>(p, begin, end);
    if (isa == 1) return step_rows_avx2<T, A>(p, begin, end);
#endif
    step_rows<T, A, 16>(p, begin, end);
  } else {
    step_rows<T, A, 0>(p, begin, end);
  }
}

void anderson_step_cpu(const at::Tensor& X_hist, const at::Tensor& G_hist, const at::Tensor& H,
                       const at::Tensor& x_in, const at::Tensor& fx_in, const at::Tensor& x_next,
                       const at::Tensor& z_best, const at::Tensor& residual_best, const at::Tensor& residual,
                       const at::Tensor& active, const at::Tensor& iterations, int64_t k, double beta, double lam,
                       double tol) {
  check_anderson_step_args(X_hist, G_hist, H, x_in, fx_in, x_next, z_best, residual_best, residual, active,
                           iterations, k, lam, kMaxHistory);
  const at::Tensor x = x_in.contiguous(), fx = fx_in.contiguous();
  const int64_t B = X_hist.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X_hist.scalar_type(), "deqkern_anderson_step_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    StepArgs<T, A> p{};
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
    p.n = X_hist.size(2);
    p.m = X_hist.size(1);
    p.k = k;
    p.beta = A(beta);
    p.lam = A(lam);
    p.tol = A(tol);
    // Small problems stay on one thread: a parallel region costs more than a step of a few kB.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.m * p.n));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) { step_rows_dispatch<T, A>(p, begin, end); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(deqkern, CPU, m) { m.impl("anderson_step", &anderson_step_cpu); }

}  // namespace deqkern

// CPU kernel of anderson_step: one type-II Anderson iteration for every active sample, in place
// (schema: anderson_step.cpp, semantics: deqkern/reference/anderson_step.py).
//
// Samples are split between threads (at::parallel_for); each sample is independent. Per active sample: one fused
// pass stores x and g = f(x) - x in history slot k % m and accumulates ||g||^2 and ||f(x)||^2; then the ONE new
// row/column of the persistent Gram matrix H is computed (nh - 1 dot products: O(m n), not the O(m^2 n) of a
// rebuild); the weights are solved on the stack in the accumulation type (common/anderson_weights.h); one more pass mixes
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

#include "common/anderson_weights.h"
#include "common/checks.h"
#include "common/cpu/simd.h"
#include "common/params.h"
#include "common/params_from_tensors.h"
#include "common/stop_rule.h"

namespace deqkern {
namespace {

using cpu::VecOf;
constexpr int kMaxHistory = kAndersonMaxHistory;

template <typename T, typename A>
using StepArgs = AndersonStepParams<T, A>;  // x and fx are made contiguous: the loops read p.x + b * n

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
    A r = relative_residual(sq_g, sq_f);
    if (!(std::isfinite(sq_g) && std::isfinite(sq_f)))  // overflowed (or a non-finite entry): redo in float64
      r = static_cast<A>(wide_relative_residual(fx, x, n));
    p.residual[b] = r;
    p.iterations[b] = static_cast<int32_t>(p.k + 1);
    if (std::isnan(p.residual_best[b]) || r < p.residual_best[b]) {
      p.residual_best[b] = r;
      std::memcpy(p.z_best + b * n, fx, n * sizeof(T));
    }
    if (!keeps_iterating(r, p.tol)) {  // converged, or NaN / Inf: the sample stops here
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
    if (!anderson_weights<A, kMaxHistory>(H, static_cast<int>(m), nh, double(p.lam), a)) {  // the plain damped step
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
                           iterations, k, beta, lam, tol);
  const at::Tensor x = x_in.contiguous(), fx = fx_in.contiguous();
  const int64_t B = X_hist.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X_hist.scalar_type(), "deqkern_anderson_step_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const StepArgs<T, A> p = anderson_step_params<T, A>(X_hist, G_hist, H, x, fx, x_next, z_best, residual_best,
                                                        residual, active, iterations, k, beta, lam, tol);
    // Small problems stay on one thread: a parallel region costs more than a step of a few kB.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.m * p.n));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) { step_rows_dispatch<T, A>(p, begin, end); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(deqkern, CPU, m) { m.impl("anderson_step", &anderson_step_cpu); }

}  // namespace deqkern

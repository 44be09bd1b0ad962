// CPU kernels of fixed_point_dense and fixed_point_dense_backward: the whole Picard solve in one call.
// The solve's structure (threads, packing, micro-kernel, active rows, the per-sample contract) is
// common/cpu/dense_solve.h; what Picard adds is one fused pass per row: T(x), the residual norms and the damped
// update x <- (1 - alpha) x + alpha T(x). Semantics: deqkern/reference/fixed_point_dense.py.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>

#include "common/checks.h"
#include "common/cpu/dense_solve.h"

namespace deqkern {
namespace {

using namespace cpu;

struct PicardMethod {
  static constexpr int64_t kRowsPerBlock = 0;  // a thread solves all of its rows together

  template <typename ARGS>
  static at::Tensor allocate(ARGS&) {
    return {};
  }

  // T(x) into y, the residual norms and the damped update of one row; returns its relative residual.
  template <typename TILE, typename ARGS>
  static DEQKERN_ALWAYS_INLINE typename ARGS::T update_row(const ARGS& a, int64_t row) {
    using T = typename ARGS::T;
    apply_map(a, row);
    T* x = a.x + row * a.ld;
    const T* t = a.y + row * a.ld;
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
    T r = relative_residual(diff_sq, t_sq);
    if (!(std::isfinite(diff_sq) && std::isfinite(t_sq)))  // overflowed (or a non-finite entry): redo in float64
      r = static_cast<T>(wide_relative_residual(t, x, a.d));
    if (a.alpha == T(1)) {
      for (i = 0; i < a.d; ++i) x[i] = t[i];
    } else {
      for (i = 0; i < a.d; ++i) x[i] = a.one_minus_alpha * x[i] + a.alpha * t[i];
    }
    return r;
  }

  template <typename TILE, typename ARGS>
  static DEQKERN_ALWAYS_INLINE void iterate(const ARGS& a, const int64_t* active, int64_t n_active, int64_t) {
    for (int64_t i = 0; i < n_active; ++i) a.residual[active[i]] = update_row<TILE>(a, active[i]);
  }
};

// grad_z undefined: the forward solve from z = z0; defined: the adjoint at the fixed point z, with the Jacobian
// penalty of weight jacobian_penalty. float32/float64 data (half data is widened first: solve_in_accumulation_dtype).
BackwardOutputs picard_solve(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z, const at::Tensor& grad_z,
                             c10::string_view activation, double alpha, double tol, int64_t max_iter,
                             double jacobian_penalty) {
  const ActivationId id = parse_activation(std::string(activation));
  DenseSolveTensors t(W, c, z, grad_z, jacobian_penalty);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "deqkern_fixed_point_dense_cpu", [&] {
    CpuDenseArgs<PicardParams<scalar_t>> args;
    t.fill(args, id, tol, max_iter);
    set_picard_options(args, alpha);
    run_dense_solve<PicardMethod>(args, t);
  });
  return t.backward_outputs();
}

SolveOutputs fixed_point_dense_cpu(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z0,
                                   c10::string_view activation, double alpha, double tol, int64_t max_iter) {
  check_dense_solve_args("fixed_point_dense", W, {c, z0}, tol, max_iter);
  check_picard_options("fixed_point_dense", alpha);
  return forward_outputs(solve_in_accumulation_dtype(W, c, z0, at::Tensor(), [&](const auto&... wide) {
    return picard_solve(wide..., activation, alpha, tol, max_iter, 0.0);
  }));
}

BackwardOutputs fixed_point_dense_backward_cpu(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z,
                                               const at::Tensor& grad_z, c10::string_view activation, double alpha,
                                               double tol, int64_t max_iter, double jacobian_penalty) {
  check_dense_solve_args("fixed_point_dense_backward", W, {c, z, grad_z}, tol, max_iter);
  check_picard_options("fixed_point_dense_backward", alpha);
  check_jacobian_penalty("fixed_point_dense_backward", jacobian_penalty);
  return solve_in_accumulation_dtype(W, c, z, grad_z, [&](const auto&... wide) {
    return picard_solve(wide..., activation, alpha, tol, max_iter, jacobian_penalty);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(deqkern, CPU, m) {
  m.impl("fixed_point_dense", &fixed_point_dense_cpu);
  m.impl("fixed_point_dense_backward", &fixed_point_dense_backward_cpu);
}

}  // namespace deqkern

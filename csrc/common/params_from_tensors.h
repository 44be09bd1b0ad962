// The bridge from the ops' tensors to the parameter structs (params.h), shared by the CPU and CUDA launchers: the
// inputs made contiguous (the one contiguity rule, checks.h), the outputs allocated, the pointers and options set.
// Host code only.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <tuple>

#include "common/checks.h"
#include "common/params.h"

namespace deqkern {

using SolveOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// A backward's: SolveOutputs, then the Jacobian penalty's row term (d,) and value (0-dim), both (0,) without one.
using BackwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline SolveOutputs forward_outputs(const BackwardOutputs& o) {
  return {std::get<0>(o), std::get<1>(o), std::get<2>(o), std::get<3>(o)};
}

// The tensors of one dense solve: forward (grad_z undefined) from z = z0, or the adjoint at the fixed point z, with
// the Jacobian penalty of weight penalty_weight (> 0; adjoint only).
struct DenseSolveTensors {
  at::Tensor W, c, z, grad_z;                       // contiguous
  at::Tensor out, iterations, residual, converged;  // (batch, d), (batch,) int32, (batch,), (batch,) bool
  double penalty_weight;
  at::Tensor penalty_rows, penalty;  // adjoint: (d,) and 0-dim with a penalty, else (0,) each; forward: undefined
  // CUDA's penalty buffers (prepare_device_penalty): ||W_i||^2 (d,) and the tiles' column sums (batch, d)
  at::Tensor penalty_row_norms, penalty_column_sums;

  DenseSolveTensors(const at::Tensor& W_in, const at::Tensor& c_in, const at::Tensor& z_in,
                    const at::Tensor& grad_z_in, double penalty_weight_in = 0.0)
      : W(W_in.contiguous()),
        c(c_in.contiguous()),
        z(z_in.contiguous()),
        grad_z(grad_z_in.defined() ? grad_z_in.contiguous() : grad_z_in),
        out(at::empty({c_in.size(0), c_in.size(1)}, c_in.options())),
        iterations(at::empty({c_in.size(0)}, c_in.options().dtype(at::kInt))),
        residual(at::empty({c_in.size(0)}, c_in.options())),
        converged(at::empty({c_in.size(0)}, c_in.options().dtype(at::kBool))),
        penalty_weight(penalty_weight_in) {
    if (!adjoint()) return;  // a forward solve has no penalty outputs: nothing to allocate on its path
    penalty_rows = at::empty({penalised() ? d() : 0}, c.options());
    penalty = penalised() ? at::empty({}, c.options()) : at::empty({0}, c.options());
    if (penalised() && batch() == 0) {  // empty sums
      penalty_rows.zero_();
      penalty.zero_();
    }
  }

  int64_t batch() const { return c.size(0); }
  int64_t d() const { return c.size(1); }
  bool adjoint() const { return grad_z.defined(); }
  bool penalised() const { return penalty_weight > 0; }
  SolveOutputs outputs() const { return {out, iterations, residual, converged}; }
  BackwardOutputs backward_outputs() const {
    return {out, iterations, residual, converged, penalty_rows, penalty};
  }
  // N of P = ||J||_F^2 / N, and the scale 2 w / N of the penalty's gradient terms.
  double penalty_count() const { return double(std::max<int64_t>(batch() * d(), 1)); }
  double penalty_scale() const { return 2.0 * penalty_weight / penalty_count(); }

  // For backends whose tiles cannot sum across the batch themselves (CUDA; Triton's twin is JacobianPenalty in its
  // launcher): an adjoint with a penalty gets ||W_i||^2 into p and zeroed column sums of act'(u)^2 (batch, d), which
  // a tile fills in the row of its first batch row; returns their pointer. finish_penalty then reduces them by ATen
  // on their device into the penalty's outputs (a no-op without them).
  template <typename T>
  T* prepare_device_penalty(DenseSolveParams<T>& p) {
    if (!adjoint() || !penalised()) return nullptr;
    penalty_row_norms = W.square().sum(1);
    penalty_column_sums = at::zeros({batch(), d()}, W.options());
    p.penalty_row_norms = penalty_row_norms.const_data_ptr<T>();
    return penalty_column_sums.mutable_data_ptr<T>();
  }
  void finish_penalty() {
    if (!penalty_column_sums.defined()) return;
    const at::Tensor column = penalty_column_sums.sum(0);
    penalty.copy_(at::dot(column, penalty_row_norms).div_(penalty_count()));
    at::mul_out(penalty_rows, column, penalty_scale());
  }

  // Everything of DenseSolveParams; the method's own options are set by the caller.
  template <typename T>
  void fill(DenseSolveParams<T>& p, ActivationId activation, double tol, int64_t max_iter) const {
    p.W = W.const_data_ptr<T>();
    p.c = c.const_data_ptr<T>();
    p.z = z.const_data_ptr<T>();
    p.grad_z = adjoint() ? grad_z.const_data_ptr<T>() : nullptr;
    p.out = out.mutable_data_ptr<T>();
    p.iterations = iterations.mutable_data_ptr<int32_t>();
    p.residual = residual.mutable_data_ptr<T>();
    p.converged = converged.mutable_data_ptr<bool>();
    p.batch = batch();
    p.d = d();
    p.max_iter = max_iter;
    p.tol = static_cast<T>(tol);
    p.activation = activation;
    p.adjoint = adjoint();
    p.penalty_scale = static_cast<T>(penalised() ? penalty_scale() : 0.0);
  }
};

// A dense solve of half-precision data (float16, bfloat16) on the CPU and CUDA backends: `solve`(W, c, z, grad_z) run
// once on the inputs widened to float32 (the accumulation dtype: iterate, products and residuals in float32), its x
// rounded back to the input dtype (the specification: solved_in_accumulation_dtype in deqkern/reference/common.py).
// The widening is one elementwise pass per input per solve, next to max_iter passes over W. float32 and float64
// data go to `solve` as they are.
// A backward's penalty row term is rounded as x is; its value stays float32.
template <typename SOLVE>
auto solve_in_accumulation_dtype(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z,
                                 const at::Tensor& grad_z, SOLVE&& solve) -> decltype(solve(W, c, z, grad_z)) {
  const at::ScalarType dtype = W.scalar_type();
  if (!is_half_dtype(dtype)) return solve(W, c, z, grad_z);
  const auto widen = [](const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; };
  auto out = solve(widen(W), widen(c), widen(z), widen(grad_z));
  std::get<0>(out) = std::get<0>(out).to(dtype);
  if constexpr (std::tuple_size<decltype(out)>::value == std::tuple_size<BackwardOutputs>::value) {
    if (std::get<4>(out).defined()) std::get<4>(out) = std::get<4>(out).to(dtype);
  }
  return out;
}

template <typename T>
void set_picard_options(PicardParams<T>& p, double alpha) {
  p.alpha = static_cast<T>(alpha);
  p.one_minus_alpha = static_cast<T>(1.0 - alpha);
}

template <typename T>
void set_anderson_options(AndersonParams<T>& p, int64_t m, double beta, double lam) {
  p.m = static_cast<int>(m);
  p.beta = static_cast<T>(beta);
  p.lam = lam;
}

// anderson_step's parameters; x and fx keep their strides (the CPU kernel passes contiguous copies).
template <typename T, typename A = at::opmath_type<T>>
AndersonStepParams<T, A> anderson_step_params(const at::Tensor& X_hist, const at::Tensor& G_hist,
                                              const at::Tensor& H, const at::Tensor& x, const at::Tensor& fx,
                                              const at::Tensor& x_next, const at::Tensor& z_best,
                                              const at::Tensor& residual_best, const at::Tensor& residual,
                                              const at::Tensor& active, const at::Tensor& iterations, int64_t k,
                                              double beta, double lam, double tol) {
  AndersonStepParams<T, A> p;
  p.X = X_hist.mutable_data_ptr<T>();
  p.G = G_hist.mutable_data_ptr<T>();
  p.H = H.mutable_data_ptr<A>();
  p.x = x.const_data_ptr<T>();
  p.fx = fx.const_data_ptr<T>();
  p.x_next = x_next.mutable_data_ptr<T>();
  p.z_best = z_best.mutable_data_ptr<T>();
  p.residual_best = residual_best.mutable_data_ptr<A>();
  p.residual = residual.mutable_data_ptr<A>();
  p.active = active.mutable_data_ptr<bool>();
  p.iterations = iterations.mutable_data_ptr<int32_t>();
  p.batch = X_hist.size(0);
  p.m = X_hist.size(1);
  p.n = X_hist.size(2);
  p.k = k;
  p.stride_x_b = x.stride(0);
  p.stride_x_n = x.stride(1);
  p.stride_f_b = fx.stride(0);
  p.stride_f_n = fx.stride(1);
  p.beta = A(beta);
  p.lam = A(lam);
  p.tol = A(tol);
  return p;
}

// power_iteration's parameters. W and u0 are the matrix and start vectors the kernel reads (the CPU kernel passes
// its zero-padded copies); row_scale undefined: ones.
template <typename T>
PowerIterationParams<T> power_iteration_params(const at::Tensor& W, const at::Tensor& row_scale, const at::Tensor& u0,
                                               const at::Tensor& value, const at::Tensor& u,
                                               const at::Tensor& iterations, const at::Tensor& converged, int64_t m,
                                               int64_t n, bool symmetric, double shift, int64_t max_iter,
                                               double tol) {
  PowerIterationParams<T> p;
  p.W = W.const_data_ptr<T>();
  p.row_scale = row_scale.defined() ? row_scale.const_data_ptr<T>() : nullptr;
  p.u0 = u0.const_data_ptr<T>();
  p.value = value.mutable_data_ptr<T>();
  p.u = u.mutable_data_ptr<T>();
  p.iterations = iterations.mutable_data_ptr<int32_t>();
  p.converged = converged.mutable_data_ptr<bool>();
  p.batch = u0.size(0);
  p.m = m;
  p.n = n;
  p.max_iter = max_iter;
  p.shift = static_cast<T>(shift);
  p.tol = static_cast<T>(tol);
  p.symmetric = symmetric;
  return p;
}

}  // namespace deqkern

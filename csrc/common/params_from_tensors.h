// The bridge from the ops' tensors to the parameter structs (params.h), shared by the CPU and CUDA launchers: the
// inputs made contiguous (the one contiguity rule, checks.h), the outputs allocated, the pointers and options set.
// Host code only.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "common/checks.h"
#include "common/params.h"

namespace deqkern {

using SolveOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The tensors of one dense solve: forward (grad_z undefined) from z = z0, or the adjoint at the fixed point z.
struct DenseSolveTensors {
  at::Tensor W, c, z, grad_z;                       // contiguous
  at::Tensor out, iterations, residual, converged;  // (batch, d), (batch,) int32, (batch,), (batch,) bool

  DenseSolveTensors(const at::Tensor& W_in, const at::Tensor& c_in, const at::Tensor& z_in,
                    const at::Tensor& grad_z_in)
      : W(W_in.contiguous()),
        c(c_in.contiguous()),
        z(z_in.contiguous()),
        grad_z(grad_z_in.defined() ? grad_z_in.contiguous() : grad_z_in),
        out(at::empty({c_in.size(0), c_in.size(1)}, c_in.options())),
        iterations(at::empty({c_in.size(0)}, c_in.options().dtype(at::kInt))),
        residual(at::empty({c_in.size(0)}, c_in.options())),
        converged(at::empty({c_in.size(0)}, c_in.options().dtype(at::kBool))) {}

  int64_t batch() const { return c.size(0); }
  int64_t d() const { return c.size(1); }
  bool adjoint() const { return grad_z.defined(); }
  SolveOutputs outputs() const { return {out, iterations, residual, converged}; }

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
  }
};

// A dense solve of half-precision data (float16, bfloat16) on the CPU and CUDA backends: `solve`(W, c, z, grad_z) run
// once on the inputs widened to float32 (the accumulation dtype: iterate, products and residuals in float32), its x
// rounded back to the input dtype (the specification: solved_in_accumulation_dtype in deqkern/reference/common.py).
// The widening is one elementwise pass per input per solve, next to max_iter passes over W. float32 and float64
// data go to `solve` as they are.
template <typename SOLVE>
SolveOutputs solve_in_accumulation_dtype(const at::Tensor& W, const at::Tensor& c, const at::Tensor& z,
                                         const at::Tensor& grad_z, SOLVE&& solve) {
  const at::ScalarType dtype = W.scalar_type();
  if (!is_half_dtype(dtype)) return solve(W, c, z, grad_z);
  const auto widen = [](const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; };
  SolveOutputs out = solve(widen(W), widen(c), widen(z), widen(grad_z));
  std::get<0>(out) = std::get<0>(out).to(dtype);
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

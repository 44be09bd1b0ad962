// Argument checks of the registered ops, shared by the CPU and CUDA kernels (the public Python functions check user
// input with friendlier messages first; these guard direct calls of torch.ops.deqkern.*, so that bad input never
// reaches a kernel). Messages start with "deqkern.<op>: ".
//
// One contiguity rule for every op and backend: inputs may have any strides (an op copies what its kernel needs
// contiguous); tensors an op writes in place (anderson_step's state) must be contiguous.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/constants.h"

namespace deqkern {

inline bool is_half_dtype(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

// W: (d, d); every batch tensor: (batch, d); one floating dtype (float16/bfloat16/float32/float64) and one device.
inline void check_dense_solve_args(const char* op, const at::Tensor& W, std::initializer_list<at::Tensor> batch_tensors,
                                   double tol, int64_t max_iter) {
  TORCH_CHECK(W.dim() == 2 && W.size(0) == W.size(1), "deqkern.", op, ": W must be square (d, d), got ", W.sizes());
  TORCH_CHECK(W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble || is_half_dtype(W.scalar_type()),
              "deqkern.", op, ": W must be float16, bfloat16, float32 or float64, got ", W.scalar_type());
  for (const at::Tensor& t : batch_tensors) {
    TORCH_CHECK(t.dim() == 2 && t.size(1) == W.size(0), "deqkern.", op, ": expected (batch, ", W.size(0), "), got ",
                t.sizes());
    TORCH_CHECK(t.size(0) == batch_tensors.begin()->size(0), "deqkern.", op, ": batch sizes differ");
    TORCH_CHECK(t.scalar_type() == W.scalar_type(), "deqkern.", op, ": dtypes differ: ", t.scalar_type(), " vs ",
                W.scalar_type());
    TORCH_CHECK(t.device() == W.device(), "deqkern.", op, ": devices differ: ", t.device(), " vs ", W.device());
  }
  TORCH_CHECK(tol > 0.0, "deqkern.", op, ": tol must be > 0, got ", tol);
  TORCH_CHECK(max_iter >= 1 && max_iter <= INT32_MAX, "deqkern.", op, ": max_iter must be in [1, 2^31 - 1], got ",
              max_iter);
}

inline void check_picard_options(const char* op, double alpha) {
  TORCH_CHECK(alpha > 0.0 && alpha <= 1.0, "deqkern.", op, ": alpha must be in (0, 1], got ", alpha);
}

// Anderson: history m in [1, kAndersonMaxHistory], mixing beta in (0, 1], regulariser lam >= 0.
inline void check_anderson_options(const char* op, int64_t m, double beta, double lam) {
  TORCH_CHECK(m >= 1 && m <= kAndersonMaxHistory, "deqkern.", op, ": m (Anderson history) must be in [1, ",
              kAndersonMaxHistory, "], got ", m);
  TORCH_CHECK(beta > 0.0 && beta <= 1.0, "deqkern.", op, ": beta must be in (0, 1], got ", beta);
  TORCH_CHECK(lam >= 0.0 && std::isfinite(lam), "deqkern.", op, ": lam must be finite and >= 0, got ", lam);
}

// A backward's Jacobian penalty weight: finite and >= 0 (0: none).
inline void check_jacobian_penalty(const char* op, double weight) {
  TORCH_CHECK(weight >= 0.0 && std::isfinite(weight), "deqkern.", op,
              ": jacobian_penalty must be finite and >= 0, got ", weight);
}

// power_iteration's mode: "gram" (false) or "symmetric" (true).
inline bool is_symmetric_power_mode(c10::string_view mode) {
  TORCH_CHECK(mode == "gram" || mode == "symmetric", "deqkern.power_iteration: unknown mode '", std::string(mode),
              "' (expected 'gram' or 'symmetric')");
  return mode == "symmetric";
}

// power_iteration: W (m, n), u0 (batch, n), row_scale (batch, m) or none.
inline void check_power_iteration_args(const at::Tensor& W, const c10::optional<at::Tensor>& row_scale,
                                       const at::Tensor& u0, bool symmetric, double shift, int64_t max_iter,
                                       double tol) {
  TORCH_CHECK(W.dim() == 2 && W.size(0) >= 1 && W.size(1) >= 1,
              "deqkern.power_iteration: W must be a non-empty (m, n) matrix, got ", W.sizes());
  // The kernels index a row or column of W with int (a wider one would be truncated, not refused).
  TORCH_CHECK(W.size(0) <= INT32_MAX && W.size(1) <= INT32_MAX,
              "deqkern.power_iteration: W's dimensions must be at most 2^31 - 1, got ", W.sizes());
  TORCH_CHECK(W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble,
              "deqkern.power_iteration: W must be float32 or float64, got ", W.scalar_type());
  TORCH_CHECK(!symmetric || W.size(0) == W.size(1), "deqkern.power_iteration: mode 'symmetric' needs a square W, got ",
              W.sizes());
  TORCH_CHECK(u0.dim() == 2 && u0.size(1) == W.size(1), "deqkern.power_iteration: u0 must be (batch, ", W.size(1),
              "), got ", u0.sizes());
  TORCH_CHECK(u0.scalar_type() == W.scalar_type(), "deqkern.power_iteration: dtypes differ: u0 ", u0.scalar_type(),
              " vs W ", W.scalar_type());
  TORCH_CHECK(u0.device() == W.device(), "deqkern.power_iteration: devices differ: u0 ", u0.device(), " vs W ",
              W.device());
  if (row_scale.has_value() && row_scale->defined()) {
    const at::Tensor& s = *row_scale;
    TORCH_CHECK(s.dim() == 2 && s.size(0) == u0.size(0) && s.size(1) == W.size(0),
                "deqkern.power_iteration: row_scale must be (batch, ", W.size(0), ") = (", u0.size(0), ", ", W.size(0),
                "), got ", s.sizes());
    TORCH_CHECK(s.scalar_type() == W.scalar_type(), "deqkern.power_iteration: dtypes differ: row_scale ",
                s.scalar_type(), " vs W ", W.scalar_type());
    TORCH_CHECK(s.device() == W.device(), "deqkern.power_iteration: devices differ: row_scale ", s.device(), " vs W ",
                W.device());
  }
  TORCH_CHECK(std::isfinite(shift), "deqkern.power_iteration: shift must be finite, got ", shift);
  TORCH_CHECK(tol > 0.0, "deqkern.power_iteration: tol must be > 0, got ", tol);
  TORCH_CHECK(max_iter >= 1 && max_iter <= INT32_MAX, "deqkern.power_iteration: max_iter must be in [1, 2^31 - 1], got ",
              max_iter);
}

// anderson_step: the ring buffers, Gram matrix and per-sample state it updates in place (deqkern/solvers/generic.py).
inline void check_anderson_step_args(const at::Tensor& X_hist, const at::Tensor& G_hist, const at::Tensor& H,
                                     const at::Tensor& x, const at::Tensor& fx, const at::Tensor& x_next,
                                     const at::Tensor& z_best, const at::Tensor& residual_best,
                                     const at::Tensor& residual, const at::Tensor& active,
                                     const at::Tensor& iterations, int64_t k, double beta, double lam, double tol) {
  TORCH_CHECK(X_hist.dim() == 3, "deqkern.anderson_step: X_hist must be (B, m, n), got ", X_hist.sizes());
  const int64_t B = X_hist.size(0), m = X_hist.size(1), n = X_hist.size(2);
  TORCH_CHECK(m >= 1 && m <= kAndersonMaxHistory, "deqkern.anderson_step: history m must be in [1, ",
              kAndersonMaxHistory, "], got ", m);
  TORCH_CHECK(k >= 0, "deqkern.anderson_step: k must be >= 0, got ", k);
  TORCH_CHECK(beta > 0.0 && beta <= 1.0, "deqkern.anderson_step: beta must be in (0, 1], got ", beta);
  TORCH_CHECK(lam >= 0 && std::isfinite(lam), "deqkern.anderson_step: lam must be finite and >= 0, got ", lam);
  TORCH_CHECK(tol > 0.0, "deqkern.anderson_step: tol must be > 0, got ", tol);
  const auto dtype = X_hist.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "deqkern.anderson_step: X_hist must be a floating dtype, got ", dtype);
  const auto acc = at::toOpMathType(dtype);
  struct Spec {
    const char* name;
    const at::Tensor* t;
    std::vector<int64_t> shape;
    at::ScalarType dtype;
    bool written;  // updated in place: must be contiguous
  };
  const Spec specs[] = {
      {"X_hist", &X_hist, {B, m, n}, dtype, true}, {"G_hist", &G_hist, {B, m, n}, dtype, true},
      {"H", &H, {B, m, m}, acc, true},            {"x", &x, {B, n}, dtype, false},
      {"fx", &fx, {B, n}, dtype, false},           {"x_next", &x_next, {B, n}, dtype, true},
      {"z_best", &z_best, {B, n}, dtype, true},    {"residual_best", &residual_best, {B}, acc, true},
      {"residual", &residual, {B}, acc, true},     {"active", &active, {B}, at::kBool, true},
      {"iterations", &iterations, {B}, at::kInt, true}};
  for (const Spec& s : specs) {
    TORCH_CHECK(s.t->sizes() == at::IntArrayRef(s.shape), "deqkern.anderson_step: ", s.name, " must have shape ",
                at::IntArrayRef(s.shape), ", got ", s.t->sizes());
    TORCH_CHECK(s.t->scalar_type() == s.dtype, "deqkern.anderson_step: ", s.name, " must be ", s.dtype, ", got ",
                s.t->scalar_type());
    TORCH_CHECK(s.t->device() == X_hist.device(), "deqkern.anderson_step: ", s.name, " is on ", s.t->device(),
                " but X_hist is on ", X_hist.device());
    TORCH_CHECK(!s.written || s.t->is_contiguous(), "deqkern.anderson_step: ", s.name,
                " is updated in place and must be contiguous");
  }
}

}  // namespace deqkern

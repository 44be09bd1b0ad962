// The parameter structs of the kernels, shared by the CPU and CUDA builds. Every dense solve (Picard or Anderson,
// forward or adjoint, any device) is a DenseSolveParams; the methods extend it with their options and each backend
// extends those with its own scratch (CpuDenseArgs in cpu/dense_solve.h, the CUDA launchers' structs).
#pragma once

#include <cstdint>

#include "activations.h"

namespace deqkern {

// forward: x <- T(x) = act(x W^T + c) from x = z (the start z0);
// adjoint (the implicit backward): x <- T(x) = s * (x W + grad_z) from x = 0, s = act'(z W^T + c) at the fixed point z.
template <typename T>
struct DenseSolveParams {
  using Scalar = T;
  const T* W = nullptr;           // (d, d), row-major
  const T* c = nullptr;           // (batch, d)
  const T* z = nullptr;           // (batch, d): forward the start z0, adjoint the fixed point z
  const T* grad_z = nullptr;      // (batch, d): adjoint only
  T* out = nullptr;               // (batch, d): the last iterate
  int32_t* iterations = nullptr;  // (batch,) evaluations of T
  T* residual = nullptr;          // (batch,) the last relative residual (stop_rule.h)
  bool* converged = nullptr;      // (batch,)
  int64_t batch = 0, d = 0, max_iter = 0;
  T tol = 0;
  ActivationId activation = ActivationId::Identity;
  bool adjoint = false;
  // The adjoint's exact Jacobian penalty (jacobian_penalty = w > 0; null: none; the specification:
  // with_jacobian_penalty in deqkern/reference/common.py): out gains penalty_scale act'(u) act''(u) ||W_i||^2 where s
  // is computed, and the backend sums act'(u)^2 over the batch per column for the row term and the value.
  const T* penalty_row_norms = nullptr;  // (d,) ||W_i||^2
  T penalty_scale = 0;                   // 2 w / N, N = max(batch * d, 1)
};

// Picard: x <- (1 - alpha) x + alpha T(x). one_minus_alpha is rounded from the double 1 - alpha, as the reference's
// (1 - alpha) * x is.
template <typename T>
struct PicardParams : DenseSolveParams<T> {
  T alpha = 1, one_minus_alpha = 0;
};

// Anderson: x <- sum_i a_i (x_i + beta g_i) over the last m pairs, weights from anderson_weights.h with regulariser lam.
template <typename T>
struct AndersonParams : DenseSolveParams<T> {
  int m = 1;
  T beta = 1;
  double lam = 0;
};

// anderson_step: one Anderson iteration of deqkern.solve, in place on the caller's state (csrc/anderson_step).
// A is the accumulation type (float for half and float states, double for double).
template <typename T, typename A>
struct AndersonStepParams {
  T* X = nullptr;               // (batch, m, n) history of iterates
  T* G = nullptr;               // (batch, m, n) history of residuals g = f(x) - x
  A* H = nullptr;               // (batch, m, m) their Gram matrix
  const T* x = nullptr;         // (batch, n), strides below
  const T* fx = nullptr;        // (batch, n), strides below
  T* x_next = nullptr;          // (batch, n)
  T* z_best = nullptr;          // (batch, n)
  A* residual_best = nullptr;   // (batch,)
  A* residual = nullptr;        // (batch,)
  bool* active = nullptr;       // (batch,)
  int32_t* iterations = nullptr;  // (batch,)
  int64_t batch = 0, n = 0, m = 1, k = 0;
  int64_t stride_x_b = 0, stride_x_n = 1, stride_f_b = 0, stride_f_n = 1;
  A beta = 1, lam = 0, tol = 0;
};

// power_iteration on J_b = diag(row_scale_b) W (csrc/power_iteration).
template <typename T>
struct PowerIterationParams {
  const T* W = nullptr;          // (m, n), row-major
  const T* row_scale = nullptr;  // (batch, m), or null for ones
  const T* u0 = nullptr;         // (batch, n)
  T* value = nullptr;            // (batch,)
  T* u = nullptr;                // (batch, n)
  int32_t* iterations = nullptr;
  bool* converged = nullptr;
  int64_t batch = 0, m = 0, n = 0, max_iter = 0;
  T shift = 0, tol = 0;
  bool symmetric = false;
};

}  // namespace deqkern

// Schemas of fixed_point_dense and its implicit backward. Kernels: fixed_point_dense_cpu.cpp,
// fixed_point_dense_cuda.cu, triton_kernels/fixed_point_dense.py; specification: deqkern/reference/fixed_point_dense.py;
// fake kernels: deqkern/ops/fixed_point_dense.py; autograd: deqkern/solvers/dense.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(deqkern, m) {
  // One op per solve. Picard iteration z <- (1 - alpha) z + alpha act(z W^T + c), per-sample stopping on the
  // relative residual; returns (z, iterations int32, residual, converged bool).
  m.def(
      "fixed_point_dense(Tensor W, Tensor c, Tensor z0, str activation, float alpha, float tol, int max_iter)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // The implicit backward at the fixed point z: solves grad_u = s * (grad_u W + grad_z), s = act'(z W^T + c), from
  // grad_u = 0 by the same damped iteration. jacobian_penalty = w > 0 adds w times the exact Jacobian penalty's
  // gradient to grad_u, computed with s (the specification: with_jacobian_penalty, deqkern/reference/common.py).
  // Returns (grad_u, iterations int32, residual, converged bool, the penalty's row term (d,), its value (0-dim)); the
  // last two are (0,) without a penalty.
  m.def(
      "fixed_point_dense_backward(Tensor W, Tensor c, Tensor z, Tensor grad_z, str activation, float alpha,"
      " float tol, int max_iter, float jacobian_penalty=0.) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// Operator schemas of deqkern, declared once; each device file registers its kernels with
// TORCH_LIBRARY_IMPL(deqkern, CPU|CUDA, m). Fake (meta) kernels and autograd live in deqkern/ops.py.
#include <Python.h>

#include <torch/library.h>

extern "C" {
// `import deqkern._C` loads this library, which runs the TORCH_LIBRARY static initialisers below.
// The module itself is empty: everything is reached through torch.ops.deqkern.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(deqkern, m) {
  // One op per solve. Picard iteration z <- (1 - alpha) z + alpha act(z W^T + c), per-sample stopping on the
  // relative residual; returns (z, iterations int32, residual, converged bool). See deqkern/reference.py.
  m.def(
      "fixed_point_dense(Tensor W, Tensor c, Tensor z0, str activation, float alpha, float tol, int max_iter)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // The implicit backward of fixed_point_dense at its fixed point z: solves grad_u = s * (grad_u W + grad_z),
  // s = act'(z W^T + c), from grad_u = 0; returns (grad_u, iterations int32, residual, converged bool).
  m.def(
      "fixed_point_dense_backward(Tensor W, Tensor c, Tensor z, Tensor grad_z, str activation, float alpha,"
      " float tol, int max_iter) -> (Tensor, Tensor, Tensor, Tensor)");
  // One op per power iteration on J_b = diag(row_scale_b) W, batched over start vectors u0 (B, n): mode "gram"
  // gives ||J_b||_2, mode "symmetric" lambda_max((J_b + J_b^T) / 2) (iterating on S_b + shift I). Per-sample
  // stop on the relative change of the value; returns (value, u, iterations int32, converged bool).
  m.def(
      "power_iteration(Tensor W, Tensor? row_scale, Tensor u0, str mode, float shift, int max_iter, float tol)"
      " -> (Tensor value, Tensor u, Tensor iterations, Tensor converged)");
  // One op per solve by type-II Anderson acceleration (history m in [1, 16], mixing beta in (0, 1], regulariser lam
  // relative to the Gram diagonal), same stopping and outputs as fixed_point_dense. See deqkern/reference.py.
  m.def(
      "fixed_point_dense_anderson(Tensor W, Tensor c, Tensor z0, str activation, int m, float beta, float lam,"
      " float tol, int max_iter) -> (Tensor, Tensor, Tensor, Tensor)");
  // The implicit backward of fixed_point_dense_anderson: the adjoint of fixed_point_dense_backward, solved from 0
  // by the same Anderson iteration.
  m.def(
      "fixed_point_dense_anderson_backward(Tensor W, Tensor c, Tensor z, Tensor grad_z, str activation, int m,"
      " float beta, float lam, float tol, int max_iter) -> (Tensor, Tensor, Tensor, Tensor)");
  // One type-II Anderson iteration of deqkern.solve, in place: stores x and g = fx - x in history slot k % m, adds
  // that slot's row/column to the Gram matrix H, solves the small bordered system, writes x_next, the residual,
  // the lowest-residual f(x) so far, active and iterations. Semantics: anderson_step_ref in deqkern/reference.py.
  m.def(
      "anderson_step(Tensor(a!) X_hist, Tensor(b!) G_hist, Tensor(c!) H, Tensor x, Tensor fx, Tensor(d!) x_next,"
      " Tensor(e!) z_best, Tensor(f!) residual_best, Tensor(g!) residual, Tensor(h!) active,"
      " Tensor(i!) iterations, int k, float beta, float lam, float tol) -> ()");
}

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
}

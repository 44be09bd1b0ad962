// Schemas of fixed_point_dense_anderson and its implicit backward. Kernels: fixed_point_dense_anderson_cpu.cpp,
// fixed_point_dense_anderson_cuda.cu, triton_kernels/fixed_point_dense_anderson.py; specification:
// deqkern/reference/fixed_point_dense_anderson.py; fake kernels: deqkern/ops/fixed_point_dense_anderson.py (the
// autograd is fixed_point_dense's).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(deqkern, m) {
  // One op per solve by type-II Anderson acceleration (history m in [1, 16], mixing beta in (0, 1], regulariser lam
  // relative to the Gram diagonal: common/anderson_weights.h), same stopping and outputs as fixed_point_dense.
  m.def(
      "fixed_point_dense_anderson(Tensor W, Tensor c, Tensor z0, str activation, int m, float beta, float lam,"
      " float tol, int max_iter) -> (Tensor, Tensor, Tensor, Tensor)");
  // The implicit backward: fixed_point_dense_backward's adjoint (and Jacobian penalty, and outputs), solved from 0
  // by the same Anderson iteration.
  m.def(
      "fixed_point_dense_anderson_backward(Tensor W, Tensor c, Tensor z, Tensor grad_z, str activation, int m,"
      " float beta, float lam, float tol, int max_iter, float jacobian_penalty=0.)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

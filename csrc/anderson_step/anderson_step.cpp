// Schema of anderson_step, one Anderson iteration of deqkern.solve. Kernels: anderson_step_cpu.cpp,
// anderson_step_cuda.cu, triton_kernels/anderson_step.py; specification: deqkern/reference/anderson_step.py; fake
// kernel: deqkern/ops/anderson_step.py; the driver loop: deqkern/solvers/generic.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(deqkern, m) {
  // In place: stores x and g = fx - x in history slot k % m, adds that slot's row/column to the Gram matrix H, solves
  // for the mixing weights (common/anderson_weights.h), writes x_next, the residual, the lowest-residual f(x) so far,
  // active and iterations.
  m.def(
      "anderson_step(Tensor(a!) X_hist, Tensor(b!) G_hist, Tensor(c!) H, Tensor x, Tensor fx, Tensor(d!) x_next,"
      " Tensor(e!) z_best, Tensor(f!) residual_best, Tensor(g!) residual, Tensor(h!) active,"
      " Tensor(i!) iterations, int k, float beta, float lam, float tol) -> ()");
}

// Schema of power_iteration. Kernels: power_iteration_cpu.cpp, power_iteration_cuda.cu,
// triton_kernels/power_iteration.py; specification: deqkern/reference/power_iteration.py; fake kernel:
// deqkern/ops/power_iteration.py; public functions: deqkern/lipschitz/matrix_norms.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(deqkern, m) {
  // One op per power iteration on J_b = diag(row_scale_b) W, batched over start vectors u0 (B, n): mode "gram" gives
  // ||J_b||_2, mode "symmetric" lambda_max((J_b + J_b^T) / 2) (iterating on S_b + shift I). Per-sample stop on the
  // relative change of the value; returns (value, u, iterations int32, converged bool).
  m.def(
      "power_iteration(Tensor W, Tensor? row_scale, Tensor u0, str mode, float shift, int max_iter, float tol)"
      " -> (Tensor value, Tensor u, Tensor iterations, Tensor converged)");
}

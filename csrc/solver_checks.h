// Argument checks shared by the CPU and CUDA kernels. deqkern/ops.py checks user input with friendlier
// messages first; these guard direct calls of torch.ops.deqkern.* so that bad input never reaches a kernel.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace deqkern {

// W: (d, d); every other tensor: (batch, d); same dtype (float32/float64) and device; contiguous.
inline void check_dense_solve_args(const at::Tensor& W, std::initializer_list<at::Tensor> batch_tensors,
                                   double alpha, double tol, int64_t max_iter) {
  TORCH_CHECK(W.dim() == 2 && W.size(0) == W.size(1), "deqkern: W must be square (d, d), got ", W.sizes());
  TORCH_CHECK(W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble,
              "deqkern: W must be float32 or float64, got ", W.scalar_type());
  TORCH_CHECK(W.is_contiguous(), "deqkern: W must be contiguous");
  for (const at::Tensor& t : batch_tensors) {
    TORCH_CHECK(t.dim() == 2 && t.size(1) == W.size(0), "deqkern: expected (batch, ", W.size(0), "), got ",
                t.sizes());
    TORCH_CHECK(t.size(0) == batch_tensors.begin()->size(0), "deqkern: batch sizes differ");
    TORCH_CHECK(t.scalar_type() == W.scalar_type(), "deqkern: dtypes differ: ", t.scalar_type(), " vs ",
                W.scalar_type());
    TORCH_CHECK(t.device() == W.device(), "deqkern: devices differ: ", t.device(), " vs ", W.device());
    TORCH_CHECK(t.is_contiguous(), "deqkern: inputs must be contiguous");
  }
  TORCH_CHECK(alpha > 0.0 && alpha <= 1.0, "deqkern: alpha must be in (0, 1], got ", alpha);
  TORCH_CHECK(tol > 0.0, "deqkern: tol must be > 0, got ", tol);
  TORCH_CHECK(max_iter >= 1 && max_iter <= INT32_MAX, "deqkern: max_iter must be in [1, 2^31 - 1], got ",
              max_iter);
}

}  // namespace deqkern

// The per-sample contract of every fixed-point solve, written once for every kernel (CPU and CUDA compile this
// header; triton_kernels/common.py and deqkern/reference/common.py state the same rule):
//  - a sample whose inputs are not all finite (its rows of the batch inputs, or any entry of W) is never iterated:
//    it keeps its start, iterations 0, residual NaN (not_iterated_residual), so it is not converged;
//  - evaluation k of the map T gives the relative residual r = ||T(x) - x|| / (||T(x)|| + eps) (relative_residual);
//  - the sample keeps iterating while r > tol and r is finite (keeps_iterating: a NaN residual stops it);
//  - a stopped sample is frozen: its result does not depend on the other samples of the batch;
//  - converged = r <= tol (is_converged: false for NaN).
#pragma once

#include <cmath>
#include <limits>

#include "constants.h"
#include "host_device.h"

namespace deqkern {

using std::isfinite;
using std::sqrt;

template <typename T>
DEQKERN_HOST_DEVICE T relative_residual(T squared_difference, T squared_value) {
  return sqrt(squared_difference) / (sqrt(squared_value) + T(kResidualEps));
}

template <typename T>
DEQKERN_HOST_DEVICE bool keeps_iterating(T residual, T tol) {
  return residual > tol && isfinite(residual);  // NaN > tol is false
}

template <typename T>
DEQKERN_HOST_DEVICE bool is_converged(T residual, T tol) {
  return residual <= tol;
}

template <typename T>
DEQKERN_HOST_DEVICE T not_iterated_residual() {
  return std::numeric_limits<T>::quiet_NaN();
}

}  // namespace deqkern

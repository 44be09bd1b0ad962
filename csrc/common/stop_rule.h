// The per-sample contract of every fixed-point solve, written once for every kernel (CPU and CUDA compile this
// header; triton_kernels/common.py and deqkern/reference/common.py state the same rule):
//  - a sample whose inputs are not all finite (its rows of the batch inputs, or any entry of W) is never iterated:
//    it keeps its start, iterations 0, residual NaN (not_iterated_residual), so it is not converged;
//  - evaluation k of the map T gives the relative residual r = ||T(x) - x|| / (||T(x)|| + eps) (relative_residual),
//    its squared norms summed in float64 for float32 and half data (a kernel may sum in float32 and redo the sum in
//    float64 when that overflows: wide_relative_residual), so that no finite float32 iterate overflows them; a squared
//    norm that is still not finite (float64 iterates beyond ~1e154, or a non-finite entry) makes r NaN, so an
//    overflow is never read as success (inf in ||T(x)||^2 next to a finite difference would give r = 0);
//  - the sample keeps iterating while r > tol and r is finite (keeps_iterating: a NaN residual stops it);
//  - a stopped sample is frozen: its result does not depend on the other samples of the batch;
//  - converged = r <= tol (is_converged: false for NaN).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "constants.h"
#include "host_device.h"

namespace deqkern {

using std::isfinite;
using std::sqrt;

template <typename T>
DEQKERN_HOST_DEVICE T not_iterated_residual() {
  return std::numeric_limits<T>::quiet_NaN();
}

template <typename T>
DEQKERN_HOST_DEVICE T relative_residual(T squared_difference, T squared_value) {
  if (!(isfinite(squared_difference) && isfinite(squared_value))) return not_iterated_residual<T>();
  return sqrt(squared_difference) / (sqrt(squared_value) + T(kResidualEps));
}

// The residual of the row t = T(x) against x, both of length n, summed in float64: a kernel that summed in float32
// calls it when its sums overflowed (rare: every entry near or beyond 1e19), so its result is what float64 sums give.
template <typename T>
DEQKERN_HOST_DEVICE double wide_relative_residual(const T* t, const T* x, int64_t n) {
  double squared_difference = 0.0, squared_value = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double ti = static_cast<double>(t[i]), di = ti - static_cast<double>(x[i]);
    squared_difference += di * di;
    squared_value += ti * ti;
  }
  return relative_residual(squared_difference, squared_value);
}

template <typename T>
DEQKERN_HOST_DEVICE bool keeps_iterating(T residual, T tol) {
  return residual > tol && isfinite(residual);  // NaN > tol is false
}

template <typename T>
DEQKERN_HOST_DEVICE bool is_converged(T residual, T tol) {
  return residual <= tol;
}

}  // namespace deqkern

// The numbers every backend shares, defined once for C++ and CUDA. deqkern/core/constants.py holds the same values
// for Python and Triton; the compiled modules report theirs (deqkern._C.constants()) and tests/test_constants.py
// checks that the two agree.
#pragma once

namespace deqkern {

// The relative residual of every solve: ||f(z) - z|| / (||f(z)|| + kResidualEps) (stop_rule.h).
constexpr double kResidualEps = 1e-12;
// Anderson acceleration: at most this many stored residuals; the small system lives in registers or on the stack.
constexpr int kAndersonMaxHistory = 16;
// The default of the Anderson regulariser, relative to each stored residual's squared norm (anderson_weights.h).
// Only the Python API applies defaults; it is here so that the agreement test covers it.
constexpr double kAndersonDefaultLam = 1e-4;

}  // namespace deqkern

"""The numbers every backend shares, defined once for Python and Triton.

csrc/common/constants.h holds the same values for the C++ and CUDA kernels, and the compiled extensions report what
they were built with (`deqkern._C.constants()`); tests/test_constants.py checks that the two agree.
"""

# The relative residual of every solve: ||f(z) - z|| / (||f(z)|| + RESIDUAL_EPS). The eps only keeps 0 / 0 away
# from a fixed point at 0; it is far below any tolerance a float32 solve can reach.
RESIDUAL_EPS = 1e-12

# Anderson acceleration, the same algorithm in the dense solve and in deqkern.solve's anderson_step: at most this
# many stored residuals (the small system lives in registers / on the stack of the kernels; measured: m beyond 5
# rarely lowers the number of evaluations, see bench/results/anderson_choice.md).
ANDERSON_MAX_HISTORY = 16
ANDERSON_DEFAULT_M = 5
ANDERSON_DEFAULT_BETA = 1.0
# The Tikhonov regulariser of the weights, relative to each stored residual's squared norm (A = G + lam diag(G)).
ANDERSON_DEFAULT_LAM = 1e-4

# The widest d whose rows the Triton dense Anderson solve keeps in registers, with W (compiled for sm_90, 64 spills
# nothing with 8 warps and 128 spills kilobytes in every configuration tried: bench/results/compile_check_sm90.md);
# wider rows go through its scratch kernel.
TRITON_DENSE_ANDERSON_REGISTER_WIDTH = 64

# The methods of the two solves: deqkern.solve (any f) and the fused dense solve.
SOLVE_METHODS = ("anderson", "picard", "broyden")
DENSE_METHODS = ("picard", "anderson")

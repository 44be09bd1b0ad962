"""One module per registered op, all of one shape: its fake kernel(s) (torch.compile, opcheck) and its backends in
the registry (deqkern.core.backends). The autograd and public functions built on them live in deqkern.solvers and
deqkern.lipschitz.

Every op's pieces share its name: csrc/<op>/<op>.cpp (schema), csrc/<op>/<op>_cpu.cpp and <op>_cuda.cu (kernels),
triton_kernels/<op>.py, deqkern/reference/<op>.py, deqkern/ops/<op>.py, tests/test_<op>.py, bench/bench_<op>.py.
"""
from . import anderson_step, fixed_point_dense, fixed_point_dense_anderson, power_iteration

__all__ = ["anderson_step", "fixed_point_dense", "fixed_point_dense_anderson", "power_iteration"]

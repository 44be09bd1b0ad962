"""One module per registered op: its fake kernel(s) (torch.compile, opcheck), its backends in the registry
(deqkern.core.backends) and, for fixed_point_dense, the autograd function and the public function.

Every op's pieces share its name: csrc/<op>/<op>.cpp (schema), csrc/<op>/<op>_cpu.cpp and <op>_cuda.cu (kernels),
triton_kernels/<op>.py, deqkern/reference/<op>.py, deqkern/ops/<op>.py, tests/test_<op>.py, bench/bench_<op>.py.
"""
from . import anderson_step, fixed_point_dense, fixed_point_dense_anderson, power_iteration

__all__ = ["anderson_step", "fixed_point_dense", "fixed_point_dense_anderson", "power_iteration"]

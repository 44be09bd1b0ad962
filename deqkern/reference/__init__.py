"""Pure-PyTorch references: the executable specification of every deqkern op, one module per op.

Every backend (CPU C++, CUDA, Triton) is tested against these functions. They are written for clarity, not speed,
and must never be edited to match a kernel. common.py states the per-sample contract every solve follows,
anderson.py the one Anderson weight solve.
"""
from ..core.constants import ANDERSON_MAX_HISTORY, RESIDUAL_EPS
from .anderson import anderson_weights_ref
from .anderson_step import anderson_step_ref
from .fixed_point_dense import fixed_point_dense_backward_ref, fixed_point_dense_ref
from .fixed_point_dense_anderson import fixed_point_dense_anderson_backward_ref, fixed_point_dense_anderson_ref
from .power_iteration import POWER_ITERATION_MODES, power_iteration_ref

__all__ = [
    "ANDERSON_MAX_HISTORY",
    "POWER_ITERATION_MODES",
    "RESIDUAL_EPS",
    "anderson_step_ref",
    "anderson_weights_ref",
    "fixed_point_dense_anderson_backward_ref",
    "fixed_point_dense_anderson_ref",
    "fixed_point_dense_backward_ref",
    "fixed_point_dense_ref",
    "power_iteration_ref",
]

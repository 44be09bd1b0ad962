"""deqkern: fused, trustworthy deep equilibrium (DEQ) solvers for PyTorch."""
from . import _extension  # noqa: F401  (loads the C++/CUDA kernels first: ops.py registers fakes for them)
from . import nn, reference
from . import jacobian
from .jacobian import jacobian_reg
from .activations import ACTIVATIONS
from .ops import (
    BACKENDS,
    NonConvergenceError,
    NonConvergenceWarning,
    SolverInfo,
    fixed_point_dense,
)
from . import lipschitz  # noqa: E402  (registers the fake kernel of deqkern::power_iteration)
from .solvers import solve  # noqa: E402  (registers the fake kernel of deqkern::anderson_step)
from .torchdeq_compat import register_torchdeq_solvers  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "NonConvergenceError",
    "NonConvergenceWarning",
    "SolverInfo",
    "fixed_point_dense",
    "jacobian",
    "jacobian_reg",
    "nn",
    "reference",
    "register_torchdeq_solvers",
    "solve",
]

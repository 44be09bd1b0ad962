"""deqkern: fused, trustworthy deep equilibrium (DEQ) solvers for PyTorch."""
from . import _extension  # noqa: F401  (loads the C++/CUDA kernels first: ops.py registers fakes for them)
from . import nn, reference
from .activations import ACTIVATIONS
from .ops import (
    BACKENDS,
    NonConvergenceError,
    NonConvergenceWarning,
    SolverInfo,
    fixed_point_dense,
)

__version__ = "0.1.0"
__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "NonConvergenceError",
    "NonConvergenceWarning",
    "SolverInfo",
    "fixed_point_dense",
    "nn",
    "reference",
]

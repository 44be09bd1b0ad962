"""The machinery every deqkern op and solver shares, each rule written once.

- constants: residual eps, Anderson history cap and defaults (csrc/common/constants.h holds the C++ twins);
- dtypes: the solves' dtypes and the accumulation dtype of each;
- errors: NonConvergenceError, NonConvergenceWarning, PowerIterationWarning;
- info: SolverInfo, the per-sample statistics of a solve;
- policy: the one non-convergence policy ("warn" / "raise" / "ignore") of every solver;
- validation: argument checks with one message style;
- backends: backend names, the "auto" rule and the registry op -> {cpu, cuda, triton, reference}.
"""
from . import backends, constants, dtypes, policy, validation
from .errors import NonConvergenceError, NonConvergenceWarning, PowerIterationWarning, SkippedGradientWarning
from .info import SolverInfo

__all__ = ["backends", "constants", "dtypes", "policy", "validation", "NonConvergenceError", "NonConvergenceWarning",
           "PowerIterationWarning", "SkippedGradientWarning", "SolverInfo"]

"""deqkern: fused, trustworthy deep equilibrium (DEQ) solvers for PyTorch."""
from . import _extension  # noqa: F401  (loads the C++/CUDA kernels first: the op modules register fakes for them)
from . import core, reference
from . import ops  # noqa: F401  (fake kernels and backends of every registered op)
from .activations import ACTIVATIONS
from .core.backends import BACKENDS
from .core.errors import NonConvergenceError, NonConvergenceWarning, PowerIterationWarning, SkippedGradientWarning
from .core.info import SolverInfo
from .ops.fixed_point_dense import fixed_point_dense
from . import lipschitz, nn, jacobian  # noqa: E402
from .jacobian import jacobian_reg  # noqa: E402
from .solvers import solve  # noqa: E402
from .torchdeq_compat import register_torchdeq_solvers  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "NonConvergenceError",
    "NonConvergenceWarning",
    "PowerIterationWarning",
    "SkippedGradientWarning",
    "SolverInfo",
    "core",
    "fixed_point_dense",
    "jacobian",
    "jacobian_reg",
    "lipschitz",
    "nn",
    "reference",
    "register_torchdeq_solvers",
    "solve",
]

"""deqkern: fused, trustworthy deep equilibrium (DEQ) solvers for PyTorch."""
from . import _extension  # noqa: F401  (loads the C++/CUDA kernels first: the op modules register fakes for them)
from . import core, reference
from . import ops  # noqa: F401  (fake kernels and backends of every registered op)
from .activations import ACTIVATIONS
from .core.backends import BACKENDS
from .core.errors import NonConvergenceError, NonConvergenceWarning, PowerIterationWarning, SkippedGradientWarning
from .core.info import SolverInfo
from .core.backends import available_backends
from .solvers import fixed_point_dense, solve
from . import lipschitz, jacobian, nn  # noqa: E402  (layers and tools on top of the solves)
from .jacobian import jacobian_reg  # noqa: E402
from .torchdeq_compat import register_torchdeq_solvers  # noqa: E402

__version__ = "0.2.0"
__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "NonConvergenceError",
    "NonConvergenceWarning",
    "PowerIterationWarning",
    "SkippedGradientWarning",
    "SolverInfo",
    "available_backends",
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

"""DEQLinear: the dense implicit layer on the fused solve."""
import math
from typing import Optional

import torch
from torch import nn

from ..activations import get_activation
from ..core.api import api_changes
from ..core.info import SolverInfo
from ..core.validation import check_layer_sizes
from .dense_layer import DenseImplicitLayer, names_its_inputs
from ..solvers.dense import check_dense_options, fixed_point_dense


class DEQLinear(DenseImplicitLayer):
    """Dense implicit layer: x (batch, in_features) -> z* (batch, hidden_features), z* = act(z* W^T + x U^T + b).

    The fixed point is found by one fused solve and differentiated implicitly (constant memory in the number of
    iterations). Solver statistics of the latest call are in `last_info` (`last_info.backward` after backward).
    `weight` is initialised with spectral norm `init_scale` / Lip(act) so that the iteration starts contractive;
    nothing keeps it there during training: watch `last_info.converged` (or use on_nonconvergence="raise"), or
    regularise the Jacobian: jac_reg=w or (w, probability) (see `DenseImplicitLayer.set_jac_reg`).
    Under torch.autocast the solve runs on bfloat16/float16 data with float32 accumulation and returns z* in the
    autocast dtype.
    """

    @api_changes("DEQLinear", old_positional=(
        "activation", "alpha", "tol", "max_iter", "backend", "on_nonconvergence", "backward_tol",
        "backward_max_iter", "init_scale", "device", "dtype", "method", "m", "beta", "jac_reg",
        "on_backward_overflow"))
    def __init__(self, in_features: int, hidden_features: int, *, activation: str = "tanh", alpha: float = 1.0,
                 tol: float = 1e-4, max_iter: int = 100, backend: str = "auto", on_nonconvergence: str = "warn",
                 backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None,
                 init_scale: float = 0.5, method: str = "picard", m: int = 5, beta: float = 1.0, jac_reg=None,
                 on_backward_overflow: str = "raise", device=None, dtype=None):
        super().__init__()
        check_layer_sizes("DEQLinear", in_features, hidden_features)
        check_dense_options("DEQLinear", activation, alpha, tol, max_iter, backend, on_nonconvergence, backward_tol,
                            backward_max_iter, method, m, beta, on_backward_overflow)
        self.set_jac_reg(jac_reg)
        factory = {"device": device, "dtype": dtype}
        self.activation = activation
        self.solver_options = dict(
            activation=activation, alpha=alpha, tol=tol, max_iter=max_iter, backend=backend,
            on_nonconvergence=on_nonconvergence, backward_tol=backward_tol, backward_max_iter=backward_max_iter,
            method=method, m=m, beta=beta, on_backward_overflow=on_backward_overflow,
        )
        self.injection = nn.Linear(in_features, hidden_features, **factory)
        self.weight = nn.Parameter(torch.empty(hidden_features, hidden_features, **factory))
        self.init_scale = init_scale / get_activation(activation).lipschitz
        self.last_info: Optional[SolverInfo] = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.weight.shape[0]))
        self.weight.mul_(self.init_scale / torch.linalg.matrix_norm(self.weight.double(), ord=2).clamp_min(1e-12))
        self.injection.reset_parameters()

    @names_its_inputs
    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        penalty = self.jacobian_penalty_weight()
        W, c, z0 = self.autocast_operands(self.weight, self.injection_values(x), z0)
        z, self.last_info = fixed_point_dense(W, c, z0=z0, jacobian_penalty=penalty, **self.solver_options)
        return z

    def extra_repr(self) -> str:
        return (f"in_features={self.injection.in_features}, hidden_features={self.weight.shape[0]}, "
                f"activation={self.activation!r}")


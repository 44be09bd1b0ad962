"""CertifiedDEQ: the state every certified layer holds (the injection, the unconstrained recurrent weight, the
solver options and the statistics of the latest solve), built in one place; each layer adds its
parameterisation, its `certificate()` and its forward."""
from typing import Optional

import torch
from torch import nn

from ...core.info import SolverInfo
from ...core.validation import check_layer_sizes
from ...solvers.dense import check_dense_options
from ..dense_layer import DenseImplicitLayer
from ._options import solver_options


class CertifiedDEQ(DenseImplicitLayer):
    """Base of the certified layers: x (batch, in) -> z* (batch, hidden) by one fixed_point_dense solve.

    injection: nn.Linear(in_features, hidden_features), x -> x U^T + b; weight_raw: the unconstrained
    (hidden, hidden) parameter the layer maps to its certified W (left uninitialised here: the layer's
    reset_parameters fills it); solver_options: the keyword arguments of its fixed_point_dense call (alpha = 1:
    plain iteration; LinfContractiveDEQ passes its own alpha per call); last_info: the SolverInfo of the latest forward.
    """

    def __init__(self, in_features, hidden_features, activation, tol, max_iter, backend, on_nonconvergence,
                 backward_tol, backward_max_iter, device, dtype, method="picard", m=5, beta=1.0, jac_reg=None,
                 on_backward_overflow="raise"):
        super().__init__()
        what = type(self).__name__
        self.set_jac_reg(jac_reg)
        check_layer_sizes(what, in_features, hidden_features)
        check_dense_options(what, activation, 1.0, tol, max_iter, backend, on_nonconvergence, backward_tol,
                            backward_max_iter, method, m, beta, on_backward_overflow)
        factory = {"device": device, "dtype": dtype}
        self.activation = activation
        self.solver_options = solver_options(activation, 1.0, tol, max_iter, backend, on_nonconvergence,
                                             backward_tol, backward_max_iter, method, m, beta, on_backward_overflow)
        self.injection = nn.Linear(in_features, hidden_features, **factory)
        self.weight_raw = nn.Parameter(torch.empty(hidden_features, hidden_features, **factory))
        self.last_info: Optional[SolverInfo] = None

"""SolverInfo: the per-sample statistics every fixed-point solve returns."""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SolverInfo:
    """Per-sample statistics of one solve.

    iterations: (B,) int32, evaluations of the layer; residual: (B,) relative residual
    ||f(z) - z|| / (||f(z)|| + 1e-12); converged: (B,) bool, residual <= tol. `backward` is filled with the
    statistics of the implicit backward solve once autograd has run it (eager mode only); `trace` holds the
    per-iteration residuals (iterations, B) when the solver was asked for them. `jacobian_penalty` (0-dim) is the
    Jacobian penalty ||J||_F^2 / numel at the fixed point when the solve was asked to add its gradient
    (`jacobian_penalty=` of fixed_point_dense, `jac_reg=` of the layers), filled by the backward.
    `gradient_skipped` (on the backward's info) is True when on_backward_overflow="skip" zeroed the gradients.
    """

    iterations: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None
    converged: Optional[torch.Tensor] = None
    backward: Optional["SolverInfo"] = None
    trace: Optional[torch.Tensor] = None
    jacobian_penalty: Optional[torch.Tensor] = None
    gradient_skipped: bool = False

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
    per-iteration residuals (iterations, B) when the solver was asked for them.
    """

    iterations: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None
    converged: Optional[torch.Tensor] = None
    backward: Optional["SolverInfo"] = None
    trace: Optional[torch.Tensor] = None

"""The l-infinity contractive DEQ (Jafarpour, Davydov, Proskurnikov and Bullo 2021): x = Phi(A x + B u + b) with
mu_inf(A) <= mu < 1 by construction, solved by the averaged iteration that is an l-infinity contraction.

Holds the layer `LinfContractiveDEQ` and its `LinfContractionCertificate`.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..activations import get_activation
from ..lipschitz import linf_norm, one_sided_linf
from ..ops.fixed_point_dense import fixed_point_dense
from ._base import CertifiedDEQ


@dataclass
class LinfContractionCertificate:
    """What a LinfContractiveDEQ guarantees (l-infinity norm throughout).

    mu_inf = max_i (a_ii + sum_{j != i} |a_ij|) (deqkern.lipschitz.one_sided_linf, float64) <= mu < 1.
    alpha = 1 / (1 - min(min_i a_ii, 0)) makes every row of the Jacobian of x -> (1 - alpha) x + alpha Phi(A x + c),
    (1 - alpha) I + alpha D A with D = diag(d_i), d_i in [0, 1], have a nonnegative diagonal, so its l-infinity norm
    is max_i (1 - alpha + alpha d_i (a_ii + sum_{j != i} |a_ij|)) <= contraction_factor = 1 - alpha (1 - mu_+),
    mu_+ = max(mu_inf, 0). The averaged map is Lipschitz in u with constant alpha ||B||_inf, so
    ||x*(u) - x*(u')||_inf <= alpha ||B||_inf / (1 - contraction_factor) ||u - u'||_inf = input_lipschitz_bound.
    The implicit backward iterates (1 - alpha) I + alpha D A^T, which has the spectrum of the transposed Jacobian
    (D A^T and A^T D share eigenvalues): spectral radius <= contraction_factor, so it converges too.
    """

    mu: float
    mu_inf: float
    alpha: float
    contraction_factor: float
    injection_linf_norm: float
    input_lipschitz_bound: float
    activation: str
    guarantee: str


_SLOPE_RESTRICTED = ("relu", "tanh", "sigmoid", "softsign", "relu6", "identity")  # slopes in [0, 1]


class LinfContractiveDEQ(CertifiedDEQ):
    """l-infinity contractive implicit layer: u (batch, in) -> x* (batch, hidden), x* = Phi(A x* + B u + b).

    A = T - diag(|T| 1) + mu I for an unconstrained T (hidden, hidden): row i has
    a_ii + sum_{j != i} |a_ij| = mu + t_ii - |t_ii| <= mu, so mu_inf(A) <= mu < 1 for every T, and every A with
    mu_inf(A) <= mu is reached (t_ij = a_ij off the diagonal, t_ii = (a_ii + sum_{j != i} |a_ij| - mu) / 2).
    Solved by the averaged iteration with alpha* = 1 / (1 - min(min_i a_ii, 0)) (computed from A on each call, one
    host synchronisation). Phi: relu, tanh, sigmoid, softsign, relu6 or identity (slope-restricted in [0, 1]).
    """

    def __init__(self, in_features: int, hidden_features: int, mu: float = 0.5, activation: str = "relu",
                 tol: float = 1e-4, max_iter: int = 100, backend: str = "auto", on_nonconvergence: str = "warn",
                 backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None,
                 init_scale: float = 1.0, device=None, dtype=None):
        get_activation(activation)
        if activation not in _SLOPE_RESTRICTED:
            raise ValueError(f"activation {activation!r} is not slope-restricted in [0, 1]; choose one of "
                             f"{_SLOPE_RESTRICTED}")
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or not mu < 1:
            raise ValueError(f"mu must be a finite number < 1 (the bound on mu_inf(A) that makes the layer an "
                             f"l-infinity contraction), got {mu!r}")
        super().__init__(in_features, hidden_features, activation, tol, max_iter, backend, on_nonconvergence,
                         backward_tol, backward_max_iter, device, dtype)
        self.mu = float(mu)
        self.init_scale = float(init_scale)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        d = self.weight_raw.shape[0]
        # entries ~ N(0, (init_scale / d)^2): row sums of |T| about 0.8 init_scale, so alpha* is close to 1
        nn.init.normal_(self.weight_raw, std=self.init_scale / d)
        self.injection.reset_parameters()

    @staticmethod
    def weight_from(T: torch.Tensor, mu: float) -> torch.Tensor:
        """A = T - diag(|T| 1) + mu I, with mu_inf(A) <= mu."""
        diag = mu - T.abs().sum(dim=1)
        return T + torch.diag_embed(diag)

    @property
    def weight(self) -> torch.Tensor:
        """A, the matrix the solve uses."""
        return self.weight_from(self.weight_raw, self.mu)

    @staticmethod
    def averaging_from(A: torch.Tensor) -> float:
        """alpha* = 1 / (1 - min(min_i a_ii, 0))."""
        return 1.0 / (1.0 - min(float(A.detach().diagonal().min()), 0.0))

    def forward(self, u: torch.Tensor, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        A = self.weight
        options = dict(self.solver_options, alpha=self.averaging_from(A))
        x, self.last_info = fixed_point_dense(A, self.injection(u), z0=x0, **options)
        return x

    @torch.no_grad()
    def certificate(self) -> LinfContractionCertificate:
        A = self.weight_from(self.weight_raw.double(), self.mu)
        mu_inf = float(one_sided_linf(A))
        alpha = self.averaging_from(A)
        mu_plus = max(mu_inf, 0.0)
        b_norm = float(linf_norm(self.injection.weight.double()))
        factor = 1.0 - alpha * (1.0 - mu_plus)
        bound = b_norm / (1.0 - mu_plus) if mu_plus < 1 else math.inf
        return LinfContractionCertificate(
            mu=self.mu, mu_inf=mu_inf, alpha=alpha, contraction_factor=factor, injection_linf_norm=b_norm,
            input_lipschitz_bound=bound, activation=self.activation,
            guarantee=("mu_inf(A) <= mu < 1 and Phi slope-restricted in [0, 1]: unique fixed point; the averaged "
                       f"iteration with alpha = {alpha:.6g} is an l-infinity contraction with factor {factor:.6g} "
                       "from any start (the implicit backward's iteration matrix has the same spectrum as the "
                       "transposed Jacobian: spectral radius <= that factor); ||x*(u) - x*(u')||_inf <= "
                       f"{bound:.6g} ||u - u'||_inf"),
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.injection.in_features}, hidden_features={self.weight_raw.shape[0]}, "
                f"mu={self.mu}, activation={self.activation!r}")

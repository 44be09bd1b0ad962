"""The l-infinity contractive DEQ (Jafarpour, Davydov, Proskurnikov and Bullo 2021): x = Phi(A x + B u + b) with
mu_inf(A) <= mu < 1 by construction, solved by the averaged iteration that is an l-infinity contraction.

Holds the layer `LinfContractiveDEQ` and its `LinfContractionCertificate`.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from ...activations import get_activation
from ...core.api import api_changes
from ...core import validation
from ...lipschitz import linf_norm, one_sided_linf
from ...solvers.dense import fixed_point_dense
from ..dense_layer import names_its_inputs
from ._base import CertifiedDEQ
from .bounds import geometric_steps_to_tol


@dataclass
class LinfContractionCertificate:
    """What a LinfContractiveDEQ guarantees (weighted l-infinity norm ||x||_eta = max_i eta_i |x_i|; eta = 1 unless
    the layer is `weighted`). Floats; `LinfContractiveDEQ.bounds()` gives the same figures as tensors with grad.

    mu_inf = mu_inf(D A D^-1), D = diag(eta) (deqkern.lipschitz.one_sided_linf, float64) <= mu < 1.
    alpha = 1 / (1 - min(min_i a_ii, 0)) makes every row of the Jacobian of x -> (1 - alpha) x + alpha Phi(A x + c),
    (1 - alpha) I + alpha diag(d) A with d_i in [0, 1], have a nonnegative diagonal, so its ||.||_eta-norm is
    <= contraction_factor = 1 - alpha (1 - mu_+), mu_+ = max(mu_inf, 0). The averaged map is Lipschitz in u with
    constant alpha ||D B||_inf, so ||x*(u) - x*(u')||_inf <= input_lipschitz_bound ||u - u'||_inf with
    input_lipschitz_bound = ||D B||_inf / (min_i eta_i (1 - mu_+)) (= ||B||_inf / (1 - mu_+) for eta = 1).
    The implicit backward iterates (1 - alpha) I + alpha A^T diag(d): the transpose, a contraction with the same
    factor in the dual (weighted l1) norm.
    forward_iterations_bound / backward_iterations_bound: evaluations after which the averaged iteration from 0
    has met the solver's stop rule (relative l2 residual <= tol), from ||x_k - x*||_eta <= q^k ||x*||_eta and the
    norm equivalences between ||.||_eta (or its dual) and l2: the smallest k with
    q^(k-1) (kappa (1 + q) + tol q) <= tol, kappa = sqrt(d) max(eta) / min(eta). Exact arithmetic.
    """

    mu: float
    mu_inf: float
    alpha: float
    contraction_factor: float
    injection_linf_norm: float
    input_lipschitz_bound: float
    forward_iterations_bound: Optional[int]
    backward_iterations_bound: Optional[int]
    activation: str
    guarantee: str


class LinfBounds(NamedTuple):
    """The certificate's figures as 0-dim tensors, differentiable in the layer's parameters (a training penalty:
    Jafarpour et al. train with the Lipschitz bound as a regulariser)."""

    mu_inf: torch.Tensor
    contraction_factor: torch.Tensor
    input_lipschitz_bound: torch.Tensor
    output_lipschitz_bound: Optional[torch.Tensor]


_SLOPE_RESTRICTED = ("relu", "tanh", "sigmoid", "softsign", "relu6", "identity")  # slopes in [0, 1]


class LinfContractiveDEQ(CertifiedDEQ):
    """l-infinity contractive implicit layer: u (batch, in) -> x* (batch, hidden), x* = Phi(A x* + B u + b).

    A = T - diag(|T| 1) + mu I for an unconstrained T (hidden, hidden): row i has
    a_ii + sum_{j != i} |a_ij| = mu + t_ii - |t_ii| <= mu, so mu_inf(A) <= mu < 1 for every T, and every A with
    mu_inf(A) <= mu is reached (t_ij = a_ij off the diagonal, t_ii = (a_ii + sum_{j != i} |a_ij| - mu) / 2).
    Solved by the averaged iteration with alpha* = 1 / (1 - min(min_i a_ii, 0)) (computed from A on each call, one
    host synchronisation). Phi: relu, tanh, sigmoid, softsign, relu6 or identity (slope-restricted in [0, 1]).

    diagonal_floor (kappa >= max(0, -mu), default None: no floor): each row's off-diagonal l1 mass is capped at
    mu + kappa (the row scaled down when above) and a_ii is clamped to >= -kappa; the row sums stay <= mu, so the
    guarantee is unchanged, and alpha* >= 1 / (1 + kappa): the contraction factor, hence the iteration count, has a
    bound that training cannot move (without it, training drives the diagonal down and the count up).
    weighted (default False): A = D^-1 Ahat D with Ahat as above and D = diag(eta), eta = exp(log_eta) a learned
    positive vector; then mu_inf(D A D^-1) <= mu, a contraction in ||x||_eta = max_i eta_i |x_i| (Jafarpour et al.'s
    weighted parameterisation: a larger class of A than eta = 1).
    method="anderson" (m, beta): Anderson acceleration of the averaged map (mixing beta * alpha*); the fixed point
    and its uniqueness are the same, the iteration bounds of the certificate are those of the plain iteration.
    """

    @api_changes("LinfContractiveDEQ", old_positional=(
        "mu", "activation", "tol", "max_iter", "backend", "on_nonconvergence", "backward_tol", "backward_max_iter",
        "init_scale", "diagonal_floor", "weighted", "method", "m", "beta", "jac_reg", "on_backward_overflow",
        "device", "dtype"))
    def __init__(self, in_features: int, hidden_features: int, *, mu: float = 0.5, activation: str = "relu",
                 tol: float = 1e-4, max_iter: int = 100, backend: str = "auto", on_nonconvergence: str = "warn",
                 backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None,
                 init_scale: float = 1.0, diagonal_floor: Optional[float] = None, weighted: bool = False,
                 method: str = "picard", m: int = 5, beta: float = 1.0, jac_reg=None,
                 on_backward_overflow: str = "raise", device=None, dtype=None):
        get_activation(activation)
        if activation not in _SLOPE_RESTRICTED:
            raise ValueError(f"deqkern.LinfContractiveDEQ: activation {activation!r} is not slope-restricted in "
                             f"[0, 1]; "
                             f"choose one of "
                             f"{_SLOPE_RESTRICTED}")
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or not mu < 1:
            raise ValueError(f"deqkern.LinfContractiveDEQ: mu must be a finite number < 1 (the bound on mu_inf(A) that "
                             f"makes the layer an "
                             f"l-infinity contraction), got {mu!r}")
        if diagonal_floor is not None:
            floor = validation.check_finite_number("LinfContractiveDEQ", "diagonal_floor", diagonal_floor)
            if floor < max(0.0, -mu):
                raise ValueError(f"deqkern.LinfContractiveDEQ: diagonal_floor must be >= max(0, -mu) = "
                                 f"{max(0.0, -mu):g} (rows of A need off-diagonal mass mu + floor >= 0), got "
                                 f"{diagonal_floor!r}")
            diagonal_floor = floor
        super().__init__(in_features, hidden_features, activation, tol, max_iter, backend, on_nonconvergence,
                         backward_tol, backward_max_iter, device, dtype, method=method, m=m, beta=beta,
                         jac_reg=jac_reg, on_backward_overflow=on_backward_overflow)
        self.mu = float(mu)
        self.init_scale = float(init_scale)
        self.diagonal_floor = diagonal_floor
        self.weighted = bool(weighted)
        factory = {"device": device, "dtype": dtype}
        self.log_eta = nn.Parameter(torch.zeros(hidden_features, **factory)) if self.weighted else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        d = self.weight_raw.shape[0]
        # entries ~ N(0, (init_scale / d)^2): row sums of |T| about 0.8 init_scale, so alpha* is close to 1
        nn.init.normal_(self.weight_raw, std=self.init_scale / d)
        if self.log_eta is not None:
            self.log_eta.zero_()
        self.injection.reset_parameters()

    @staticmethod
    def weight_from(T: torch.Tensor, mu: float, diagonal_floor: Optional[float] = None,
                    eta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A = T - diag(|T| 1) + mu I (mu_inf(A) <= mu); with diagonal_floor kappa the off-diagonal row mass is
        capped at mu + kappa and a_ii clamped to >= -kappa; with eta, D^-1 A D (mu_inf(D . D^-1) <= mu)."""
        eye = torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
        off = T * (1 - eye)
        t_diag = T.diagonal()
        if diagonal_floor is None:
            diag = mu - T.abs().sum(dim=1) + t_diag  # = mu - sum_{j != i} |t_ij| + t_ii - |t_ii|
        else:
            mass = off.abs().sum(dim=1)
            cap = mu + diagonal_floor
            off = off * torch.clamp(cap / mass.clamp_min(torch.finfo(T.dtype).tiny), max=1.0)[:, None]
            diag = (mu - off.abs().sum(dim=1) + t_diag - t_diag.abs()).clamp_min(-diagonal_floor)
        A = off + torch.diag_embed(diag)
        if eta is not None:
            A = A * eta[None, :] / eta[:, None]  # a_ij eta_j / eta_i: D^-1 A D
        return A

    @property
    def eta(self) -> Optional[torch.Tensor]:
        """The positive weights of the norm ||x||_eta (None when the layer is not weighted)."""
        return None if self.log_eta is None else self.log_eta.exp()

    @property
    def weight(self) -> torch.Tensor:
        """A, the matrix the solve uses."""
        return self.weight_from(self.weight_raw, self.mu, self.diagonal_floor, self.eta)

    @staticmethod
    def averaging_tensor(A: torch.Tensor) -> torch.Tensor:
        """alpha* = 1 / (1 - min(min_i a_ii, 0)) as a 0-dim float64 tensor (no host read: what a traced forward
        passes to the solve op)."""
        return 1.0 / (1.0 - A.detach().diagonal().min().double().clamp_max(0))

    @staticmethod
    def averaging_from(A: torch.Tensor) -> float:
        """alpha* = 1 / (1 - min(min_i a_ii, 0)), a float."""
        return float(LinfContractiveDEQ.averaging_tensor(A))

    @api_changes("LinfContractiveDEQ.forward", renamed={"u": "x", "x0": "z0"})
    @names_its_inputs
    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: the input u (batch, in_features); z0: the start (batch, hidden_features); returns the state x*."""
        A = self.weight
        # traced: alpha* stays a tensor, read inside the solve op as Picard's alpha or in Anderson's beta alpha*
        # (reading it here would break the graph)
        alpha = self.averaging_tensor(A) if torch.compiler.is_compiling() else self.averaging_from(A)
        if self.solver_options["method"] == "anderson":  # Anderson on the averaged map: mixing beta * alpha*
            options = dict(self.solver_options, beta=self.solver_options["beta"] * alpha)
        else:
            options = dict(self.solver_options, alpha=alpha)
        c, z0 = self.in_weight_dtype(A, self.injection_values(x), z0)
        z, self.last_info = fixed_point_dense(A, c, z0=z0, jacobian_penalty=self.jacobian_penalty_weight(),
                                              **options)
        return z

    def bounds(self, readout=None, skip: Optional[torch.Tensor] = None) -> LinfBounds:
        """The certificate's figures as tensors with grad (a differentiable penalty; float64 is not forced).

        readout: the output map y = C x* (+ skip u): an nn.Linear or its (out, hidden) weight C; skip: the
        (out, in) weight of a direct term. output_lipschitz_bound = ||C D^-1||_inf ||D B||_inf / (1 - mu_+) +
        ||skip||_inf bounds ||y(u) - y(u')||_inf / ||u - u'||_inf.
        """
        A = self.weight
        eta = self.eta
        mu_inf = (A.abs().sum(dim=1) - A.diagonal().abs() + A.diagonal()).max() if eta is None else \
            one_sided_linf(A, weights=eta)
        mu_plus = mu_inf.clamp_min(0)
        alpha = 1.0 / (1.0 - A.diagonal().min().clamp_max(0))
        factor = 1.0 - alpha * (1.0 - mu_plus)
        B = self.injection.weight
        DB = B if eta is None else eta[:, None] * B
        min_eta = 1.0 if eta is None else eta.min()
        state_gain = linf_norm(DB) / (1.0 - mu_plus)  # sup ||x*(u) - x*(u')||_eta / ||u - u'||_inf
        input_bound = state_gain / min_eta
        output_bound = None
        if readout is not None:
            C = readout.weight if isinstance(readout, nn.Linear) else readout
            if not isinstance(C, torch.Tensor) or C.dim() != 2 or C.shape[1] != A.shape[0]:
                raise ValueError(f"deqkern.LinfContractiveDEQ.bounds: readout must be an nn.Linear or an "
                                 f"(out, {A.shape[0]}) weight")
            CD = C if eta is None else C / eta[None, :]
            output_bound = linf_norm(CD) * state_gain
            if skip is not None:
                output_bound = output_bound + linf_norm(skip)
        return LinfBounds(mu_inf, factor, input_bound, output_bound)

    def _iteration_bound(self, q: float, tol: float, kappa: float) -> Optional[int]:
        if not (0.0 <= q < 1.0):
            return None
        return geometric_steps_to_tol(q, kappa * (1.0 + q) + tol * q, tol)

    @torch.no_grad()
    def certificate(self) -> LinfContractionCertificate:
        eta = None if self.eta is None else self.eta.double()
        A = self.weight_from(self.weight_raw.double(), self.mu, self.diagonal_floor, eta)
        mu_inf = float(one_sided_linf(A, weights=eta))
        alpha = self.averaging_from(A)
        mu_plus = max(mu_inf, 0.0)
        B = self.injection.weight.double()
        b_norm = float(linf_norm(B if eta is None else eta[:, None] * B))
        factor = 1.0 - alpha * (1.0 - mu_plus)
        min_eta = 1.0 if eta is None else float(eta.min())
        max_eta = 1.0 if eta is None else float(eta.max())
        bound = b_norm / (min_eta * (1.0 - mu_plus)) if mu_plus < 1 else math.inf
        opts = self.solver_options
        tol, btol = opts["tol"], opts["tol"] if opts["backward_tol"] is None else opts["backward_tol"]
        kappa = math.sqrt(A.shape[0]) * max_eta / min_eta
        fwd, bwd = self._iteration_bound(factor, tol, kappa), self._iteration_bound(factor, btol, kappa)
        return LinfContractionCertificate(
            mu=self.mu, mu_inf=mu_inf, alpha=alpha, contraction_factor=factor, injection_linf_norm=b_norm,
            input_lipschitz_bound=bound, forward_iterations_bound=fwd, backward_iterations_bound=bwd,
            activation=self.activation,
            guarantee=("mu_inf(A) <= mu < 1 and Phi slope-restricted in [0, 1]: unique fixed point; the averaged "
                       f"iteration with alpha = {alpha:.6g} is an l-infinity contraction with factor {factor:.6g} "
                       f"from any start (plain iteration: stops within {fwd} evaluations at tol={tol:g}, the "
                       f"implicit backward within {bwd}); ||x*(u) - x*(u')||_inf <= {bound:.6g} ||u - u'||_inf"),
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.injection.in_features}, hidden_features={self.weight_raw.shape[0]}, "
                f"mu={self.mu}, activation={self.activation!r}"
                + (f", diagonal_floor={self.diagonal_floor}" if self.diagonal_floor is not None else "")
                + (", weighted=True" if self.weighted else ""))

"""Certified implicit layers: DEQs whose parameterisation guarantees that the fixed point exists, is unique and
is reached by the iteration deqkern runs, each with a `certificate()` that states what is guaranteed.

- `PositiveConcaveDEQ` (pcDEQ; Gabor, Piotrowski and Cavalcante 2024): z = act(W z + s(x)) with W >= 0
  elementwise and a positive, concave, nondecreasing, bounded activation (tanh, softsign, relu6, sigmoid) and a
  strictly positive injection. The map is a positive concave mapping: unique fixed point in the nonnegative orthant
  and geometric convergence of the plain iteration from any z >= 0, with no bound on the size of W.
- `LinfContractiveDEQ` (Jafarpour, Davydov, Proskurnikov and Bullo 2021): x = Phi(A x + B u + b) with
  mu_inf(A) <= mu < 1 by construction; the averaged iteration with alpha* = 1 / (1 - min(min_i a_ii, 0)) is an
  l-infinity contraction and u -> x* is ||B||_inf / (1 - mu_+) Lipschitz in the l-infinity norm.
- `LipschitzDEQ`: z = act(W z + U x + b) with ||W||_2 <= gamma / Lip(act), gamma < 1, kept by rescaling with a
  warm-started power iteration: a 2-norm contraction with explicit forward and backward iteration bounds.

Every layer solves with one fused `deqkern.fixed_point_dense` call (forward) and its implicit backward. The
certificates use `deqkern.lipschitz` (power iteration, one-sided l-infinity measure, l-infinity norm).
"""
import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .activations import get_activation
from .ops import SolverInfo, _check_dense_inputs, fixed_point_dense

__all__ = [
    "POSITIVE_CONCAVE_ACTIVATIONS",
    "PositiveConcaveCertificate",
    "PositiveConcaveDEQ",
    "LinfContractionCertificate",
    "LinfContractiveDEQ",
    "LipschitzCertificate",
    "LipschitzDEQ",
    "picard_iteration_bound",
    "positive_concave_fixed_point",
]


def _lipschitz():
    # Imported lazily: deqkern.lipschitz is a sibling module and only the certificates and LipschitzDEQ need it.
    from . import lipschitz

    return lipschitz


def _solver_options(activation, alpha, tol, max_iter, backend, on_nonconvergence, backward_tol, backward_max_iter):
    return dict(activation=activation, alpha=alpha, tol=tol, max_iter=max_iter, backend=backend,
                on_nonconvergence=on_nonconvergence, backward_tol=backward_tol, backward_max_iter=backward_max_iter)


def _first_k(q: float, a: float, tol: float) -> int:
    """Smallest integer k >= 1 with q**(k - 1) * a <= tol (0 <= q < 1, a > 0)."""
    if a <= tol:
        return 1
    if q <= 0.0:
        return 2
    k = 1 + max(0, math.ceil(math.log(tol / a) / math.log(q)))
    while k > 1 and q ** (k - 2) * a <= tol:  # guard the rounding of log/ceil in both directions
        k -= 1
    while q ** (k - 1) * a > tol:
        k += 1
    return k


def picard_iteration_bound(q: float, tol: float) -> Optional[int]:
    """Iterations (layer evaluations) after which a deqkern solve of a q-contraction started at 0 has stopped.

    For z_k = T(z_{k-1}), z_0 = 0, T a q-contraction (q < 1) in a norm ||.|| with fixed point z*:
    ||z_k - z*|| <= q^k ||z*||, so ||z_k - z_{k-1}|| <= (q^k + q^(k-1)) ||z*|| and ||z_k|| >= (1 - q^k) ||z*||.
    Evaluation k reports r_k = ||z_k - z_{k-1}|| / (||z_k|| + 1e-12) <= q^(k-1) (1 + q) / (1 - q^k), and the solve
    stops at the first k with r_k <= tol; this returns the smallest k with q^(k-1) (1 + q) / (1 - q^k) <= tol,
    i.e. q^(k-1) (1 + q + tol q) <= tol. In exact arithmetic; None when q >= 1 (no bound).
    """
    if not (0.0 <= q < 1.0) or not tol > 0:
        return None
    return _first_k(q, 1.0 + q + tol * q, tol)


# ================================================================ positive concave DEQ
POSITIVE_CONCAVE_ACTIVATIONS = ("tanh", "softsign", "relu6", "sigmoid")
# sup of the activation on [0, inf): every fixed point satisfies z* <= sup componentwise.
_ACTIVATION_SUP = {"tanh": 1.0, "softsign": 1.0, "relu6": 6.0, "sigmoid": 1.0}
# Activations positive on the whole real line (after one step every iterate is >= 0): any start works.
_NONNEGATIVE_RANGE = ("relu6", "sigmoid")


def _check_positive_concave_activation(activation):
    get_activation(activation)
    if activation not in POSITIVE_CONCAVE_ACTIVATIONS:
        raise ValueError(
            f"activation {activation!r} is not positive and concave on the positive orthant; a positive concave DEQ "
            f"needs one of {POSITIVE_CONCAVE_ACTIVATIONS}"
        )


def _activation_class(activation):
    injection = "c >= 0" if activation == "sigmoid" else "c > 0"
    return (f"{activation}: nondecreasing, concave and bounded by {_ACTIVATION_SUP[activation]:g} on [0, inf), "
            f"strictly positive there with the injection {injection}")


def _positive_concave_guarantee(activation):
    where = ("every start z0 (the iterates are >= 0 after one step)" if activation in _NONNEGATIVE_RANGE
             else "every start z0 >= 0 (uniqueness holds in the nonnegative orthant)")
    return ("W >= 0 and a positive concave activation with a positive injection make z -> act(W z + c) a positive "
            "concave (standard interference) mapping, bounded by sup(act): unique fixed point, geometric "
            f"convergence of the plain iteration from {where}, monotonically increasing from z0 = 0, "
            "with no bound on the size of W; the implicit backward converges (spectral radius of the Jacobian "
            "<= the rate bound)")


def positive_concave_fixed_point(
    W: torch.Tensor,
    c: torch.Tensor,
    activation: str = "tanh",
    tol: float = 1e-4,
    max_iter: int = 100,
    z0: Optional[torch.Tensor] = None,
    backend: str = "auto",
    on_nonconvergence: str = "warn",
    backward_tol: Optional[float] = None,
    backward_max_iter: Optional[int] = None,
):
    """Fixed point of the positive concave mapping z = act(z W^T + c): plain iteration (alpha = 1), differentiable.

    W (d, d) must be elementwise >= 0; c (batch, d) must be > 0 for tanh, softsign, relu6 and >= 0 for sigmoid;
    z0 (default 0) must be >= 0 for tanh and softsign. Then the fixed point in the nonnegative orthant exists, is
    unique and the iteration converges geometrically from z0, whatever the size of W (ValueError otherwise).
    Checking the signs costs one host synchronisation. Returns (z, SolverInfo) as `deqkern.fixed_point_dense`.
    """
    _check_positive_concave_activation(activation)
    _check_dense_inputs(W, c, z0)
    checks = [(W >= 0).all()]
    checks.append((c >= 0).all() if activation == "sigmoid" else (c > 0).all())
    if z0 is not None and activation not in _NONNEGATIVE_RANGE:
        checks.append((z0 >= 0).all())
    ok = torch.stack(checks).tolist()
    if not ok[0]:
        raise ValueError(
            f"positive_concave_fixed_point: W must be elementwise nonnegative (min entry {float(W.min()):.3g}, "
            "or NaN); parameterise it, e.g. W = softplus(V), or use fixed_point_dense"
        )
    if not ok[1]:
        need = ">= 0" if activation == "sigmoid" else "> 0 (strictly)"
        raise ValueError(
            f"positive_concave_fixed_point: the injection c must be {need} for activation {activation!r} "
            f"(min entry {float(c.min()):.3g}, or NaN); e.g. c = softplus(x U^T + b) + eps"
        )
    if len(ok) > 2 and not ok[2]:
        raise ValueError(
            f"positive_concave_fixed_point: z0 must be >= 0 for activation {activation!r} (the fixed point is "
            "unique in the nonnegative orthant only)"
        )
    return fixed_point_dense(W, c, z0=z0, **_solver_options(
        activation, 1.0, tol, max_iter, backend, on_nonconvergence, backward_tol, backward_max_iter))


@dataclass
class PositiveConcaveCertificate:
    """What a PositiveConcaveDEQ guarantees (see `guarantee`).

    rate_bound: q = 1 - act(injection_lower_bound) / sup(act), valid for every input: with
    delta = min_i act(c_i) / z*_i >= 1 - q, concavity gives T(lambda z*) >= (lambda + (1 - lambda) delta) z*, so
    from z0 = 0: 0 <= z* - z_k <= q^k z* componentwise. With an input x, the per-sample fields are filled:
    `sample_rate_bound` (same bound with the sample's own min_i act(c_i)), `sample_rate` (1 - delta at the computed
    fixed point, sharper; also bounds the spectral radius of the Jacobian, so of the backward iteration) and
    `forward_iterations_bound` (smallest k with q^(k-1) (1 + tol q) <= tol, from the monotone error bound).
    """

    activation: str
    activation_class: str
    weight_nonnegative: bool
    min_weight: float
    injection_lower_bound: float
    rate_bound: float
    guarantee: str
    sample_rate_bound: Optional[torch.Tensor] = None
    sample_rate: Optional[torch.Tensor] = None
    forward_iterations_bound: Optional[torch.Tensor] = None


class PositiveConcaveDEQ(nn.Module):
    """Positive concave DEQ (pcDEQ): x (batch, in) -> z* (batch, hidden), z* = act(z* W^T + s(x)).

    W = softplus(V) is elementwise >= 0 for every V (never NaN: no normalisation by a row sum; a row of very negative
    V is a zero row, which is fine), s(x) = softplus(x U^T + b) + injection_eps > 0, activation one of tanh, softsign,
    relu6, sigmoid. Plain iteration (alpha = 1) from z0 = 0. No bound on W is needed: see `certificate()`.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        activation: str = "tanh",
        tol: float = 1e-4,
        max_iter: int = 100,
        backend: str = "auto",
        on_nonconvergence: str = "warn",
        backward_tol: Optional[float] = None,
        backward_max_iter: Optional[int] = None,
        injection_eps: float = 1e-3,
        init_row_sum: float = 0.5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_positive_concave_activation(activation)
        min_eps = 0.0 if activation == "sigmoid" else 1e-12
        if not isinstance(injection_eps, (int, float)) or not (injection_eps >= min_eps) or injection_eps > 1:
            raise ValueError(f"injection_eps must be a number in [{min_eps:g}, 1] for activation {activation!r} "
                             f"(the injection must be {'>= 0' if activation == 'sigmoid' else '> 0'}), "
                             f"got {injection_eps!r}")
        factory = {"device": device, "dtype": dtype}
        self.activation = activation
        self.injection_eps = float(injection_eps)
        self.init_row_sum = float(init_row_sum)
        self.solver_options = _solver_options(activation, 1.0, tol, max_iter, backend, on_nonconvergence,
                                              backward_tol, backward_max_iter)
        self.injection = nn.Linear(in_features, hidden_features, **factory)
        self.weight_raw = nn.Parameter(torch.empty(hidden_features, hidden_features, **factory))
        self.last_info: Optional[SolverInfo] = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        d = self.weight_raw.shape[0]
        # W_ij ~ U(0, 2 init_row_sum / d): expected row sums init_row_sum.
        w = torch.rand_like(self.weight_raw).mul_(2 * self.init_row_sum / d).clamp_min_(1e-6)
        self.weight_raw.copy_(torch.log(torch.expm1(w)))  # softplus^{-1}
        self.injection.reset_parameters()

    @property
    def weight(self) -> torch.Tensor:
        """The nonnegative W = softplus(V) the solve uses (0 <= W, finite for every finite V, never NaN)."""
        return F.softplus(self.weight_raw)

    def injection_values(self, x: torch.Tensor) -> torch.Tensor:
        """s(x) = softplus(x U^T + b) + injection_eps (> 0)."""
        return F.softplus(self.injection(x)) + self.injection_eps

    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.injection_values(x)
        if z0 is not None:  # the parameterisation guarantees W >= 0 and c > 0; only a given start needs a check
            z, self.last_info = positive_concave_fixed_point(self.weight, c, z0=z0, **_no_alpha(self.solver_options))
        else:
            z, self.last_info = fixed_point_dense(self.weight, c, **self.solver_options)
        return z

    @torch.no_grad()
    def certificate(self, x: Optional[torch.Tensor] = None) -> PositiveConcaveCertificate:
        W = self.weight
        act = get_activation(self.activation).fn
        sup = _ACTIVATION_SUP[self.activation]
        eps = torch.tensor(self.injection_eps, dtype=torch.float64)
        rate = 1.0 - float(act(eps)) / sup
        cert = PositiveConcaveCertificate(
            activation=self.activation,
            activation_class=_activation_class(self.activation),
            weight_nonnegative=bool(((W >= 0) & torch.isfinite(W)).all()),
            min_weight=float(W.min()),
            injection_lower_bound=self.injection_eps,
            rate_bound=rate,
            guarantee=_positive_concave_guarantee(self.activation),
        )
        if x is not None:
            c = self.injection_values(x).double()
            W64 = W.double()
            options = dict(self.solver_options, on_nonconvergence="ignore")
            z, _ = fixed_point_dense(W64, c, **_strip(options, "backward_tol", "backward_max_iter"))
            t0 = act(c)
            cert.sample_rate_bound = 1.0 - t0.min(dim=1).values / sup
            cert.sample_rate = (1.0 - (t0 / z.clamp_min(torch.finfo(z.dtype).tiny)).min(dim=1).values).clamp(0, 1)
            tol = self.solver_options["tol"]
            cert.forward_iterations_bound = torch.tensor(
                [_first_k(q, 1.0 + tol * q, tol) if q < 1 else -1 for q in cert.sample_rate_bound.tolist()],
                dtype=torch.int64)
        return cert

    def extra_repr(self) -> str:
        return (f"in_features={self.injection.in_features}, hidden_features={self.weight_raw.shape[0]}, "
                f"activation={self.activation!r}")


def _strip(options, *keys):
    return {k: v for k, v in options.items() if k not in keys}


def _no_alpha(options):
    return _strip(options, "alpha")


# ================================================================ l-infinity contractive DEQ
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


class LinfContractiveDEQ(nn.Module):
    """l-infinity contractive implicit layer: u (batch, in) -> x* (batch, hidden), x* = Phi(A x* + B u + b).

    A = T - diag(|T| 1) + mu I for an unconstrained T (hidden, hidden): row i has
    a_ii + sum_{j != i} |a_ij| = mu + t_ii - |t_ii| <= mu, so mu_inf(A) <= mu < 1 for every T, and every A with
    mu_inf(A) <= mu is reached (t_ij = a_ij off the diagonal, t_ii = (a_ii + sum_{j != i} |a_ij| - mu) / 2).
    Solved by the averaged iteration with alpha* = 1 / (1 - min(min_i a_ii, 0)) (computed from A on each call, one
    host synchronisation). Phi: relu, tanh, sigmoid, softsign, relu6 or identity (slope-restricted in [0, 1]).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        mu: float = 0.5,
        activation: str = "relu",
        tol: float = 1e-4,
        max_iter: int = 100,
        backend: str = "auto",
        on_nonconvergence: str = "warn",
        backward_tol: Optional[float] = None,
        backward_max_iter: Optional[int] = None,
        init_scale: float = 1.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        get_activation(activation)
        if activation not in _SLOPE_RESTRICTED:
            raise ValueError(f"activation {activation!r} is not slope-restricted in [0, 1]; choose one of "
                             f"{_SLOPE_RESTRICTED}")
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or not mu < 1:
            raise ValueError(f"mu must be a finite number < 1 (the bound on mu_inf(A) that makes the layer an "
                             f"l-infinity contraction), got {mu!r}")
        factory = {"device": device, "dtype": dtype}
        self.activation = activation
        self.mu = float(mu)
        self.init_scale = float(init_scale)
        self.solver_options = _solver_options(activation, 1.0, tol, max_iter, backend, on_nonconvergence,
                                              backward_tol, backward_max_iter)
        self.injection = nn.Linear(in_features, hidden_features, **factory)
        self.weight_raw = nn.Parameter(torch.empty(hidden_features, hidden_features, **factory))
        self.last_info: Optional[SolverInfo] = None
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
        lip = _lipschitz()
        A = self.weight_from(self.weight_raw.double(), self.mu)
        mu_inf = float(lip.one_sided_linf(A))
        alpha = self.averaging_from(A)
        mu_plus = max(mu_inf, 0.0)
        b_norm = float(lip.linf_norm(self.injection.weight.double()))
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


# ================================================================ Lipschitz (2-norm contractive) DEQ
@dataclass
class LipschitzCertificate:
    """What a LipschitzDEQ guarantees (Euclidean norm throughout), for the weight the layer uses in eval mode.

    weight_spectral_norm: ||W||_2 by power iteration run to convergence (deqkern.lipschitz.spectral_norm);
    contraction_factor q = Lip(act) ||W||_2 (<= gamma by construction): z -> act(W z + c) is a q-contraction per
    sample, and so is the adjoint map h -> act'(u) * (h W + grad_z) (|act'| <= Lip(act), ||W^T||_2 = ||W||_2).
    forward_iterations_bound / backward_iterations_bound: `picard_iteration_bound(q, tol)`, the number of
    evaluations after which each sample of the solve from 0 has stopped (exact arithmetic; both solves start at 0).
    input_lipschitz_bound: ||z*(x) - z*(x')||_2 <= Lip(act) ||U||_2 / (1 - q) ||x - x'||_2.
    """

    gamma: float
    activation: str
    activation_lipschitz: float
    weight_spectral_norm: float
    contraction_factor: float
    tol: float
    forward_iterations_bound: Optional[int]
    backward_tol: float
    backward_iterations_bound: Optional[int]
    within_max_iter: bool
    injection_spectral_norm: float
    input_lipschitz_bound: float
    guarantee: str


class LipschitzDEQ(nn.Module):
    """2-norm contractive implicit layer: x (batch, in) -> z* (batch, hidden), z* = act(z* W^T + x U^T + b).

    W = V min(1, (gamma / Lip(act)) / sigma(V)), sigma(V) the largest singular value by power iteration
    (deqkern.lipschitz.spectral_norm) from a persistent vector `power_u` (a buffer): in training mode each forward
    runs `n_power_iterations` steps from it and stores the result (as torch's spectral_norm does; the gradient flows
    through sigma with the vector held fixed); in eval mode the iteration runs to convergence (`power_tol`) and the
    buffer is left alone, so the eval forward uses ||W||_2 <= gamma / Lip(act) up to that tolerance (the converged
    iteration runs in float64, default power_tol 1e-10). Call `reset_power_iteration()` after editing `weight_raw`
    by hand.
    Plain iteration (alpha = 1) from z0 = 0.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        gamma: float = 0.9,
        activation: str = "tanh",
        tol: float = 1e-4,
        max_iter: int = 100,
        backend: str = "auto",
        on_nonconvergence: str = "warn",
        backward_tol: Optional[float] = None,
        backward_max_iter: Optional[int] = None,
        n_power_iterations: int = 3,
        power_tol: Optional[float] = None,
        power_max_iter: int = 5000,
        init_scale: float = 1.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        act = get_activation(activation)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0 < gamma < 1):
            raise ValueError(f"gamma must be a number in (0, 1) (the contraction factor Lip(act) ||W||_2 the layer "
                             f"is kept below), got {gamma!r}")
        if act.lipschitz <= 0:
            raise ValueError(f"activation {activation!r} has no positive Lipschitz constant")
        if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be an integer >= 1, got {n_power_iterations!r}")
        factory = {"device": device, "dtype": dtype}
        self.activation = activation
        self.gamma = float(gamma)
        self.activation_lipschitz = float(act.lipschitz)
        self.max_weight_norm = self.gamma / self.activation_lipschitz
        self.n_power_iterations = n_power_iterations
        self.power_tol = power_tol
        self.power_max_iter = int(power_max_iter)
        self.init_scale = float(init_scale)
        self.solver_options = _solver_options(activation, 1.0, tol, max_iter, backend, on_nonconvergence,
                                              backward_tol, backward_max_iter)
        self.injection = nn.Linear(in_features, hidden_features, **factory)
        self.weight_raw = nn.Parameter(torch.empty(hidden_features, hidden_features, **factory))
        self.register_buffer("power_u", torch.empty(hidden_features, **factory))
        self.last_info: Optional[SolverInfo] = None
        self.last_weight: Optional[torch.Tensor] = None  # the W of the latest forward (detached)
        self._converged_cache = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.weight_raw, std=self.init_scale / math.sqrt(self.weight_raw.shape[0]))
        u = torch.randn_like(self.power_u)
        self.power_u.copy_(u / u.norm().clamp_min(1e-30))
        self.reset_power_iteration()
        self.injection.reset_parameters()

    @torch.no_grad()
    def reset_power_iteration(self):
        """Runs the power iteration to convergence and stores its vector: call it after changing `weight_raw` by
        hand (the training-mode forward only takes `n_power_iterations` warm-started steps)."""
        self._sigma(self.weight_raw, converged=True, update=True)

    def _power_tol(self) -> float:
        return 1e-10 if self.power_tol is None else float(self.power_tol)

    def _sigma(self, V: torch.Tensor, converged: bool, update: bool) -> torch.Tensor:
        """sigma(V) = ||V u||_2 at the power-iteration vector u, differentiable in V with u held fixed (a lower
        bound of ||V||_2, equal to it once u is a top right singular vector)."""
        lip = _lipschitz()
        backend = self.solver_options["backend"]
        with torch.no_grad():
            if converged:  # in float64 to power_tol (warns deqkern.lipschitz.PowerIterationWarning if not reached)
                # cached while neither V nor the buffer changes (repeated eval calls run no power iteration)
                # (weak references: a new tensor that reuses a freed one's memory never matches)
                key = (V._version, self.power_u._version)
                cache = self._converged_cache
                if cache is not None and cache[0]() is V and cache[1]() is self.power_u and cache[2] == key:
                    u = cache[3]
                else:
                    u = lip.spectral_norm(V.detach().double(), n_iter=self.power_max_iter, tol=self._power_tol(),
                                          u0=self.power_u.double(), backend=backend).u.to(V.dtype)
            else:  # a fixed number of warm-started steps: tol below reach, no check, no host synchronisation
                u = lip.power_iteration(V.detach(), self.power_u[None], mode="gram", max_iter=self.n_power_iterations,
                                        tol=1e-300, backend=backend, on_nonconvergence="ignore").u[0]
            norm = u.norm()
            usable = torch.isfinite(norm) & (norm > 0)  # V = 0 (or an overflow): keep the previous vector
            u = torch.where(usable, u / torch.where(usable, norm, torch.ones_like(norm)), self.power_u)
            if converged and not update:
                self._converged_cache = (weakref.ref(V), weakref.ref(self.power_u), key, u)
            if update:
                self.power_u.copy_(u)
        return torch.linalg.vector_norm(V @ u)

    def compute_weight(self, converged: bool = True, update: bool = False) -> torch.Tensor:
        """W = V min(1, (gamma / Lip(act)) / sigma(V)) (differentiable)."""
        V = self.weight_raw
        sigma = self._sigma(V, converged, update)
        scale = torch.clamp(self.max_weight_norm / sigma.clamp_min(torch.finfo(V.dtype).tiny), max=1.0)
        return V * scale

    @property
    def weight(self) -> torch.Tensor:
        """The weight of the eval-mode forward (converged power iteration); does not touch the buffer."""
        return self.compute_weight(converged=True, update=False)

    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        W = self.compute_weight(converged=not self.training, update=self.training)
        self.last_weight = W.detach()
        z, self.last_info = fixed_point_dense(W, self.injection(x), z0=z0, **self.solver_options)
        return z

    @torch.no_grad()
    def certificate(self) -> LipschitzCertificate:
        lip = _lipschitz()
        W = self.weight.double()
        backend = self.solver_options["backend"]
        w_norm = float(lip.spectral_norm(W, n_iter=self.power_max_iter, tol=1e-13, u0=self.power_u.double(),
                                         backend=backend).value)
        u_norm = float(lip.spectral_norm(self.injection.weight.double(), n_iter=self.power_max_iter, tol=1e-13,
                                         backend=backend).value)
        q = self.activation_lipschitz * w_norm
        opts = self.solver_options
        tol, max_iter = opts["tol"], opts["max_iter"]
        btol = tol if opts["backward_tol"] is None else opts["backward_tol"]
        bmax = max_iter if opts["backward_max_iter"] is None else opts["backward_max_iter"]
        fwd, bwd = picard_iteration_bound(q, tol), picard_iteration_bound(q, btol)
        within = fwd is not None and bwd is not None and fwd <= max_iter and bwd <= bmax
        lip_bound = self.activation_lipschitz * u_norm / (1 - q) if q < 1 else math.inf
        return LipschitzCertificate(
            gamma=self.gamma, activation=self.activation, activation_lipschitz=self.activation_lipschitz,
            weight_spectral_norm=w_norm, contraction_factor=q, tol=tol, forward_iterations_bound=fwd,
            backward_tol=btol, backward_iterations_bound=bwd, within_max_iter=within, injection_spectral_norm=u_norm,
            input_lipschitz_bound=lip_bound,
            guarantee=(f"q = Lip(act) ||W||_2 = {q:.6g} < 1: unique fixed point, the plain iteration from 0 stops "
                       f"within {fwd} evaluations at tol={tol:g} and the implicit backward within {bwd} at "
                       f"tol={btol:g} (exact arithmetic); ||z*(x) - z*(x')||_2 <= {lip_bound:.6g} ||x - x'||_2")
            if q < 1 else f"q = Lip(act) ||W||_2 = {q:.6g} >= 1: nothing is certified",
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.injection.in_features}, hidden_features={self.weight_raw.shape[0]}, "
                f"gamma={self.gamma}, activation={self.activation!r}")


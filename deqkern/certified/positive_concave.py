"""The positive concave DEQ (pcDEQ; Gabor, Piotrowski and Cavalcante 2024): z = act(W z + s(x)) with W >= 0
elementwise, a positive, concave, nondecreasing, bounded activation and a strictly positive injection.

Holds the functional solve `positive_concave_fixed_point` (which checks the signs), the layer
`PositiveConcaveDEQ` (whose parameterisation guarantees them) and its `PositiveConcaveCertificate`.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..activations import get_activation
from ..ops.fixed_point_dense import check_dense_inputs, fixed_point_dense
from ._base import CertifiedDEQ
from ._options import solver_options, without
from .bounds import geometric_steps_to_tol

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


def _check_injection_eps(injection_eps, activation) -> float:
    """The floor added to s(x): in [1e-12, 1] (the injection must be > 0), or in [0, 1] for sigmoid (>= 0 is enough
    there). Not a rule of deqkern.core.validation: its bounds depend on the activation."""
    min_eps = 0.0 if activation == "sigmoid" else 1e-12
    if not isinstance(injection_eps, (int, float)) or not (injection_eps >= min_eps) or injection_eps > 1:
        raise ValueError(f"injection_eps must be a number in [{min_eps:g}, 1] for activation {activation!r} "
                         f"(the injection must be {'>= 0' if activation == 'sigmoid' else '> 0'}), "
                         f"got {injection_eps!r}")
    return float(injection_eps)


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
    check_dense_inputs("positive_concave_fixed_point", W, c, z0)
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
    return fixed_point_dense(W, c, z0=z0, **solver_options(
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


class PositiveConcaveDEQ(CertifiedDEQ):
    """Positive concave DEQ (pcDEQ): x (batch, in) -> z* (batch, hidden), z* = act(z* W^T + s(x)).

    W = softplus(V) is elementwise >= 0 for every V (never NaN: no normalisation by a row sum; a row of very negative
    V is a zero row, which is fine), s(x) = softplus(x U^T + b) + injection_eps > 0, activation one of tanh, softsign,
    relu6, sigmoid. Plain iteration (alpha = 1) from z0 = 0. No bound on W is needed: see `certificate()`.
    """

    def __init__(self, in_features: int, hidden_features: int, activation: str = "tanh", tol: float = 1e-4,
                 max_iter: int = 100, backend: str = "auto", on_nonconvergence: str = "warn",
                 backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None,
                 injection_eps: float = 1e-3, init_row_sum: float = 0.5, device=None, dtype=None):
        _check_positive_concave_activation(activation)
        injection_eps = _check_injection_eps(injection_eps, activation)
        super().__init__(in_features, hidden_features, activation, tol, max_iter, backend, on_nonconvergence,
                         backward_tol, backward_max_iter, device, dtype)
        self.injection_eps = injection_eps
        self.init_row_sum = float(init_row_sum)
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
            options = without(self.solver_options, "alpha")  # the functional takes no alpha: it runs alpha = 1
            z, self.last_info = positive_concave_fixed_point(self.weight, c, z0=z0, **options)
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
            z, _ = fixed_point_dense(W64, c, **without(options, "backward_tol", "backward_max_iter"))
            t0 = act(c)
            cert.sample_rate_bound = 1.0 - t0.min(dim=1).values / sup
            cert.sample_rate = (1.0 - (t0 / z.clamp_min(torch.finfo(z.dtype).tiny)).min(dim=1).values).clamp(0, 1)
            tol = self.solver_options["tol"]
            cert.forward_iterations_bound = torch.tensor(
                [geometric_steps_to_tol(q, 1.0 + tol * q, tol) if q < 1 else -1
                 for q in cert.sample_rate_bound.tolist()],
                dtype=torch.int64)
        return cert

    def extra_repr(self) -> str:
        return (f"in_features={self.injection.in_features}, hidden_features={self.weight_raw.shape[0]}, "
                f"activation={self.activation!r}")

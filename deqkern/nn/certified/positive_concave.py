"""The positive concave DEQ (pcDEQ; Gabor, Piotrowski and Cavalcante 2024): z = act(W z + s(x)) with W >= 0
elementwise, a positive, concave, nondecreasing, bounded activation and a strictly positive injection.

Holds the functional solve `positive_concave_fixed_point` (which checks the signs), the layer
`PositiveConcaveDEQ` (whose parameterisation guarantees them) and its `PositiveConcaveCertificate`.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ...activations import ACTIVATIONS, get_activation
from ...core.api import api_changes
from ...core import validation
from ...solvers.dense import check_dense_inputs, fixed_point_dense
from ..dense_layer import names_its_inputs
from ._base import CertifiedDEQ
from ._options import solver_options, without
from .positive_concave_rates import positive_concave_rates

POSITIVE_CONCAVE_ACTIVATIONS = ("tanh", "softsign", "relu6", "sigmoid")
# sup of the activation on [0, inf): every fixed point satisfies z* <= sup componentwise.
_ACTIVATION_SUP = {"tanh": 1.0, "softsign": 1.0, "relu6": 6.0, "sigmoid": 1.0}
# Activations positive on the whole real line (after one step every iterate is >= 0): any start works.
_NONNEGATIVE_RANGE = ("relu6", "sigmoid")


def check_positive_concave_activation(what, activation):
    """activation: one of POSITIVE_CONCAVE_ACTIVATIONS (an unknown name and a known but unsuitable one get their own
    ValueError, naming `what`)."""
    validation.check_choice(what, "activation", activation, tuple(ACTIVATIONS))
    if activation not in POSITIVE_CONCAVE_ACTIVATIONS:
        raise ValueError(
            f"deqkern.{what}: activation {activation!r} is not positive and concave on the positive orthant; a "
            f"positive concave DEQ needs one of {POSITIVE_CONCAVE_ACTIVATIONS}"
        )


def check_injection_eps(what, injection_eps, activation) -> float:
    """The floor added to s(x): in [1e-12, 1] (the injection must be > 0), or in [0, 1] for sigmoid (>= 0 is enough
    there); a number, not a bool. Not a rule of deqkern.core.validation: its bounds depend on the activation."""
    min_eps = 0.0 if activation == "sigmoid" else 1e-12
    if (isinstance(injection_eps, bool) or not isinstance(injection_eps, (int, float))
            or not (injection_eps >= min_eps) or injection_eps > 1):
        raise ValueError(f"deqkern.{what}: injection_eps must be a number in [{min_eps:g}, 1] for activation "
                         f"{activation!r} (the injection must be {'>= 0' if activation == 'sigmoid' else '> 0'}), "
                         f"got {injection_eps!r}")
    return float(injection_eps)


# The injection s(x) of PositiveConcaveDEQ: softplus(x U^T + b) + eps > 0 (pcDEQ-1), or relu(x U^T + b) + eps >= 0
# (pcDEQ-2, with sigmoid only: sigmoid(0) = 1/2 > 0 keeps the map positive where the injection is 0).
INJECTIONS = ("softplus", "relu")


def check_injection(what, injection, activation):
    validation.check_choice(what, "injection", injection, INJECTIONS)
    if injection == "relu" and activation != "sigmoid":
        raise ValueError(f"deqkern.{what}: injection='relu' (pcDEQ-2) needs activation='sigmoid': a ReLU injection "
                         f"may be 0, and only sigmoid (sigmoid(0) = 1/2 > 0) keeps the map positive there; "
                         f"{activation!r} needs the strictly positive injection='softplus'")
    return injection


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
    jacobian_penalty: float = 0.0,
    on_backward_overflow: str = "raise",
):
    """Fixed point of the positive concave mapping z = act(z W^T + c): plain iteration (alpha = 1), differentiable.

    W (d, d) must be elementwise >= 0; c (batch, d) must be > 0 for tanh, softsign, relu6 and >= 0 for sigmoid;
    z0 (default 0) must be >= 0 for tanh and softsign. Then the fixed point in the nonnegative orthant exists, is
    unique and the iteration converges geometrically from z0, whatever the size of W (ValueError otherwise).
    Checking the signs costs one host synchronisation. Returns (z, SolverInfo) as `deqkern.fixed_point_dense`
    (jacobian_penalty, on_backward_overflow: as there).
    """
    check_positive_concave_activation("positive_concave_fixed_point", activation)
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
    return fixed_point_dense(W, c, z0=z0, jacobian_penalty=jacobian_penalty, **solver_options(
        activation, 1.0, tol, max_iter, backend, on_nonconvergence, backward_tol, backward_max_iter,
        on_backward_overflow=on_backward_overflow))



@dataclass
class PositiveConcaveCertificate:
    """What a PositiveConcaveDEQ guarantees (see `guarantee`). Every rate and bound here is proven, not estimated
    (the theorems and proofs: deqkern/nn/certified/positive_concave_rates.py).

    - rate_bound: valid for every input, from z* <= sup(act) and T(0)_i >= act(injection_eps):
      q = 1 - act(injection_eps) / sup(act) (loose: it knows nothing of the layer's weights).
    With an input x, per sample:
    - sample_rate_bound: the rate 1 - min_i act(c_i) / z*_i of the geometric convergence theorem for positive
      concave mappings (Piotrowski and Cavalcante 2022), z* replaced by the iteration from above, which bounds it;
      0 <= z* - z_k <= q^k z* from z0 = 0.
    - tail_rate_bound, tail_rate_from_step: a proven rate q_j of the error from step j on, in a weighted max norm
      (the Collatz-Wielandt bound of the Jacobian at the j-th iterate, which dominates every later one); it tends
      to the spectral radius of the Jacobian at z*, often far below the theorem's rate.
    - forward_iterations_bound: a proven bound on the evaluations of the plain iteration from 0 at the layer's tol
      (the smaller of the two rates' bounds; -1 where neither proves anything).
    - measured_rate: the geometric mean contraction of the error of the plain iteration from 0 (float64), beside
      the bounds; forward_iterations: the evaluations the layer's own solve took (its method, its dtype).
    """

    activation: str
    activation_class: str
    weight_nonnegative: bool
    min_weight: float
    injection_lower_bound: float
    rate_bound: float
    guarantee: str
    sample_rate_bound: Optional[torch.Tensor] = None
    tail_rate_bound: Optional[torch.Tensor] = None
    tail_rate_from_step: Optional[torch.Tensor] = None
    forward_iterations_bound: Optional[torch.Tensor] = None
    measured_rate: Optional[torch.Tensor] = None
    forward_iterations: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, activation: str, weight: torch.Tensor, injection_eps: float, guarantee: str):
        """The input-free part, for a layer whose linear part has the nonnegative entries (or taps) `weight`."""
        act = get_activation(activation).fn
        rate = 1.0 - float(act(torch.tensor(injection_eps, dtype=torch.float64))) / _ACTIVATION_SUP[activation]
        return cls(activation=activation, activation_class=_activation_class(activation),
                   weight_nonnegative=bool(((weight >= 0) & torch.isfinite(weight)).all()),
                   min_weight=float(weight.min()), injection_lower_bound=injection_eps, rate_bound=rate,
                   guarantee=guarantee)

    def add_sample_rates(self, linear, c: torch.Tensor, tol: float, max_iter: int) -> None:
        """The per-sample fields for T(z) = act(linear(z) + c) (float64), from positive_concave_rates."""
        rates = positive_concave_rates(linear, c.double(), self.activation, _ACTIVATION_SUP[self.activation], tol,
                                       max_iter)
        self.sample_rate_bound, self.tail_rate_bound, self.tail_rate_from_step = rates[:3]
        self.forward_iterations_bound, self.measured_rate = rates.forward_iterations_bound, rates.measured_rate


def check_anderson_allowed(what, method, activation):
    """method='anderson' keeps the pcDEQ's fixed point only with an activation of nonnegative range (there the fixed
    point is unique in the whole space); with tanh or softsign it is unique in the nonnegative orthant only, which
    Anderson's extrapolated iterates may leave."""
    if method == "anderson" and activation not in _NONNEGATIVE_RANGE:
        raise ValueError(
            f"deqkern.{what}: method='anderson' needs an activation with a nonnegative range "
            f"{_NONNEGATIVE_RANGE}: with {activation!r} the fixed point is unique only in the nonnegative "
            "orthant, and Anderson's extrapolated iterates may leave it and reach another one; use "
            "method='picard' (monotone from 0, never leaves it)")


class PositiveConcaveDEQ(CertifiedDEQ):
    """Positive concave DEQ (pcDEQ): x (batch, in) -> z* (batch, hidden), z* = act(z* W^T + s(x)).

    W = softplus(V) is elementwise >= 0 for every V (never NaN: no normalisation by a row sum; a row of very negative
    V is a zero row, which is fine), s(x) = softplus(x U^T + b) + injection_eps > 0 (pcDEQ-1), activation one of
    tanh, softsign, relu6, sigmoid; or, with injection="relu" and activation="sigmoid" (pcDEQ-2), s(x) =
    relu(x U^T + b) + injection_eps >= 0 (injection_eps may be 0). Plain iteration (alpha = 1) from z0 = 0. No bound
    on W is needed: see `certificate()`.
    method="anderson" (m, beta) is allowed with relu6 and sigmoid only (their fixed point is unique in the whole
    space); the certificate's rate and iteration bound are those of the plain iteration.
    """

    @api_changes("PositiveConcaveDEQ", old_positional=(
        "activation", "tol", "max_iter", "backend", "on_nonconvergence", "backward_tol", "backward_max_iter",
        "injection_eps", "init_row_sum", "method", "m", "beta", "jac_reg", "on_backward_overflow", "device", "dtype"))
    def __init__(self, in_features: int, hidden_features: int, *, activation: str = "tanh", tol: float = 1e-4,
                 max_iter: int = 100, backend: str = "auto", on_nonconvergence: str = "warn",
                 backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None,
                 injection: str = "softplus", injection_eps: float = 1e-3, init_row_sum: float = 0.5,
                 method: str = "picard", m: int = 5, beta: float = 1.0, jac_reg=None,
                 on_backward_overflow: str = "raise", device=None, dtype=None):
        check_positive_concave_activation("PositiveConcaveDEQ", activation)
        injection_kind = check_injection("PositiveConcaveDEQ", injection, activation)
        injection_eps = check_injection_eps("PositiveConcaveDEQ", injection_eps, activation)
        check_anderson_allowed("PositiveConcaveDEQ", method, activation)
        super().__init__(in_features, hidden_features, activation, tol, max_iter, backend, on_nonconvergence,
                         backward_tol, backward_max_iter, device, dtype, method=method, m=m, beta=beta,
                         jac_reg=jac_reg, on_backward_overflow=on_backward_overflow)
        self.injection_eps = injection_eps
        self.injection_kind = injection_kind  # (`self.injection` is the nn.Linear x -> x U^T + b)
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
        """s(x) = softplus(x U^T + b) + injection_eps (> 0), or relu(x U^T + b) + injection_eps (>= 0; pcDEQ-2)."""
        linear = self.injection(x)
        return (F.relu(linear) if self.injection_kind == "relu" else F.softplus(linear)) + self.injection_eps

    @names_its_inputs
    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        W, penalty = self.weight, self.jacobian_penalty_weight()
        c, z0 = self.in_weight_dtype(W, self.injection_values(x), z0)
        if z0 is not None and self.solver_options["method"] == "picard":
            # the parameterisation guarantees W >= 0 and c > 0; only a given start needs a check
            options = without(self.solver_options, "alpha", "method", "m", "beta")  # the functional runs Picard
            z, self.last_info = positive_concave_fixed_point(W, c, z0=z0, jacobian_penalty=penalty, **options)
        else:  # Anderson only with a nonnegative-range activation: every fixed point is then the one, any start
            z, self.last_info = fixed_point_dense(W, c, z0=z0, jacobian_penalty=penalty, **self.solver_options)
        return z

    @torch.no_grad()
    def certificate(self, x: Optional[torch.Tensor] = None) -> PositiveConcaveCertificate:
        W = self.weight
        cert = PositiveConcaveCertificate.of(self.activation, W, self.injection_eps,
                                             _positive_concave_guarantee(self.activation))
        if x is not None:
            c, _ = self.in_weight_dtype(W, self.injection_values(x), None)
            W64 = W.double()
            cert.add_sample_rates(lambda z: z @ W64.T, c, self.solver_options["tol"], self.solver_options["max_iter"])
            options = dict(self.solver_options, on_nonconvergence="ignore")
            _, info = fixed_point_dense(W, c, **without(options, "backward_tol", "backward_max_iter"))
            cert.forward_iterations = info.iterations.cpu()
        return cert

    def extra_repr(self) -> str:
        return (f"in_features={self.injection.in_features}, hidden_features={self.weight_raw.shape[0]}, "
                f"activation={self.activation!r}, injection={self.injection_kind!r}")

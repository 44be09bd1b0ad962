"""PositiveConcaveConvDEQ: a nonnegative kernel and a positive injection make z -> act(conv(z, K) + s(x)) a
positive concave mapping (pcDEQ's theory for the convolution as the nonnegative matrix it is)."""
from typing import Optional

import torch
import torch.nn.functional as F

from ....core.api import api_changes
from ....core import validation
from ....solvers.generic import solve
from ..positive_concave import (
    _NONNEGATIVE_RANGE,
    PositiveConcaveCertificate,
    check_anderson_allowed,
    check_injection_eps,
    check_positive_concave_activation,
)
from ._base import _conv_map, _zero_state, _ConvDEQ


class PositiveConcaveConvDEQ(_ConvDEQ):
    """Positive concave convolutional DEQ (pcDEQ): x (batch, in_channels, H, W) -> z* (batch, channels, H, W),
    z* = act(conv(z*, K) + s(x)).

    K = softplus(V) >= 0 elementwise (never NaN), s(x) = softplus(conv(x, U) + b) + injection_eps > 0, activation
    one of tanh, softsign, relu6, sigmoid. What carries over from PositiveConcaveDEQ, unchanged: the convolution
    z -> conv(z, K) with zero padding is the linear map of a (C H W) x (C H W) matrix A whose entries are taps of K
    (or 0 where a tap falls on the padding), so A >= 0 elementwise, and z -> act(A z + s) is a positive concave
    mapping bounded by sup(act): unique fixed point in the nonnegative orthant, geometric convergence of the plain
    iteration from every z0 >= 0 (any z0 for relu6 and sigmoid), monotonically increasing from 0, for every size of
    K and every (H, W): no bound on K is needed. The implicit backward converges too (spectral radius of the
    Jacobian <= the rate). Plain iteration (Picard) from z0 = 0, forward and backward: see `certificate()`; or
    method="anderson" (m, beta) with relu6 or sigmoid, as the dense layer allows (the certificate's iteration bounds
    are the plain iteration's).
    """

    @api_changes("PositiveConcaveConvDEQ", old_positional=(
        "activation", "tol", "max_iter", "backend", "on_nonconvergence", "backward_tol", "backward_max_iter",
        "injection_eps", "init_row_sum", "device", "dtype"))
    def __init__(self, in_channels: int, channels: int, kernel_size: int = 3, *, activation: str = "tanh",
                 tol: float = 1e-4, max_iter: int = 100, backend: str = "auto", on_nonconvergence: str = "warn",
                 backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None,
                 injection_eps: float = 1e-3, init_row_sum: float = 0.5, method: str = "picard", m: int = 5, beta: float = 1.0,
                 device=None, dtype=None):
        what = "PositiveConcaveConvDEQ"
        check_positive_concave_activation(what, activation)
        injection_eps = check_injection_eps(what, injection_eps, activation)
        check_anderson_allowed(what, method, activation)
        super().__init__(in_channels, channels, kernel_size, activation, tol, max_iter, backend, on_nonconvergence,
                         backward_tol, backward_max_iter, device, dtype, method, m, beta)
        self.injection_eps = injection_eps
        self.init_row_sum = validation.check_positive(what, "init_row_sum", init_row_sum)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # taps ~ U(0, 2 init_row_sum / (C k k)): expected row sums of A (interior pixels) init_row_sum
        fan_in = self.channels * self.kernel_size ** 2
        k = torch.rand_like(self.weight_raw).mul_(2 * self.init_row_sum / fan_in).clamp_min_(1e-6)
        self.weight_raw.copy_(torch.log(torch.expm1(k)))  # softplus^{-1}
        self.injection.reset_parameters()

    @property
    def kernel(self) -> torch.Tensor:
        """K = softplus(V) >= 0 (finite for every finite V); the same for every input shape."""
        return F.softplus(self.weight_raw)

    def compute_kernel(self, input_shape=None) -> torch.Tensor:
        """K = softplus(V) (input_shape is ignored: the guarantee does not depend on it)."""
        return self.kernel

    def injection_values(self, x: torch.Tensor) -> torch.Tensor:
        """s(x) = softplus(conv(x, U) + b) + injection_eps (> 0)."""
        return F.softplus(self.injection(x)) + self.injection_eps

    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        spatial = self._check_input(x, z0)
        if z0 is not None and self.activation not in _NONNEGATIVE_RANGE and not bool((z0 >= 0).all()):
            raise ValueError(f"deqkern.{type(self).__name__}: z0 must be >= 0 for activation {self.activation!r} "
                             "(the fixed point is unique in the nonnegative orthant only)")
        self.last_input_shape = spatial
        return self._solve(self.kernel, self.injection_values(x), z0)

    @torch.no_grad()
    def certificate(self, x: Optional[torch.Tensor] = None) -> PositiveConcaveCertificate:
        """As PositiveConcaveDEQ.certificate: rate_bound for every input; with x, per sample, the rate bound
        1 - min act(s(x)) / zbar (zbar = T^K(sup 1), the iteration from above), the forward iteration bound, the
        measured rate of the plain iteration (float64) and the iterations of the layer's own solve. The samples are
        the flattened (C, H, W) maps (the minimum runs over every channel and pixel); the same proofs as the dense
        layer's (deqkern/nn/certified/positive_concave_rates.py), with the convolution as the nonnegative linear
        part."""
        K = self.kernel
        cert = PositiveConcaveCertificate.of(
            self.activation, K, self.injection_eps,
            guarantee=("K >= 0 makes the zero-padded convolution a nonnegative matrix; with a positive concave "
                       "activation and a positive injection z -> act(conv(z, K) + s) is a positive concave mapping "
                       "bounded by sup(act): unique fixed point in the nonnegative orthant, geometric convergence "
                       "of the plain iteration from 0 (monotonically increasing), for every K and every input "
                       "shape; the implicit backward converges (spectral radius of the Jacobian <= the rate bound)"))
        if x is not None:
            self._check_input(x)
            c = self.injection_values(x)
            Kd = K.double()
            cert.add_sample_rates(lambda z: F.conv2d(z, Kd, None, 1, self.padding), c, self.tol, self.max_iter)
            inputs = self._inputs(K, c)
            options = dict(self.deq.solver_options, on_nonconvergence="ignore")
            _, info = solve(lambda z: _conv_map(z, inputs), _zero_state(inputs), method="picard", **options)
            cert.forward_iterations = info.iterations.cpu()
        return cert

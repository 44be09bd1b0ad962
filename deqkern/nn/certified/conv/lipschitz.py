"""LipschitzConvDEQ: ||conv(., K)||_2 <= gamma / Lip(act) on the forward's input shape, by a proven upper bound of
the padded convolution's operator norm."""
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from ....activations import get_activation
from ....core.api import api_changes
from ....core import validation
from ....lipschitz import conv_operator_norm, conv_operator_norm_upper_bound
from ._base import _check_spatial, _ConvDEQ


class KernelBound(NamedTuple):
    """The proof behind the latest K: raw_norm_bound >= ||conv(., V)||_2 (conv_operator_norm_upper_bound on
    input_shape), kernel_norm_bound = raw_norm_bound * scale >= ||conv(., K)||_2 (<= gamma / Lip(act), up to K's
    rounding), scale = K / V."""

    kernel_norm_bound: float
    raw_norm_bound: float
    scale: float
    input_shape: Tuple[int, int]


@dataclass
class LipschitzConvCertificate:
    """What a LipschitzConvDEQ guarantees on inputs of spatial shape input_shape = (H, W) (Euclidean norm of the
    flattened (C, H, W) sample throughout), for K = compute_kernel(input_shape), the kernel of every forward on
    that shape.

    kernel_operator_norm: ||conv(., K)||_2 by power iteration (deqkern.lipschitz.conv_operator_norm, to
    power_tol), a lower bound; kernel_norm_bound: the proven upper bound (conv_operator_norm_upper_bound) every
    figure below uses. contraction_factor q = Lip(act) kernel_norm_bound (<= gamma by construction, up to
    rounding): z -> act(conv(z, K) + c) is a q-contraction per sample, and so is the adjoint map
    g -> conv_transpose(act'(u) * g, K) + v the backward iterates (|act'| <= Lip(act), ||A^T||_2 = ||A||_2).
    forward_iterations_bound / backward_iterations_bound: `picard_iteration_bound(q, tol)`, the evaluations after
    which every sample of the solve from 0 has stopped (exact arithmetic). input_lipschitz_bound:
    ||z*(x) - z*(x')||_2 <= Lip(act) injection_norm_bound / (1 - q) ||x - x'||_2, injection_norm_bound a proven
    bound of the injection conv's operator norm (injection_operator_norm: its power-iteration lower bound).
    """

    gamma: float
    activation: str
    activation_lipschitz: float
    input_shape: Tuple[int, int]
    kernel_operator_norm: float
    kernel_norm_bound: float
    contraction_factor: float
    tol: float
    forward_iterations_bound: Optional[int]
    backward_tol: float
    backward_iterations_bound: Optional[int]
    within_max_iter: bool
    injection_operator_norm: float
    injection_norm_bound: float
    input_lipschitz_bound: float
    guarantee: str


class LipschitzConvDEQ(_ConvDEQ):
    """2-norm contractive convolutional DEQ: x (batch, in_channels, H, W) -> z* (batch, channels, H, W),
    z* = act(conv(z*, K) + conv(x, U) + b).

    K = V min(1, (gamma / Lip(act)) / sigma_bar(V)) with sigma_bar(V) = conv_operator_norm_upper_bound(V, (C, H, W),
    padding=k // 2), a PROVEN bound of the operator norm of the padded convolution on the forward's own (H, W)
    (read from x at each call): ||conv(., K)||_2 <= gamma / Lip(act) for the K of every forward, in training and in
    eval (up to K's rounding in its dtype), with no power-iteration state: the training and eval kernels are the
    same function of V. The bound is the norm of the circular convolution, 1.02-1.05x the true norm on 8x8 inputs
    and 1.001-1.006x on 24x24 (3x3 kernels; looser on tiny maps: 1.1-1.2x on 4x4), so K is at most that much more
    conservative than needed. The gradient flows through sigma_bar itself (differentiable: the top singular value of
    the kernel's DFT at the maximising frequency), so the layer is an exact differentiable function of V; no ratio
    is held fixed. Cost per forward: one batched SVD of ~(H + k)(W + k) / 2 complex (C, C) matrices in float64 and
    one host synchronisation. Plain iteration (Picard) from z0 = 0, forward and backward (see `certificate()`), or
    method="anderson" (m, beta): the fixed point of a contraction is unique, so Anderson finds the same one.
    """

    @api_changes("LipschitzConvDEQ", old_positional=(
        "gamma", "activation", "tol", "max_iter", "backend", "on_nonconvergence", "backward_tol",
        "backward_max_iter", "init_scale", "device", "dtype"))
    def __init__(self, in_channels: int, channels: int, kernel_size: int = 3, *, gamma: float = 0.9,
                 activation: str = "tanh", tol: float = 1e-4, max_iter: int = 100, backend: str = "auto",
                 on_nonconvergence: str = "warn", backward_tol: Optional[float] = None,
                 backward_max_iter: Optional[int] = None, init_scale: float = 1.0, method: str = "picard", m: int = 5,
                 beta: float = 1.0, device=None, dtype=None):
        what = "LipschitzConvDEQ"
        validation.check_contraction_factor(what, gamma, "Lip(act) ||conv(., K)||_2")
        super().__init__(in_channels, channels, kernel_size, activation, tol, max_iter, backend, on_nonconvergence,
                         backward_tol, backward_max_iter, device, dtype, method, m, beta)
        act = get_activation(activation)
        if act.lipschitz <= 0:
            raise ValueError(f"deqkern.{what}: activation {activation!r} has no positive Lipschitz constant")
        self.gamma = float(gamma)
        self.activation_lipschitz = float(act.lipschitz)
        self.max_kernel_norm = self.gamma / self.activation_lipschitz
        self.init_scale = validation.check_positive(what, "init_scale", init_scale)
        self.last_kernel_bound: Optional[KernelBound] = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        fan_in = self.channels * self.kernel_size ** 2
        nn.init.normal_(self.weight_raw, std=self.init_scale / math.sqrt(fan_in))
        self.injection.reset_parameters()

    def _kernel_and_bound(self, input_shape):
        V = self.weight_raw
        bound = conv_operator_norm_upper_bound(V, (self.channels, *input_shape), padding=self.padding)
        # sigma_bar in V's dtype, rounded up: the cast must not lower it below the proven float64 value
        upper = (bound * (1.0 + 4.0 * torch.finfo(V.dtype).eps)).to(V.dtype)
        scale = torch.clamp(self.max_kernel_norm / upper.clamp_min(torch.finfo(V.dtype).tiny), max=1.0)
        raw, s = float(bound.detach()), float(scale.detach())
        return V * scale, KernelBound(raw * s, raw, s, tuple(input_shape))

    def compute_kernel(self, input_shape) -> torch.Tensor:
        """K = V min(1, (gamma / Lip(act)) / sigma_bar(V)) for inputs of spatial shape (H, W) (differentiable)."""
        return self._kernel_and_bound(_check_spatial(type(self).__name__, input_shape))[0]

    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        spatial = self._check_input(x, z0)
        kernel, self.last_kernel_bound = self._kernel_and_bound(spatial)
        self.last_input_shape = spatial
        return self._solve(kernel, self.injection_values(x), z0)

    @torch.no_grad()
    def certificate(self, input_shape=None, power_tol: float = 1e-8,
                    power_max_iter: int = 20000) -> LipschitzConvCertificate:
        """The certificate for inputs of spatial shape input_shape = (H, W) (default: the latest forward's).
        power_tol, power_max_iter: of the power iteration behind kernel_operator_norm and injection_operator_norm
        (lower bounds, reported beside the proven ones; not used by any bound)."""
        spatial = self._resolve_shape(input_shape)
        K = self.compute_kernel(spatial).double()
        U = self.injection.weight.double()
        options = dict(padding=self.padding, max_iter=power_max_iter, tol=power_tol, on_nonconvergence="ignore")
        k_norm = float(conv_operator_norm(K, (self.channels, *spatial), **options).value)
        u_norm = float(conv_operator_norm(U, (self.in_channels, *spatial), **options).value)
        k_bound = float(conv_operator_norm_upper_bound(K, (self.channels, *spatial), padding=self.padding))
        u_bound = float(conv_operator_norm_upper_bound(U, (self.in_channels, *spatial), padding=self.padding))
        q = self.activation_lipschitz * k_bound
        fwd, bwd = self._iteration_bounds(q)
        within = fwd is not None and bwd is not None and fwd <= self.max_iter and bwd <= self.backward_max_iter
        lip_bound = self.activation_lipschitz * u_bound / (1 - q) if q < 1 else math.inf
        return LipschitzConvCertificate(
            gamma=self.gamma, activation=self.activation, activation_lipschitz=self.activation_lipschitz,
            input_shape=spatial, kernel_operator_norm=k_norm, kernel_norm_bound=k_bound, contraction_factor=q,
            tol=self.tol, forward_iterations_bound=fwd, backward_tol=self.backward_tol, backward_iterations_bound=bwd,
            within_max_iter=within, injection_operator_norm=u_norm, injection_norm_bound=u_bound,
            input_lipschitz_bound=lip_bound,
            guarantee=(f"on {spatial[0]}x{spatial[1]} inputs, q = Lip(act) ||conv(., K)||_2 <= {q:.6g} < 1 (a proven "
                       f"bound of the padded convolution's operator norm): unique fixed point, the plain iteration "
                       f"from 0 stops within {fwd} evaluations at tol={self.tol:g} and the implicit backward within "
                       f"{bwd} at tol={self.backward_tol:g} (exact arithmetic); ||z*(x) - z*(x')||_2 <= "
                       f"{lip_bound:.6g} ||x - x'||_2")
            if q < 1 else f"q = Lip(act) ||conv(., K)||_2 <= {q:.6g}, not < 1: nothing is certified",
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma}"

"""LinfContractiveConvDEQ: mu_inf of the convolution matrix <= mu by a condition on each output channel's taps
(the l-infinity theory of LinfContractiveDEQ)."""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ....core.api import api_changes
from ....core import validation
from ..linf_contractive import _SLOPE_RESTRICTED
from ._base import _ConvDEQ


@dataclass
class LinfConvCertificate:
    """What a LinfContractiveConvDEQ guarantees (l-infinity norm of the flattened (C, H, W) sample throughout).

    mu_inf_bound = max_c (K[c, c, ctr] + sum of |K[c, c', i, j]| over the other taps) >= mu_inf(A) for the conv
    matrix A on every input shape (equal once H, W >= k: an interior pixel sees every tap), <= mu < 1.
    alpha = 1 / (1 - min(min_c K[c, c, ctr], 0)) makes the diagonal of (1 - alpha) I + alpha D A (D = diag(Phi'),
    in [0, 1]) nonnegative, so the averaged map is an l-infinity contraction with factor
    contraction_factor = 1 - alpha (1 - mu_+), mu_+ = max(mu_inf_bound, 0). injection_linf_norm = max_c sum |U[c]|
    >= ||B||_inf of the injection conv; input_lipschitz_bound = injection_linf_norm / (1 - mu_+):
    ||z*(x) - z*(x')||_inf <= that ||x - x'||_inf. The backward iterates the transposed Jacobian, an l1
    contraction with the same factor (||J^T||_1 = ||J||_inf). With input_shape (H, W): forward / backward
    iteration bounds of the solves from 0, `picard_iteration_bound(q, tol / sqrt(C H W))` (the solver's stop rule
    is relative in the 2-norm: r_k <= sqrt(C H W) q^(k-1) (1 + q) / (1 - q^k) from the l-inf (l1) contraction).
    """

    mu: float
    mu_inf_bound: float
    alpha: float
    contraction_factor: float
    injection_linf_norm: float
    input_lipschitz_bound: float
    activation: str
    guarantee: str
    input_shape: Optional[Tuple[int, int]] = None
    forward_iterations_bound: Optional[int] = None
    backward_iterations_bound: Optional[int] = None


class LinfContractiveConvDEQ(_ConvDEQ):
    """l-infinity contractive convolutional DEQ: x (batch, in_channels, H, W) -> z* (batch, channels, H, W),
    z* = Phi(conv(z*, K) + conv(x, U) + b), Phi slope-restricted in [0, 1] (relu, tanh, sigmoid, softsign, relu6,
    identity).

    What carries over from LinfContractiveDEQ: with stride 1, 'same' padding and C_out = C_in, row (c, h, w) of the
    conv matrix A has the diagonal entry K[c, c, ctr, ctr] (ctr = k // 2; the centre tap reads the pixel itself)
    and off-diagonal entries the other taps of output channel c (those falling on the padding dropped at the
    borders), so mu_inf(A) = max_rows (a_ii + sum_{j != i} |a_ij|) <= max_c (K[c, c, ctr, ctr] + sum over the other
    taps |K[c, :, :, :]|), for every (H, W). The dense parameterisation on the taps, K = T with the centre diagonal
    tap replaced by mu - sum_{other taps} |T[c]| + t - |t| (t = T[c, c, ctr, ctr]), makes that bound
    mu + t - |t| <= mu for every T, and every kernel with the bound <= mu is reached. The averaged iteration with
    alpha* = 1 / (1 - min(min_c K[c, c, ctr, ctr], 0)) (computed from K on each call, one host synchronisation) is
    then an l-infinity contraction: unique fixed point and the l-infinity input-output bound of the dense layer.
    method="anderson" (m, beta) accelerates the averaged map instead (same fixed point; the certificate's iteration
    bounds are the plain iteration's).
    The solve runs plain Picard on the averaged map (1 - alpha) z + alpha f(z, x) (same fixed point; the IFT
    gradient does not depend on alpha).
    """

    @api_changes("LinfContractiveConvDEQ", old_positional=(
        "mu", "activation", "tol", "max_iter", "backend", "on_nonconvergence", "backward_tol", "backward_max_iter",
        "init_scale", "device", "dtype"))
    def __init__(self, in_channels: int, channels: int, kernel_size: int = 3, *, mu: float = 0.5,
                 activation: str = "relu", tol: float = 1e-4, max_iter: int = 100, backend: str = "auto",
                 on_nonconvergence: str = "warn", backward_tol: Optional[float] = None,
                 backward_max_iter: Optional[int] = None, init_scale: float = 1.0, method: str = "picard", m: int = 5, beta: float = 1.0,
                 device=None, dtype=None):
        what = "LinfContractiveConvDEQ"
        validation.check_choice(what, "activation", activation, _SLOPE_RESTRICTED)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or not mu < 1:
            raise ValueError(f"deqkern.{what}: mu must be a finite number < 1 (the bound on mu_inf of the conv "
                             f"matrix that makes the layer an l-infinity contraction), got {mu!r}")
        super().__init__(in_channels, channels, kernel_size, activation, tol, max_iter, backend, on_nonconvergence,
                         backward_tol, backward_max_iter, device, dtype, method, m, beta)
        self.mu = float(mu)
        self.init_scale = validation.check_positive(what, "init_scale", init_scale)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # taps ~ N(0, (init_scale / (C k k))^2): sums of |T[c]| about 0.8 init_scale, so alpha* is close to 1
        nn.init.normal_(self.weight_raw, std=self.init_scale / (self.channels * self.kernel_size ** 2))
        self.injection.reset_parameters()

    @staticmethod
    def kernel_from(T: torch.Tensor, mu: float) -> torch.Tensor:
        """K = T with K[c, c, ctr, ctr] = T[c, c, ctr, ctr] + mu - sum |T[c]|: its mu_inf bound is <= mu."""
        ctr = T.shape[-1] // 2
        delta = mu - T.abs().sum(dim=(1, 2, 3))
        return T + F.pad(torch.diag_embed(delta)[:, :, None, None], (ctr, ctr, ctr, ctr))

    @staticmethod
    def mu_inf_bound(K: torch.Tensor) -> torch.Tensor:
        """max_c (K[c, c, ctr, ctr] + sum over the other taps of |K[c]|) >= mu_inf(A) (0-dim)."""
        ctr = K.shape[-1] // 2
        diag = K[:, :, ctr, ctr].diagonal()
        return (diag + K.abs().sum(dim=(1, 2, 3)) - diag.abs()).max()

    @staticmethod
    def averaging_from(K: torch.Tensor) -> float:
        """alpha* = 1 / (1 - min(min_c K[c, c, ctr, ctr], 0))."""
        ctr = K.shape[-1] // 2
        return 1.0 / (1.0 - min(float(K.detach()[:, :, ctr, ctr].diagonal().min()), 0.0))

    @property
    def kernel(self) -> torch.Tensor:
        """K, the kernel the solve uses (the same for every input shape)."""
        return self.kernel_from(self.weight_raw, self.mu)

    def compute_kernel(self, input_shape=None) -> torch.Tensor:
        """K (input_shape is ignored: the bound holds for every shape)."""
        return self.kernel

    def _averaging(self, kernel) -> float:
        return self.averaging_from(kernel)

    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        spatial = self._check_input(x, z0)
        self.last_input_shape = spatial
        return self._solve(self.kernel, self.injection_values(x), z0)

    @torch.no_grad()
    def certificate(self, input_shape=None) -> LinfConvCertificate:
        """The certificate; with input_shape = (H, W) (default: the latest forward's, if any) also the iteration
        bounds of the forward and backward solves on that shape."""
        spatial = None if input_shape is None and self.last_input_shape is None else self._resolve_shape(input_shape)
        K = self.kernel_from(self.weight_raw.double(), self.mu)
        mu_inf = float(self.mu_inf_bound(K))
        alpha = self.averaging_from(K)
        mu_plus = max(mu_inf, 0.0)
        b_norm = float(self.injection.weight.double().abs().sum(dim=(1, 2, 3)).max())
        factor = 1.0 - alpha * (1.0 - mu_plus)
        bound = b_norm / (1.0 - mu_plus) if mu_plus < 1 else math.inf
        fwd = bwd = None
        if spatial is not None and factor < 1:
            fwd, bwd = self._iteration_bounds(factor, math.sqrt(self.channels * spatial[0] * spatial[1]))
        return LinfConvCertificate(
            mu=self.mu, mu_inf_bound=mu_inf, alpha=alpha, contraction_factor=factor, injection_linf_norm=b_norm,
            input_lipschitz_bound=bound, activation=self.activation, input_shape=spatial,
            forward_iterations_bound=fwd, backward_iterations_bound=bwd,
            guarantee=("mu_inf(conv(., K)) <= mu < 1 for every input shape and Phi slope-restricted in [0, 1]: "
                       f"unique fixed point; the averaged iteration with alpha = {alpha:.6g} is an l-infinity "
                       f"contraction with factor {factor:.6g} from any start (the implicit backward: an l1 "
                       f"contraction with the same factor); ||z*(x) - z*(x')||_inf <= {bound:.6g} ||x - x'||_inf"),
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mu={self.mu}"

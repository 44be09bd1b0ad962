"""What the certified convolutional DEQs share: the map z -> act(conv(z, K) + c) a DEQ iterates, the checks,
and _ConvDEQ (the state, the solve through deqkern.DEQ with its implicit backward, the iteration bounds)."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ....activations import ACTIVATIONS, get_activation
from ....core import validation
from ....core.backends import BACKENDS
from ....core.constants import ANDERSON_DEFAULT_LAM, DENSE_METHODS
from ....core.info import SolverInfo
from ....core.policy import check_policy
from ...deq import DEQ
from ..bounds import picard_iteration_bound


# ---------------------------------------------------------------- the map the DEQ iterates
def _conv_map(z, inputs):
    """(1 - alpha) z + alpha act(conv(z, K) + c), inputs = (K, c, act, padding, alpha): module-level (with
    `_zero_state`), so that a layer pickles and deep-copies."""
    kernel, c, act, padding, alpha = inputs
    out = act(F.conv2d(z, kernel, None, 1, padding) + c)
    return out if alpha == 1.0 else (1.0 - alpha) * z + alpha * out


def _zero_state(inputs):
    """The start z0 = 0, of the injection's shape (batch, channels, H, W)."""
    return torch.zeros_like(inputs[1])


def _check_odd_kernel(what, kernel_size):
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"deqkern.{what}: kernel_size must be an odd integer >= 1 (the 'same' zero padding "
                         f"kernel_size // 2 keeps the spatial size, so that z and conv(z, K) have one shape), got "
                         f"{kernel_size!r}")
    return kernel_size


def _check_spatial(what, input_shape):
    """(H, W) as two ints >= 1."""
    if (not isinstance(input_shape, (tuple, list, torch.Size)) or len(input_shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_shape)):
        raise ValueError(f"deqkern.{what}: input_shape must be the spatial shape (H, W) of the layer's inputs, two "
                         f"integers >= 1, got {input_shape!r}")
    return tuple(int(s) for s in input_shape)


class _ConvDEQ(nn.Module):
    """The state every certified convolutional layer holds: the injection conv U (in_channels -> channels, 'same'
    padding, with bias), the unconstrained recurrent kernel `weight_raw` V (channels, channels, k, k) the layer
    maps to its certified K (filled by the layer's reset_parameters), the DEQ that solves and differentiates, and
    the statistics of the latest forward."""

    def __init__(self, in_channels, channels, kernel_size, activation, tol, max_iter, backend, on_nonconvergence,
                 backward_tol, backward_max_iter, device, dtype, method="picard", m=5, beta=1.0):
        super().__init__()
        what = type(self).__name__
        validation.check_int(what, "in_channels", in_channels, 1)
        validation.check_int(what, "channels", channels, 1)
        _check_odd_kernel(what, kernel_size)
        validation.check_choice(what, "activation", activation, tuple(ACTIVATIONS))
        validation.check_positive(what, "tol", tol)
        validation.check_int(what, "max_iter", max_iter, 1)
        validation.check_choice(what, "backend", backend, BACKENDS)
        check_policy(what, on_nonconvergence)
        backward_tol = tol if backward_tol is None else validation.check_positive(what, "backward_tol", backward_tol)
        backward_max_iter = (max_iter if backward_max_iter is None
                             else validation.check_int(what, "backward_max_iter", backward_max_iter, 1))
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.channels, self.kernel_size = in_channels, channels, kernel_size
        self.padding = kernel_size // 2
        self.activation = activation
        self.tol, self.max_iter = float(tol), int(max_iter)
        self.backward_tol, self.backward_max_iter = float(backward_tol), int(backward_max_iter)
        self.injection = nn.Conv2d(in_channels, channels, kernel_size, padding=self.padding, **factory)
        self.weight_raw = nn.Parameter(torch.empty(channels, channels, kernel_size, kernel_size, **factory))
        validation.check_choice(what, "method", method, DENSE_METHODS)
        common = dict(tol=tol, max_iter=max_iter, on_nonconvergence=on_nonconvergence, backend=backend)
        if method == "anderson":
            validation.check_anderson_options(what, m, beta, ANDERSON_DEFAULT_LAM)
            common.update(m=m, beta=beta)
        else:
            common.update(alpha=1.0)
        # plain iteration forward and backward (the iteration the certificates bound), or Anderson where a layer
        # allows it
        self.method = method
        self.deq = DEQ(_conv_map, method=method, backward="ift", solver_options=common,
                       backward_options=dict(common, method=method, tol=backward_tol, max_iter=backward_max_iter),
                       z_shape=_zero_state)
        self.last_info: Optional[SolverInfo] = None
        self.last_kernel: Optional[torch.Tensor] = None  # the K of the latest forward (detached)
        self.last_input_shape: Optional[Tuple[int, int]] = None  # its (H, W)

    # ---------------------------------------------------------------- what a layer defines
    def compute_kernel(self, input_shape) -> torch.Tensor:
        """K, the certified kernel for inputs of spatial shape input_shape = (H, W) (differentiable in V)."""
        raise NotImplementedError

    def _averaging(self, kernel) -> float:
        """alpha of the solve's iteration z <- (1 - alpha) z + alpha f(z, x): 1 (plain iteration) unless overridden."""
        return 1.0

    def injection_values(self, x: torch.Tensor) -> torch.Tensor:
        """c(x) = conv(x, U) + b, (batch, channels, H, W)."""
        return self.injection(x)

    # ---------------------------------------------------------------- shared
    def _check_input(self, x, z0=None, z_name="z0"):
        """x: (batch, in_channels, H, W) of the layer's dtype and device; z0 (named z_name), when given:
        (batch, channels, H, W). Returns (H, W)."""
        what = type(self).__name__
        validation.check_tensor(what, "x", x, like=self.weight_raw, like_name="the layer's weight")
        if x.dim() != 4 or x.shape[1] != self.in_channels or 0 in x.shape:
            raise ValueError(f"deqkern.{what}: x must be a non-empty (batch, in_channels={self.in_channels}, H, W) "
                             f"tensor, got shape {tuple(x.shape)}")
        if z0 is not None:
            validation.check_tensor(what, z_name, z0, like=self.weight_raw, like_name="the layer's weight")
            expected = (x.shape[0], self.channels, *x.shape[2:])
            if tuple(z0.shape) != expected:
                raise ValueError(f"deqkern.{what}: {z_name} must be (batch, channels, H, W) = {expected}, got shape "
                                 f"{tuple(z0.shape)}")
        return tuple(x.shape[2:])

    def _inputs(self, kernel, c):
        return (kernel, c, get_activation(self.activation).fn, self.padding, self._averaging(kernel))

    def f(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The map whose fixed point forward returns: act(conv(z, K) + c(x)), with K = compute_kernel for x's (H, W);
        z: (batch, channels, H, W). Differentiable in z, x and the parameters."""
        spatial = self._check_input(x, z, z_name="z")
        return _conv_map(z, (self.compute_kernel(spatial), self.injection_values(x),
                             get_activation(self.activation).fn, self.padding, 1.0))

    def _solve(self, kernel, c, z0):
        z = self.deq(self._inputs(kernel, c), z0=z0)
        self.last_info = self.deq.last_info
        self.last_kernel = kernel.detach()
        return z

    def _resolve_shape(self, input_shape):
        what = type(self).__name__
        if input_shape is None:
            if self.last_input_shape is None:
                raise ValueError(f"deqkern.{what}: pass input_shape=(H, W) (no forward has run yet to take it from)")
            return self.last_input_shape
        return _check_spatial(what, input_shape)

    def _iteration_bounds(self, q, norm_factor=1.0):
        """(forward, backward) picard_iteration_bound of a q-contraction, at tol / norm_factor (the factor between
        the contraction's norm and the 2-norm of the solver's stop rule)."""
        return (picard_iteration_bound(q, self.tol / norm_factor),
                picard_iteration_bound(q, self.backward_tol / norm_factor))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, channels={self.channels}, kernel_size={self.kernel_size}, "
                f"activation={self.activation!r}")

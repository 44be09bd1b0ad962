"""DenseImplicitLayer: what every dense implicit layer of deqkern (DEQLinear and the certified layers) exposes,
so that the Jacobian tools, user code and tests use the layer's own definition instead of re-deriving it, and the
Jacobian regularisation they all offer (`jac_reg=`).

A dense layer returns the fixed point of f(z, x) = act(z W^T + c(x)), with `weight` the W its forward uses,
`injection_values(x)` the c(x) it adds (a pcDEQ's is softplus(x U^T + b) + eps, not the raw linear map) and
`activation` the name of act. `f(z, x)` is that map, differentiable in z, x and the parameters.
"""
import functools
import math
from typing import Optional

import torch
from torch import nn

from ..activations import get_activation
from ..core.policy import caller_inputs


def names_its_inputs(forward):
    """Decorator for a dense layer's forward(x, z0=None): a solve that fails on a non-finite input names the layer's
    x (and its samples) or parameter, not the internal c or W computed from them (core/policy.caller_inputs)."""

    @functools.wraps(forward)
    def wrapper(self, x, z0=None):
        named = lambda: {"x": x, "z0": z0, **{f"parameter {n!r}": p for n, p in self.named_parameters()}}  # noqa
        with caller_inputs(type(self).__name__, named):
            return forward(self, x, z0)

    return wrapper


class _AddPenaltyGradient(torch.autograd.Function):
    """Identity on z whose backward also sends gradient 1 into `penalty`: the penalty's gradient reaches the
    parameters whenever the loss is backpropagated through the layer's output, with no change to the loss (nn.DEQ's
    jac_reg; the dense layers add theirs inside the solve's backward instead)."""

    @staticmethod
    def forward(ctx, z, penalty):
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=grad.dtype, device=grad.device)


def add_penalty_gradient(z: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """z (a view), whose backward also backpropagates gradient 1 into the 0-dim `penalty`."""
    return _AddPenaltyGradient.apply(z, penalty)


def parse_jac_reg(what, jac_reg):
    """jac_reg: None, a weight w >= 0, or (w, probability in (0, 1]): (w, p)."""
    if jac_reg is None:
        return 0.0, 1.0
    weight, probability = (jac_reg if isinstance(jac_reg, (tuple, list)) else (jac_reg, 1.0))
    for name, value, ok in (("weight", weight, lambda v: v >= 0), ("probability", probability, lambda v: 0 < v <= 1)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"deqkern.{what}: jac_reg must be a weight >= 0 or (weight, probability in (0, 1]), "
                             f"got {jac_reg!r}")
    return float(weight), float(probability)


class DenseImplicitLayer(nn.Module):
    """Base of the dense implicit layers: z* = act(z* W^T + c(x)). Subclasses set `activation` (a name of
    deqkern.ACTIVATIONS), `injection` (the nn.Linear x -> x U^T + b) and `weight`, call `set_jac_reg` in their
    constructor, override `injection_values` when c(x) is more than `injection(x)`, and pass
    `jacobian_penalty=self.jacobian_penalty_weight()` to their solve."""

    activation: str
    # read by deqkern.jacobian: f(z, x) = act(z W^T + c(x)) with this layer's weight, injection_values, activation
    defines_dense_map = True
    jac_reg_weight: float = 0.0
    jac_reg_probability: float = 1.0
    last_info = None

    def set_jac_reg(self, jac_reg):
        """Jacobian regularisation (Bai, Koltun and Kolter 2021): jac_reg = w or (w, p). In training mode, with
        probability p per forward, the gradient of w ||J_f(z*)||_F^2 / z*.numel() is added to the gradient of
        whatever loss is backpropagated through the output (the loss value itself is unchanged). The exact
        penalty of the dense map, z* held constant as in Bai et al.'s code, computed inside the solve's implicit
        backward (`fixed_point_dense(..., jacobian_penalty=w)`): one extra product z* W^T, no double backward.
        The penalty's value is `last_jac_loss` once the backward has run."""
        self.jac_reg_weight, self.jac_reg_probability = parse_jac_reg(type(self).__name__, jac_reg)

    def jacobian_penalty_weight(self) -> float:
        """The `jacobian_penalty` weight for this forward's solve: jac_reg's w in training mode when drawn, else 0."""
        if self.jac_reg_weight == 0.0 or not self.training or not torch.is_grad_enabled():
            return 0.0
        if self.jac_reg_probability < 1.0 and float(torch.rand(())) >= self.jac_reg_probability:
            return 0.0
        return self.jac_reg_weight

    @property
    def last_jac_loss(self) -> Optional[torch.Tensor]:
        """||J_f(z*)||_F^2 / numel of the latest forward's fixed point, once its backward has run with the penalty
        (None otherwise: no jac_reg, eval mode, not drawn, or no backward yet)."""
        return None if self.last_info is None else self.last_info.jacobian_penalty

    @staticmethod
    def autocast_operands(W: torch.Tensor, c: torch.Tensor, z0: Optional[torch.Tensor]):
        """(W, c, z0) for the solve: under torch.autocast on their device type, all in the autocast dtype (as
        nn.Linear's product is), so the solve reads half-precision data and accumulates in float32, and the gradient
        reaches the float32 parameters through the casts; otherwise as given."""
        device_type = W.device.type
        if W.dtype != torch.float32 or not torch.is_autocast_enabled(device_type):  # autocast lowers float32 only
            return W, c, z0
        dtype = torch.get_autocast_dtype(device_type)
        return W.to(dtype), c.to(dtype), None if z0 is None else z0.to(dtype)

    @staticmethod
    def in_weight_dtype(W: torch.Tensor, c: torch.Tensor, z0: Optional[torch.Tensor]):
        """(c, z0) in W's dtype, for the certified layers: they solve in their weight's dtype (under torch.autocast
        their injection comes out in half precision, and is widened back exactly), so that the certificate proven
        for W holds for the solve."""
        return c.to(W.dtype), None if z0 is None else z0.to(W.dtype)

    def injection_values(self, x: torch.Tensor) -> torch.Tensor:
        """c(x), the injection the solve adds: x U^T + b."""
        return self.injection(x)

    def f(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The map whose fixed point the forward returns: act(z W^T + c(x)), with the layer's `weight` (the
        eval-mode weight of a LipschitzDEQ: its training forward may scale W a little lower, by the slack of its
        norm proof; both satisfy its bound). z: (batch, hidden), x: the layer's input."""
        return get_activation(self.activation).fn(z @ self.weight.T + self.injection_values(x))

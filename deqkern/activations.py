"""The activation table: one row per activation, shared by every backend.

The integer id is the contract with the kernels: `csrc/common/activations.h` (CPU and CUDA) and
`triton_kernels/activations.py` switch on it. Adding an activation is one row here, one `case` in each switch
there (act, act', and act' with act'' for the Jacobian penalty) and one branch in each Triton helper; the solver
kernels themselves do not change.
"""
from typing import Callable, NamedTuple, Tuple

import torch


class Activation(NamedTuple):
    id: int
    fn: Callable[[torch.Tensor], torch.Tensor]          # act(u)
    derivative: Callable[[torch.Tensor], torch.Tensor]  # act'(u), elementwise
    lipschitz: float                                    # sup |act'|
    # (act'(u), act''(u)) from one evaluation: the Jacobian penalty's gradient needs both (0 where act is
    # piecewise linear)
    derivatives: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def _sigmoid_derivative(u):
    s = torch.sigmoid(u)
    return s * (1 - s)


def _tanh_derivatives(u):
    t = torch.tanh(u)
    s = 1 - t * t
    return s, -2 * t * s


def _sigmoid_derivatives(u):
    g = torch.sigmoid(u)
    s = g * (1 - g)
    return s, s * (1 - 2 * g)


def _softsign_derivatives(u):
    r = 1 / (1 + u.abs())
    s = r * r
    return s, -2 * torch.sign(u) * s * r


def _piecewise_linear(derivative):
    return lambda u: (derivative(u), torch.zeros_like(u))


_RELU_DERIVATIVE = lambda u: (u > 0).to(u.dtype)  # noqa: E731
_RELU6_DERIVATIVE = lambda u: ((u > 0) & (u < 6)).to(u.dtype)  # noqa: E731

ACTIVATIONS = {
    "identity": Activation(0, lambda u: u, torch.ones_like, 1.0, _piecewise_linear(torch.ones_like)),
    "relu": Activation(1, torch.relu, _RELU_DERIVATIVE, 1.0, _piecewise_linear(_RELU_DERIVATIVE)),
    "tanh": Activation(2, torch.tanh, lambda u: 1 - torch.tanh(u) ** 2, 1.0, _tanh_derivatives),
    "sigmoid": Activation(3, torch.sigmoid, _sigmoid_derivative, 0.25, _sigmoid_derivatives),
    "softsign": Activation(4, lambda u: u / (1 + u.abs()), lambda u: 1 / (1 + u.abs()) ** 2, 1.0,
                           _softsign_derivatives),
    "relu6": Activation(5, lambda u: u.clamp(0, 6), _RELU6_DERIVATIVE, 1.0, _piecewise_linear(_RELU6_DERIVATIVE)),
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"deqkern: unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None

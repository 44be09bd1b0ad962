"""The activation table: one row per activation, shared by every backend.

The integer id is the contract with the kernels: `csrc/activations.h` (CPU and CUDA) and
`triton_kernels/activations.py` switch on it. Adding an activation is one row here, one `case` there
and one branch in the Triton helper; the solver kernels themselves do not change.
"""
from typing import Callable, NamedTuple

import torch


class Activation(NamedTuple):
    id: int
    fn: Callable[[torch.Tensor], torch.Tensor]          # act(u)
    derivative: Callable[[torch.Tensor], torch.Tensor]  # act'(u), elementwise
    lipschitz: float                                    # sup |act'|


def _sigmoid_derivative(u):
    s = torch.sigmoid(u)
    return s * (1 - s)


ACTIVATIONS = {
    "identity": Activation(0, lambda u: u, torch.ones_like, 1.0),
    "relu": Activation(1, torch.relu, lambda u: (u > 0).to(u.dtype), 1.0),
    "tanh": Activation(2, torch.tanh, lambda u: 1 - torch.tanh(u) ** 2, 1.0),
    "sigmoid": Activation(3, torch.sigmoid, _sigmoid_derivative, 0.25),
    "softsign": Activation(4, lambda u: u / (1 + u.abs()), lambda u: 1 / (1 + u.abs()) ** 2, 1.0),
    "relu6": Activation(5, lambda u: u.clamp(0, 6), lambda u: ((u > 0) & (u < 6)).to(u.dtype), 1.0),
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None

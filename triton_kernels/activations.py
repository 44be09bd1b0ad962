"""Activations for Triton kernels, switching on the integer ids of deqkern/activations.py.

ACTIVATION is a tl.constexpr, so each kernel instantiation keeps only its own branch. NaN propagates as in
PyTorch (torch.relu(nan) is nan), which is why relu/relu6 are written with `where` rather than tl.maximum.
"""
import triton
import triton.language as tl

IDENTITY: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(1)
TANH: tl.constexpr = tl.constexpr(2)
SIGMOID: tl.constexpr = tl.constexpr(3)
SOFTSIGN: tl.constexpr = tl.constexpr(4)
RELU6: tl.constexpr = tl.constexpr(5)


@triton.jit
def _tanh(u):
    # tl has no tanh in every Triton version. exp(-2|u|) lies in (0, 1], so nothing overflows; the error is
    # a few ulp absolute near 0 (cancellation in 1 - e), which is harmless next to |tanh(u)| <= 1.
    e = tl.exp(-2.0 * tl.abs(u))
    a = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -a, a)


@triton.jit
def apply_activation(u, ACTIVATION: tl.constexpr):
    """act(u), elementwise."""
    if ACTIVATION == RELU:
        return tl.where(u < 0, 0.0, u)
    elif ACTIVATION == TANH:
        return _tanh(u)
    elif ACTIVATION == SIGMOID:
        return 1.0 / (1.0 + tl.exp(-u))
    elif ACTIVATION == SOFTSIGN:
        return u / (1.0 + tl.abs(u))
    elif ACTIVATION == RELU6:
        return tl.where(u < 0, 0.0, tl.where(u > 6, 6.0, u))
    else:
        return u


@triton.jit
def activation_derivative(u, ACTIVATION: tl.constexpr):
    """act'(u), elementwise; 0 at the kinks of relu and relu6 (as the reference)."""
    if ACTIVATION == RELU:
        return tl.where(u > 0, 1.0, 0.0).to(u.dtype)
    elif ACTIVATION == TANH:
        t = _tanh(u)
        return 1.0 - t * t
    elif ACTIVATION == SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-u))
        return s * (1.0 - s)
    elif ACTIVATION == SOFTSIGN:
        a = 1.0 + tl.abs(u)
        return 1.0 / (a * a)
    elif ACTIVATION == RELU6:
        return tl.where((u > 0) & (u < 6), 1.0, 0.0).to(u.dtype)
    else:
        return tl.zeros_like(u) + 1.0


@triton.jit
def activation_derivatives(u, ACTIVATION: tl.constexpr):
    """(act'(u), act''(u)), elementwise from one evaluation, act' exactly activation_derivative's value: the Jacobian
    penalty's gradient needs both (act'' is 0 where act is piecewise linear, as the reference)."""
    if ACTIVATION == TANH:
        t = _tanh(u)
        s = 1.0 - t * t
        second = -2.0 * t * s
    elif ACTIVATION == SIGMOID:
        g = 1.0 / (1.0 + tl.exp(-u))
        s = g * (1.0 - g)
        second = s * (1.0 - 2.0 * g)
    elif ACTIVATION == SOFTSIGN:
        a = 1.0 + tl.abs(u)
        s = 1.0 / (a * a)
        second = -2.0 * tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0)).to(u.dtype) * s / a
    else:  # identity, relu, relu6: piecewise linear (a new smooth activation needs its branch here)
        s = activation_derivative(u, ACTIVATION)
        second = tl.zeros_like(u)
    return s, second

"""What the Jacobian tools share about their arguments: the checks of z, recognising a dense layer
f(z) = act(z W^T + c) (a deqkern DenseImplicitLayer, or a weight W with its injection c and activation name) to
read W, c, act from the layer itself, and the map of any other layer (its `f` attribute, e.g. an nn.DEQ's)."""
import torch

from ..activations import get_activation
from ..core import validation


def check_z(what, z, dtypes=None):
    """z: a non-empty (batch, ...) floating-point tensor; one of `dtypes` when given."""
    if not isinstance(z, torch.Tensor):
        validation.check_tensor(what, "z", z)  # raises the TypeError naming z's type
    if not z.is_floating_point():
        raise TypeError(f"deqkern.{what}: z must be a floating-point tensor, got {z.dtype}")
    if dtypes is not None:
        validation.check_tensor(what, "z", z, dtypes)
    if z.dim() < 1 or z.shape[0] == 0 or z.numel() == 0:
        raise ValueError(f"deqkern.{what}: z must be a non-empty (batch, ...) tensor, got shape {tuple(z.shape)}")


def is_dense_layer(obj) -> bool:
    """A deqkern dense implicit layer (DEQLinear, PositiveConcaveDEQ, LinfContractiveDEQ, LipschitzDEQ): its
    weight, injection_values and activation define the map. Look-alike modules are not guessed at: the layer's class
    says so itself (DenseImplicitLayer.defines_dense_map, so that these tools need not import the layers above them)."""
    return isinstance(obj, torch.nn.Module) and getattr(type(obj), "defines_dense_map", False) is True


def layer_map(what, layer_or_f):
    """The map f(z, x) of a layer for the generic (autograd) paths: a dense layer's or any module's `f` (an
    nn.DEQ's map) when it has one, else layer_or_f itself when it is callable."""
    f = getattr(layer_or_f, "f", None)
    if isinstance(layer_or_f, torch.nn.Module) and callable(f):
        return f
    if callable(layer_or_f):
        return layer_or_f
    raise TypeError(f"deqkern.{what}: expected a layer (with a map f(z, x)) or a callable f(z, x), got "
                    f"{type(layer_or_f).__name__}")


def dense_parts(what, layer_or_W, z, c_or_x, activation):
    """(W, c, activation name, "x" or "c") of the dense layer f(z) = act(z W^T + c), checked against z (B, d).

    The last item names what the caller passed as c_or_x: a layer's input x, or the injection c itself.
    """
    if is_dense_layer(layer_or_W):
        layer = layer_or_W
        if activation is not None and activation != layer.activation:
            raise ValueError(f"deqkern.{what}: activation={activation!r} contradicts the layer's "
                             f"{layer.activation!r}; leave it out for a layer")
        if c_or_x is None:
            raise ValueError(f"deqkern.{what}: a layer needs its input x (the injection is x U^T + b)")
        if not isinstance(c_or_x, torch.Tensor):
            raise TypeError(f"deqkern.{what}: x must be a torch.Tensor, got {type(c_or_x).__name__}")
        if c_or_x.dim() != 2 or c_or_x.shape[0] != z.shape[0]:
            raise ValueError(f"deqkern.{what}: x must be (batch={z.shape[0]}, in_features), got shape "
                             f"{tuple(c_or_x.shape)}")
        W, c, activation = layer.weight, layer.injection_values(c_or_x), layer.activation
        c_name = "x"
    elif isinstance(layer_or_W, torch.Tensor):
        W, c = layer_or_W, c_or_x
        if activation is None:
            raise ValueError(f"deqkern.{what}: with a weight matrix W, name the activation (activation=...)")
        c_name = "c"
    else:
        raise TypeError(f"deqkern.{what}: expected a deqkern dense layer or a (d, d) weight tensor, got "
                        f"{type(layer_or_W).__name__}")
    get_activation(activation)
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"deqkern.{what}: W must be a square (d, d) matrix, got shape {tuple(W.shape)}")
    d = W.shape[0]
    if z.dim() != 2 or z.shape[1] != d:
        raise ValueError(f"deqkern.{what}: z must be (batch, {d}) to match W, got shape {tuple(z.shape)}")
    if W.dtype != z.dtype or W.device != z.device:
        raise TypeError(f"deqkern.{what}: W ({W.dtype}, {W.device}) and z ({z.dtype}, {z.device}) must share "
                        "dtype and device")
    if c is not None:
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"deqkern.{what}: c must be a torch.Tensor or None, got {type(c).__name__}")
        if c.shape != z.shape:
            raise ValueError(f"deqkern.{what}: c must have the shape of z {tuple(z.shape)}, got {tuple(c.shape)}")
        if c.dtype != z.dtype or c.device != z.device:
            raise TypeError(f"deqkern.{what}: c ({c.dtype}, {c.device}) and z ({z.dtype}, {z.device}) must share "
                            "dtype and device")
    return W, c, activation, c_name

"""Jacobian regularisation of an implicit layer at its fixed point: the Hutchinson estimate `jacobian_reg` of
||J_f(z)||_F^2 / z.numel() (Bai, Kolter & Koltun 2021) and its closed form `dense_jacobian_frobenius_sq` for the
dense layer; both differentiable, for use in a training loss."""
from typing import Callable, Optional

import torch

from ..activations import get_activation
from ..core import validation
from ._layers import check_z, dense_parts, layer_map

PROBES = ("rademacher", "gaussian")


def dense_jacobian_penalty(W, z, c, activation):
    """||J||_F^2 / z.numel() of f(z) = act(z W^T + c) at z: sum_b sum_i act'(u_bi)^2 ||W_i||^2 / z.numel()
    (J_b = diag(act'(u_b)) W), differentiable in W, c and z (autograd through torch ops)."""
    u = z @ W.T + c
    s = get_activation(activation).derivative(u)
    return (s.square() * W.square().sum(dim=1)).sum() / z.numel()


def _probe(shape, dtype, device, kind, generator):
    gen_device = generator.device if generator is not None else device
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=gen_device).to(dtype).mul_(2).sub_(1)
    else:
        v = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    return v.to(device)


def jacobian_reg(
    f: Callable,
    z: torch.Tensor,
    x=None,
    n_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    *,
    probe: str = "rademacher",
) -> torch.Tensor:
    """Hutchinson estimate of ||J||_F^2 / z.numel(), J = d f(z, x) / d z at the given z (Bai et al. 2021).

    f: callable (z, x) -> tensor of z's shape, or a layer with a map `f(z, x)` (a deqkern dense layer, an
    nn.DEQ), whose map is then used; z: (B, ...). Returns a 0-dim tensor, differentiable (the
    vector-Jacobian products are taken with create_graph=True), so it can be added to a training loss:
    its gradient reaches f's parameters, x, and z itself when z requires grad (a DEQ output: then it
    flows on through the implicit backward). Pass z.detach() to hold the fixed point constant, as Bai et al.'s
    code does (cheaper: no extra implicit backward solve).

    Estimator: (1 / n_samples) sum_k ||v_k^T J||^2 / z.numel() over n_samples probes v_k with E[v v^T] = I, one
    vector-Jacobian product each; unbiased since E||v^T J||^2 = tr(J J^T) = ||J||_F^2. The normalisation by
    z.numel() (batch included) is torchdeq's `jac_reg` (and locuslab/deq's), so the numbers are comparable.
    probe: "rademacher" (default, entries +-1) or "gaussian" (N(0, 1), what Bai et al. and torchdeq use). Both
    are unbiased; with A = J J^T the variance of one probe is 2 (||A||_F^2 - sum_i A_ii^2) for Rademacher and
    2 ||A||_F^2 for Gaussian, so Rademacher is never worse, and much better when A is diagonally dominant
    (near-elementwise layers). generator: a torch.Generator for reproducible probes (any device; the probes are
    drawn on its device and moved to z's).
    No host synchronisation and no NaN check (it runs in the training loop): NaN in z gives a NaN penalty.
    """
    what = "jacobian_reg"
    f = layer_map(what, f)
    check_z(what, z)
    validation.check_int(what, "n_samples", n_samples, 1)
    validation.check_choice(what, "probe", probe, PROBES)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"deqkern.{what}: generator must be a torch.Generator, got {type(generator).__name__}")

    with torch.enable_grad():
        z_in = z if z.requires_grad else z.detach().requires_grad_()
        fz = f(z_in, x)
        if not isinstance(fz, torch.Tensor) or fz.shape != z.shape:
            shape = tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__
            raise ValueError(f"deqkern.{what}: f(z, x) must have the shape of z {tuple(z.shape)}, got {shape}")
        total = fz.new_zeros(())
        if not fz.requires_grad:  # f does not depend on z (nor on anything that requires grad): J = 0
            return total
        for k in range(n_samples):
            v = _probe(fz.shape, fz.dtype, fz.device, probe, generator)
            (vJ,) = torch.autograd.grad(fz, z_in, v, retain_graph=True, create_graph=True, allow_unused=True)
            if vJ is not None:
                total = total + vJ.pow(2).sum()
        return total / (n_samples * z.numel())


def dense_jacobian_frobenius_sq(layer_or_W, z: torch.Tensor, c=None, activation: Optional[str] = None):
    """Exact ||J||_F^2 / z.numel() of the dense layer f(z) = act(z W^T + c): the expectation of jacobian_reg.

    J_b = diag(act'(u_b)) W with u = z W^T + c, so ||J||_F^2 = sum_b sum_i act'(u_bi)^2 ||W_i||^2 (W_i: row i).
    Call it as (layer, z, x) with a deqkern dense layer (then W = layer.weight, c = layer.injection_values(x): a
    PositiveConcaveDEQ's positive injection, not its raw linear map) or as (W, z, c, activation) with
    W (d, d), c (B, d) or None (no injection). z: (B, d). Differentiable in W, c (or the layer's parameters and
    x) and z. Returns a 0-dim tensor.
    """
    what = "dense_jacobian_frobenius_sq"
    check_z(what, z)
    W, c, activation, _ = dense_parts(what, layer_or_W, z, c, activation)
    return dense_jacobian_penalty(W, z, torch.zeros_like(z) if c is None else c, activation)

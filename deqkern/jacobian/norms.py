"""Per-sample spectral norm ||J_b||_2 and spectral radius rho(J_b) of an implicit layer's Jacobian at z:
`jacobian_norm`, with its power iteration on J^T J (the fused deqkern.lipschitz.power_iteration for a dense layer,
batched Jacobian-vector products by autograd for a generic f) and its radius by eigvals."""
from typing import Optional

import torch

from ..activations import get_activation
from ..core import validation
from ..core.errors import NonConvergenceWarning
from ..core.policy import check_policy, enforce_convergence
from ..core.api import api_changes
from ..lipschitz import gram_power_iteration, power_iteration
from ..solvers.state import StateLayout, is_structured
from ._layers import check_z, dense_parts, is_dense_layer, layer_map

KINDS = ("spectral", "radius")
# Largest per-sample size for which jacobian_norm(kind="radius") builds a generic f's Jacobian explicitly.
MAX_EXPLICIT_JACOBIAN = 1024
# Dense radius: eigvals is run on chunks of samples of at most this many matrix entries (bounds the memory).
_EIG_CHUNK_ELEMENTS = 1 << 24
_POWER_ITERATION_SEED = 0
_ADVICE = "the power iteration's values are lower bounds (close top singular values converge slowly): raise max_iter"


def _start_vector(shape, dtype, device):
    g = torch.Generator().manual_seed(_POWER_ITERATION_SEED)  # deterministic diagnostics
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def dense_spectral_norm(W, s, max_iter, tol, use_op=True):
    """(||diag(s_b) W||_2 (B,), converged (B,)) per sample: the fused deqkern.lipschitz.power_iteration, or with
    use_op=False the batched pure-PyTorch power iteration (the same algorithm, a cross-check of the kernels)."""
    u0 = _start_vector(s.shape, s.dtype, s.device)
    if use_op:
        # "ignore": no checks there (jacobian_norm applies the policy once, the same for every path)
        result = power_iteration(W, u0, mode="gram", row_scale=s, max_iter=max_iter, tol=tol,
                                 on_nonconvergence="ignore")
        return result.value, result.converged
    sigma, _, _, converged = gram_power_iteration(lambda v: s * (v @ W.T), lambda w: (s * w) @ W, u0, max_iter, tol)
    return sigma, converged


def _dense_radius(W, s):
    """max |eigenvalue| of diag(s_b) W per sample, by eigvals in float64, in chunks of samples."""
    B, d = s.shape
    W64, s64 = W.double(), s.double()
    chunk = max(1, _EIG_CHUNK_ELEMENTS // max(1, d * d))
    out = [torch.linalg.eigvals(s64[i:i + chunk, :, None] * W64).abs().amax(dim=-1) for i in range(0, B, chunk)]
    return torch.cat(out).to(s.dtype)


def _generic_graph(f, z, x, what):
    """(z leaf, y = f(z, x)) with a graph, y checked to have z's shape."""
    z_leaf = z.detach().requires_grad_()
    y = f(z_leaf, x)
    if not isinstance(y, torch.Tensor) or y.shape != z.shape:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"deqkern.{what}: f(z, x) must have the shape of z {tuple(z.shape)}, got {shape}")
    return z_leaf, y


def _grad(y, z_leaf, g, **kwargs):
    if not y.requires_grad:
        return torch.zeros_like(z_leaf) if not kwargs.get("is_grads_batched") else torch.zeros_like(g)
    (out,) = torch.autograd.grad(y, z_leaf, g, allow_unused=True, **kwargs)
    if out is None:
        return torch.zeros_like(z_leaf) if not kwargs.get("is_grads_batched") else torch.zeros_like(g)
    return out


def _check_samples_independent(y, z_leaf, what):
    """One vector-Jacobian product: outputs of the even samples must not depend on the odd samples' inputs."""
    B = z_leaf.shape[0]
    if B < 2 or not y.requires_grad:
        return
    probe = _start_vector(y.shape, y.dtype, y.device)
    probe[1::2] = 0
    g = _grad(y, z_leaf, probe, retain_graph=True)
    if bool((g[1::2] != 0).any()):
        raise ValueError(
            f"deqkern.{what}: f mixes the samples of the batch (output b depends on input b' != b, e.g. batch "
            "norm in training mode), so there is no per-sample Jacobian J_b; use f in eval mode or one sample "
            "at a time"
        )


def _generic_spectral(f, z, x, max_iter, tol, what):
    B = z.shape[0]
    z_leaf, y = _generic_graph(f, z, x, what)
    _check_samples_independent(y, z_leaf, what)
    if not y.requires_grad:
        return z.new_zeros(B), torch.ones(B, dtype=torch.bool, device=z.device)
    # J v by the double-backward trick: g(u) = J^T u is linear in u, and d<g(u), v>/du = J v.
    u = torch.zeros_like(y, requires_grad=True)
    (JTu,) = torch.autograd.grad(y, z_leaf, u, create_graph=True, allow_unused=True)
    shape = z.shape

    def jvp(v):
        if JTu is None or not JTu.requires_grad:
            return y.new_zeros(B, y[0].numel())
        (Jv,) = torch.autograd.grad(JTu, u, v.reshape(shape), retain_graph=True, allow_unused=True)
        return y.new_zeros(B, y[0].numel()) if Jv is None else Jv.reshape(B, -1)

    def vjp(w):
        return _grad(y, z_leaf, w.reshape(shape), retain_graph=True).reshape(B, -1)

    v0 = _start_vector((B, z[0].numel()), z.dtype, z.device)
    sigma, _, _, converged = gram_power_iteration(jvp, vjp, v0, max_iter, tol)
    return sigma.detach(), converged


def _generic_per_sample_jacobian(f, z, x, what):
    """(B, n, n) per-sample Jacobians of a sample-independent f, n = z[0].numel(), by n batched VJPs."""
    B, n = z.shape[0], z[0].numel()
    z_leaf, y = _generic_graph(f, z, x, what)
    _check_samples_independent(y, z_leaf, what)
    eye = torch.eye(n, dtype=y.dtype, device=y.device)
    probes = eye[:, None, :].expand(n, B, n).reshape(n, *y.shape)  # probe i: output entry i of every sample
    try:
        rows = _grad(y, z_leaf, probes, retain_graph=True, is_grads_batched=True)
    except RuntimeError:  # an op without a batching rule: one vector-Jacobian product at a time
        rows = torch.stack([_grad(y, z_leaf, probes[i], retain_graph=True) for i in range(n)])
    return rows.reshape(n, B, n).transpose(0, 1)  # [b, i, j] = d y_b[i] / d z_b[j]


@api_changes("jacobian_norm", renamed={"n_iter": "max_iter"}, old_positional=("kind", "max_iter", "tol"))
def jacobian_norm(
    layer_or_f,
    z: torch.Tensor,
    x=None,
    *,
    kind: str = "spectral",
    max_iter: int = 200,
    tol: float = 1e-6,
    activation: Optional[str] = None,
    on_nonconvergence: str = "warn",
) -> torch.Tensor:
    """Per-sample ||J_b||_2 (kind="spectral", power iteration: the fused op for a dense layer, autograd products for any
    f) or spectral radius rho(J_b) (kind="radius", eigvals in float64) of J_b = d f(z, x)_b / d z_b at z (B, ...).
    layer_or_f: a deqkern dense layer (x its input), a (d, d) weight W (x the injection c, activation=...), a module
    with a map f(z, x) (an nn.DEQ), or any sample-independent callable f(z, x). Returns (B,) detached values.
    Details: docs/diagnostics.md.
    """
    what = "jacobian_norm"
    if is_structured(z):  # a state of several tensors: its Jacobian is that of the packed (B, n) map
        layout = StateLayout.of(what, z, name="z")
        packed_f = layout.flat_map(what, layer_map(what, layer_or_f), who="f(z, x)")
        z = layout.pack(z)
        layer_or_f = lambda flat, x: packed_f(flat, x)  # noqa: E731  (a bare callable: no dense layer is guessed)
    check_z(what, z, dtypes=validation.FLOAT_DTYPES)
    validation.check_choice(what, "kind", kind, KINDS)
    validation.check_int(what, "max_iter", max_iter, 1)
    validation.check_positive(what, "tol", tol)
    check_policy(what, on_nonconvergence)
    dense = is_dense_layer(layer_or_f) or isinstance(layer_or_f, torch.Tensor)
    f = None if dense else layer_map(what, layer_or_f)
    if not dense and activation is not None:
        raise ValueError(f"deqkern.{what}: activation=... is only for a weight tensor W, not for a callable f")
    validation.check_finite(what, z=z, x=x)

    if dense:
        with torch.no_grad():
            W, c, activation, c_name = dense_parts(what, layer_or_f, z, x, activation)
            if c_name == "c":
                validation.check_finite(what, W=W)
            u = z @ W.T if c is None else z @ W.T + c
            s = get_activation(activation).derivative(u)
            _check_finite_result(what, s, "the activation derivative at z W^T + c")
            if kind == "radius":
                return _dense_radius(W, s)
            value, converged = dense_spectral_norm(W, s, max_iter, tol)
    else:
        with torch.enable_grad():
            if kind == "radius":
                n = z[0].numel()
                if n > MAX_EXPLICIT_JACOBIAN:
                    raise NotImplementedError(
                        f"deqkern.{what}: kind='radius' for a generic f builds each sample's {n} x {n} Jacobian "
                        f"explicitly, only done up to {MAX_EXPLICIT_JACOBIAN} entries per sample; a power "
                        "iteration on J itself is not reliable (complex dominant eigenvalues, nilpotent J), so "
                        "none is attempted: use kind='spectral' (an upper bound of the radius) or a DEQLinear"
                    )
                J = _generic_per_sample_jacobian(f, z, x, what).detach()
                _check_finite_result(what, J, "the Jacobian of f at z")
                return torch.linalg.eigvals(J.double()).abs().amax(dim=-1).to(z.dtype)
            value, converged = _generic_spectral(f, z, x, max_iter, tol, what)
    _check_finite_result(what, value, "the power iteration")  # under every policy: a NaN norm is no bound
    enforce_convergence(what, converged, value, on_nonconvergence, tol=tol, max_iter=max_iter,
                        quantity="singular value estimate", advice=_ADVICE, warning=NonConvergenceWarning,
                        stacklevel=2)
    return value.detach()


def _check_finite_result(what, t, name):
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"deqkern.{what}: {name} overflowed to NaN/Inf although z and x are finite")

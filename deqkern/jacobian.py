"""Jacobian diagnostics and regularisation of an implicit layer at its fixed point.

- `jacobian_reg(f, z, x)`: the Hutchinson estimate of ||J_f(z)||_F^2 / z.numel() used as a training penalty
  (Bai, Kolter & Koltun 2021, "Stabilizing Equilibrium Models by Jacobian Regularization"); differentiable.
- `dense_jacobian_frobenius_sq(layer_or_W, z, c)`: the same quantity in closed form for the dense layer
  f(z) = act(z W^T + c), whose per-sample Jacobian is J_b = diag(act'(u_b)) W; differentiable.
- `jacobian_norm(layer_or_f, z, x, kind)`: per-sample spectral norm ||J_b||_2 or spectral radius rho(J_b)
  (the quantity that decides whether the Picard iteration z <- f(z) converges locally).

Conventions: z is (B, ...) and f treats the samples of a batch independently, so the Jacobian of the batch is
block diagonal with one block J_b per sample; J_b = d f(z, x)_b / d z_b at the given z (normally the fixed point).
"""
import math
import warnings
from typing import Callable, Optional

import torch

from .activations import get_activation
from .ops import NonConvergenceWarning

try:  # the fused batched power iteration (deqkern/lipschitz.py); optional, a pure-PyTorch fallback is below
    from .lipschitz import power_iteration as _lipschitz_power_iteration
except ModuleNotFoundError as error:  # pragma: no cover - depends on the checkout
    if error.name != f"{__package__}.lipschitz":
        raise
    _lipschitz_power_iteration = None

__all__ = ["jacobian_reg", "dense_jacobian_frobenius_sq", "jacobian_norm", "MAX_EXPLICIT_JACOBIAN"]

PROBES = ("rademacher", "gaussian")
KINDS = ("spectral", "radius")
# Largest per-sample size for which jacobian_norm(kind="radius") builds a generic f's Jacobian explicitly.
MAX_EXPLICIT_JACOBIAN = 1024
# Dense radius: eigvals is run on chunks of samples of at most this many matrix entries (bounds the memory).
_EIG_CHUNK_ELEMENTS = 1 << 24
_POWER_ITERATION_SEED = 0


# ---------------------------------------------------------------- checks
def _check_z(z, what, dtypes=None):
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"deqkern.{what}: z must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"deqkern.{what}: z must be a floating-point tensor, got {z.dtype}")
    if dtypes is not None and z.dtype not in dtypes:
        raise TypeError(f"deqkern.{what}: z must be float32 or float64, got {z.dtype}")
    if z.dim() < 1 or z.shape[0] == 0 or z.numel() == 0:
        raise ValueError(f"deqkern.{what}: z must be a non-empty (batch, ...) tensor, got shape {tuple(z.shape)}")


def _check_finite(what, tensors):
    """ValueError naming every tensor of `tensors` (name -> tensor or None) that holds NaN or Inf (one sync)."""
    named = [(name, t) for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not named:
        return
    flags = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named]).tolist()
    bad = [name for (name, _), ok in zip(named, flags) if not ok]
    if bad:
        raise ValueError(f"deqkern.{what}: {' and '.join(bad)} contain NaN or Inf")


def _check_iteration_options(n_iter, tol, what):
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"deqkern.{what}: n_iter must be an integer >= 1, got {n_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol > 0) or not math.isfinite(tol):
        raise ValueError(f"deqkern.{what}: tol must be a finite number > 0, got {tol!r}")


def _is_dense_layer(obj) -> bool:
    """A DEQLinear, or any module with its attributes (`weight` (d, d), `injection`, `activation` name)."""
    return (
        isinstance(obj, torch.nn.Module)
        and isinstance(getattr(obj, "weight", None), torch.Tensor)
        and callable(getattr(obj, "injection", None))
        and isinstance(getattr(obj, "activation", None), str)
    )


def _dense_parts(what, layer_or_W, z, c_or_x, activation):
    """(W, c, activation name) of the dense layer f(z) = act(z W^T + c), checked against z (B, d)."""
    if _is_dense_layer(layer_or_W):
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
        W, c, activation = layer.weight, layer.injection(c_or_x), layer.activation
        c_name = "x"
    elif isinstance(layer_or_W, torch.Tensor):
        W, c = layer_or_W, c_or_x
        if activation is None:
            raise ValueError(f"deqkern.{what}: with a weight matrix W, name the activation (activation=...)")
        c_name = "c"
    else:
        raise TypeError(f"deqkern.{what}: expected a DEQLinear or a (d, d) weight tensor, got "
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


# ---------------------------------------------------------------- regularisation
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

    f: callable (z, x) -> tensor of z's shape; z: (B, ...). Returns a 0-dim tensor, differentiable (the
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
    if not callable(f):
        raise TypeError(f"deqkern.{what}: f must be callable (z, x) -> tensor, got {type(f).__name__}")
    _check_z(z, what)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"deqkern.{what}: n_samples must be an integer >= 1, got {n_samples!r}")
    if probe not in PROBES:
        raise ValueError(f"deqkern.{what}: probe must be one of {PROBES}, got {probe!r}")
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
    Call it as (layer, z, x) with a DEQLinear (then c = layer.injection(x)) or as (W, z, c, activation) with
    W (d, d), c (B, d) or None (no injection). z: (B, d). Differentiable in W, c (or the layer's parameters and
    x) and z. Returns a 0-dim tensor.
    """
    what = "dense_jacobian_frobenius_sq"
    _check_z(z, what)
    W, c, activation, _ = _dense_parts(what, layer_or_W, z, c, activation)
    u = z @ W.T if c is None else z @ W.T + c
    s = get_activation(activation).derivative(u)
    return (s.pow(2) * W.pow(2).sum(dim=1)).sum() / z.numel()


# ---------------------------------------------------------------- spectral norm and radius
def _start_vector(shape, dtype, device):
    g = torch.Generator().manual_seed(_POWER_ITERATION_SEED)  # deterministic diagnostics
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def _safe_normalise(v, norm):
    """v / norm per row, keeping rows whose norm is 0 (there the matrix maps the iterate to 0)."""
    return torch.where(norm[:, None] > 0, v / norm.clamp_min(torch.finfo(v.dtype).tiny)[:, None], v)


def _gram_power_iteration(jvp, vjp, v, n_iter, tol):
    """Largest singular value of J_b per row of v (B, n) by power iteration on J_b^T J_b.

    jvp(v) = J v and vjp(w) = J^T w, batched over rows. The estimate ||J_b v_b|| (v_b unit) is the square root
    of a Rayleigh quotient of J^T J: a lower bound of ||J_b||_2 that increases to it. A row whose iterate is
    mapped to 0 (J_b = 0) gives exactly 0, never NaN. Stops once every row's estimate changes by <= tol
    relatively. Returns (sigma (B,), converged (B,) bool, iterations).
    """
    v = _safe_normalise(v, v.norm(dim=1))
    sigma_prev = None
    converged = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    for k in range(1, n_iter + 1):
        w = jvp(v)
        sigma = w.norm(dim=1)
        a = vjp(w)
        v = _safe_normalise(a, a.norm(dim=1))
        if sigma_prev is not None:
            converged = (sigma - sigma_prev).abs() <= tol * sigma
            if bool(converged.all()):
                return sigma, converged, k
        sigma_prev = sigma
    return sigma, converged, n_iter


def _warn_not_converged(what, converged, n_iter, tol):
    if not bool(converged.all()):
        n_bad = int((~converged).sum())
        warnings.warn(
            f"deqkern.{what}: the power iteration did not reach tol={tol:g} within n_iter={n_iter} for {n_bad} of "
            f"{converged.numel()} samples (close top singular values); the returned values are lower bounds: "
            "raise n_iter",
            NonConvergenceWarning, stacklevel=3,
        )


def _dense_spectral(W, s, n_iter, tol, use_op=True):
    """||diag(s_b) W||_2 per sample; the fused lipschitz op when available, else batched power iteration."""
    u0 = _start_vector(s.shape, s.dtype, s.device)
    if use_op and _lipschitz_power_iteration is not None:
        # "ignore": no checks there (ours run once below, with NonConvergenceWarning for both paths)
        result = _lipschitz_power_iteration(W, u0, mode="gram", row_scale=s, max_iter=n_iter, tol=tol,
                                            on_nonconvergence="ignore")
        return result.value, result.converged
    sigma, converged, _ = _gram_power_iteration(lambda v: s * (v @ W.T), lambda w: (s * w) @ W, u0, n_iter, tol)
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


def _generic_spectral(f, z, x, n_iter, tol, what):
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
    sigma, converged, _ = _gram_power_iteration(jvp, vjp, v0, n_iter, tol)
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


def jacobian_norm(
    layer_or_f,
    z: torch.Tensor,
    x=None,
    kind: str = "spectral",
    n_iter: int = 200,
    tol: float = 1e-6,
    *,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """Per-sample norm of the layer's Jacobian J_b = d f(z, x)_b / d z_b at the given z: a (B,) tensor.

    kind="spectral": ||J_b||_2 (largest singular value; < 1 everywhere makes f a contraction);
    kind="radius": rho(J_b) = max |eigenvalue| (< 1 at the fixed point: the Picard iteration converges locally).
    rho(J_b) <= ||J_b||_2.

    layer_or_f: a DEQLinear (x: its input), a (d, d) weight W (x: the injection c (B, d), activation=...), or
    any callable f(z, x) -> tensor of z's shape that treats the samples independently (checked: a batch-mixing f
    raises ValueError).
    - dense layer, J_b = diag(act'(u_b)) W: spectral by power iteration on J_b^T J_b (the fused
      deqkern.lipschitz.power_iteration when present, else batched PyTorch), radius exactly by
      torch.linalg.eigvals(J_b) in float64.
    - generic f: spectral by power iteration with Jacobian-vector products by autograd (batched over samples);
      radius by building J_b explicitly (n batched vector-Jacobian products, n = z[0].numel() <=
      MAX_EXPLICIT_JACOBIAN, else NotImplementedError) and eigvals.
    The power iteration stops once every sample's estimate changes by <= tol relatively or after n_iter
    steps (then NonConvergenceWarning; the values are lower bounds). Its estimates are lower bounds of ||J_b||_2
    converging to it. The radius is exact for the matrix; note that the eigenvalues of a defective matrix are
    ill-conditioned (a nilpotent n x n J_b perturbed by eps has radius ~ eps^(1/n)), so a radius computed from a
    rounded Jacobian can be far from 0 when the exact one is 0 (an exactly triangular J_b gives exactly 0).
    Never NaN for finite input; NaN/Inf in z or x: ValueError; f overflowing at z: FloatingPointError.
    Returns detached values (a diagnostic, not a loss: use jacobian_reg to regularise).
    """
    what = "jacobian_norm"
    _check_z(z, what, dtypes=(torch.float32, torch.float64))
    if kind not in KINDS:
        raise ValueError(f"deqkern.{what}: kind must be one of {KINDS}, got {kind!r}")
    _check_iteration_options(n_iter, tol, what)
    dense = _is_dense_layer(layer_or_f) or isinstance(layer_or_f, torch.Tensor)
    if not dense and not callable(layer_or_f):
        raise TypeError(f"deqkern.{what}: expected a DEQLinear, a weight tensor or a callable f(z, x), got "
                        f"{type(layer_or_f).__name__}")
    if not dense and activation is not None:
        raise ValueError(f"deqkern.{what}: activation=... is only for a weight tensor W, not for a callable f")
    _check_finite(what, {"z": z, "x": x})

    if dense:
        with torch.no_grad():
            W, c, activation, c_name = _dense_parts(what, layer_or_f, z, x, activation)
            if c_name == "c":
                _check_finite(what, {"W": W})
            u = z @ W.T if c is None else z @ W.T + c
            s = get_activation(activation).derivative(u)
            _check_finite_result(what, s, "the activation derivative at z W^T + c")
            if kind == "radius":
                return _dense_radius(W, s)
            value, converged = _dense_spectral(W, s, n_iter, tol)
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
                J = _generic_per_sample_jacobian(layer_or_f, z, x, what).detach()
                _check_finite_result(what, J, "the Jacobian of f at z")
                return torch.linalg.eigvals(J.double()).abs().amax(dim=-1).to(z.dtype)
            value, converged = _generic_spectral(layer_or_f, z, x, n_iter, tol, what)
    _check_finite_result(what, value, "the power iteration")
    _warn_not_converged(what, converged, n_iter, tol)
    return value.detach()


def _check_finite_result(what, t, name):
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"deqkern.{what}: {name} overflowed to NaN/Inf although z and x are finite")

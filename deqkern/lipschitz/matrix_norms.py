"""Lipschitz constants of matrices: ||W||_2, the one-sided constants mu_2 and mu_inf, and ||W||_inf.

A DEQ layer z = act(z W^T + c) is a contraction when its Lipschitz constant is below 1; the one-sided
(log-norm) constant mu(J) < 0 of its Jacobian J = diag(act'(u)) W is the weaker monotone-operator condition.
`spectral_norm` and `one_sided_l2` run `torch.ops.deqkern.power_iteration` (one registered op for the whole
iteration, CPU C++, CUDA and Triton kernels); `one_sided_linf` and `linf_norm` are single reductions, for which
plain torch ops are the right tool. A power iteration only bounds ||W||_2 from below; `spectral_norm_upper_bound`
(spectral_bound.py) turns its estimate into a proven upper bound.
"""
import math

import torch

from ..core import validation
from ..core.api import api_changes
from ..core.backends import kernel, resolve_backend
from ..core.errors import PowerIterationWarning
from ..core.policy import check_policy, checks_enabled, enforce_convergence
from ..ops import power_iteration as _power_iteration_op  # noqa: F401  (registers the power_iteration backends)
from ..reference.power_iteration import POWER_ITERATION_MODES as MODES
from .common import (PowerIterationResult, check_iteration_options, default_start, power_of_two_exponent,
                     times_power_of_two)


# ---------------------------------------------------------------- checks
def _check_matrix(what, W, square=False):
    validation.check_tensor(what, "W", W)
    if W.dim() != 2 or W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"deqkern.{what}: W must be a non-empty 2-D (m, n) matrix, got shape {tuple(W.shape)}")
    if square and W.shape[0] != W.shape[1]:
        raise ValueError(f"deqkern.{what}: W must be square (d, d), got shape {tuple(W.shape)}")


# ---------------------------------------------------------------- the batched op
@api_changes("lipschitz.power_iteration", old_positional=(
    "mode", "row_scale", "shift", "max_iter", "tol", "backend", "on_nonconvergence"))
def power_iteration(W, u0, *, mode="gram", row_scale=None, shift=0.0, max_iter=1000, tol=1e-6,
                    on_nonconvergence="warn", backend="auto", _trusted_start=False):
    """Batched power iteration on J_b = diag(row_scale_b) W (m, n), one fused op: u0 (B, n) nonzero starts, row_scale
    (B, m) or None. mode "gram": value_b = ||J_b||_2; "symmetric" (square W): lambda_max((J_b + J_b^T) / 2) on
    S_b + shift I. Each sample stops once its value moves by <= tol relatively; the value is a lower bound, exact
    power-of-two scaling keeps it in range. Returns PowerIterationResult(value (B,), u (B, n), iterations, converged).
    Details: docs/diagnostics.md.
    """
    what = "lipschitz.power_iteration"
    validation.check_choice(what, "mode", mode, MODES)
    _check_matrix(what, W, square=(mode == "symmetric"))
    validation.check_tensor(what, "u0", u0, like=W)
    if u0.dim() != 2 or u0.shape[1] != W.shape[1]:
        raise ValueError(f"deqkern.{what}: u0 must be (batch, {W.shape[1]}) to match W, got shape {tuple(u0.shape)}")
    if row_scale is not None:
        validation.check_tensor(what, "row_scale", row_scale, like=W)
        if row_scale.shape != (u0.shape[0], W.shape[0]):
            raise ValueError(f"deqkern.{what}: row_scale must be (batch, m) = {(u0.shape[0], W.shape[0])}, got "
                             f"{tuple(row_scale.shape)}")
    validation.check_finite_number(what, "shift", shift)
    check_iteration_options(what, max_iter, tol)
    check_policy(what, on_nonconvergence)
    backend = resolve_backend(backend, W.device, what)
    checks = checks_enabled(on_nonconvergence)
    if checks and not _trusted_start and u0.shape[0] and not bool((u0 != 0).any(dim=1).all()):
        raise ValueError(f"deqkern.{what}: u0 has an all-zero row: every start vector must be nonzero")
    op = kernel("power_iteration", backend)
    value, u, iterations, converged = _scaled_power_iteration(op, W, row_scale, u0, mode, float(shift), int(max_iter),
                                                              float(tol))
    if checks and u0.shape[0]:
        zero = (value == 0) & _nonzero_rows_scaled(W, row_scale, u0.shape[0])
        if bool(zero.any()):  # J_b u0 = 0 for a nonzero J_b: start again from the default vector
            start = default_start(W.shape[1], W.dtype, W.device).expand(int(zero.sum()), -1)
            rerun = _scaled_power_iteration(op, W, None if row_scale is None else row_scale[zero], start, mode,
                                            float(shift), int(max_iter), float(tol))
            for out, new in zip((value, u, iterations, converged), rerun):
                out[zero] = new
            converged &= (value != 0) | ~_nonzero_rows_scaled(W, row_scale, u0.shape[0])
    enforce_convergence(what, converged, value, on_nonconvergence, tol=tol, max_iter=max_iter,
                        inputs=dict(W=W, u0=u0, row_scale=row_scale), quantity=f"{mode} estimate",
                        advice="the value is a lower bound; raise max_iter, or warm-start from the returned u",
                        warning=PowerIterationWarning)
    return PowerIterationResult(value, u, iterations, converged, float(shift))


def _scaled_power_iteration(op, W, row_scale, u0, mode, shift, max_iter, tol):
    """The op on W 2^-e_W (and row_scale 2^-e_s: per sample in mode "gram", one e_s for all in "symmetric", where the
    shift is shared), value scaled back by 2^(e_W + e_s); no host synchronisation."""
    e_w = power_of_two_exponent(W)
    W = times_power_of_two(W, -e_w)
    e = e_w.expand(u0.shape[0])
    if row_scale is not None:
        e_s = power_of_two_exponent(row_scale, dim=1) if mode == "gram" else power_of_two_exponent(row_scale)
        row_scale = times_power_of_two(row_scale, -(e_s[:, None] if e_s.dim() else e_s))
        e = e + e_s
    if mode == "symmetric":  # S + shift I scales with S: shift 2^-e (one e for the batch; the op takes a number)
        shift = math.ldexp(shift, -int(e.flatten()[0]))
    value, u, iterations, converged = op(W, row_scale, u0, mode, shift, max_iter, tol)
    return torch.ldexp(value, e.to(value.device)).to(value.dtype), u, iterations, converged


def warm_gram_steps(W: torch.Tensor, u: torch.Tensor, steps: int, backend: str = "auto") -> torch.Tensor:
    """`steps` warm-started power steps on W^T W from the unit u (n,): the fused op alone, without power_iteration's
    argument checks, convergence policy, host reads and power-of-two scaling, for a layer that takes a few such steps
    at every training forward on a weight whose norm it has just bounded (LipschitzDEQ: 57 us per call at width 64
    through power_iteration, 47 of them its checks and scaling). The last iterate (n,); not finite where W's
    products overflow (||W||_2 beyond about 1e19 in float32), which the caller must check."""
    op = kernel("power_iteration", resolve_backend(backend, W.device, "lipschitz.power_iteration"))
    return op(W, None, u[None], "gram", 0.0, int(steps), 1e-300)[1][0]


def _nonzero_rows_scaled(W, row_scale, batch):
    """(B,) bool: J_b = diag(row_scale_b) W has a nonzero entry."""
    if row_scale is None:
        return (W != 0).any().expand(batch)
    return ((row_scale != 0) & (W != 0).any(dim=1)[None, :]).any(dim=1)


def _single(W, u0, mode, shift, max_iter, tol, backend, on_nonconvergence="warn"):
    trusted = u0 is None
    if u0 is None:
        u0 = default_start(W.shape[1], W.dtype, W.device)
    else:
        validation.check_tensor("lipschitz", "u0", u0, like=W)
        if u0.shape != (W.shape[1],):
            raise ValueError(f"deqkern.lipschitz: u0 must be ({W.shape[1]},) to match W, got shape {tuple(u0.shape)}")
    r = power_iteration(W, u0[None], mode=mode, shift=shift, max_iter=max_iter, tol=tol, backend=backend,
                        on_nonconvergence=on_nonconvergence, _trusted_start=trusted)
    return PowerIterationResult(r.value[0], r.u[0], r.iterations[0], r.converged[0], r.shift)


# ---------------------------------------------------------------- public estimates
@api_changes("lipschitz.spectral_norm", renamed={"n_iter": "max_iter"},
             old_positional=("max_iter", "tol", "u0", "backend"))
def spectral_norm(W, *, max_iter=1000, tol=1e-6, u0=None, backend="auto"):
    """||W||_2, the largest singular value of W (m, n), by power iteration on W^T W.

    u0: (n,) start (default: a fixed vector near ones / sqrt(n)); pass a previous result's `u` to warm-start.
    Returns PowerIterationResult (unpacks as `value, u`): value 0-dim, u (n,), iterations, converged.
    Warns PowerIterationWarning when not converged within max_iter (the value is then a lower bound).
    """
    _check_matrix("lipschitz.spectral_norm", W)
    return _single(W, u0, "gram", 0.0, max_iter, tol, backend)


@api_changes("lipschitz.one_sided_l2", renamed={"n_iter": "max_iter"},
             old_positional=("max_iter", "tol", "u0", "backend", "shift"))
def one_sided_l2(W, *, max_iter=1000, tol=1e-6, u0=None, shift=None, backend="auto"):
    """mu_2(W) = lambda_max((W + W^T) / 2), the one-sided Lipschitz constant (logarithmic 2-norm) of W (d, d).

    Power iteration on S + shift I, S = (W + W^T) / 2. shift=None uses the Gershgorin bound
    max_i (sum_{j != i} |s_ij| - s_ii) >= -lambda_min(S), which always makes lambda_max the dominant eigenvalue
    (a shift from an *estimate* of ||S||_2 converges faster but can, when the estimate is low, converge to the
    wrong end of the spectrum: pass such a shift yourself only when you can bound it). The rate is
    (lambda_2 + shift) / (lambda_max + shift), so spread-out spectra need many iterations: a result that did not
    converge warns PowerIterationWarning and is a lower bound. Returns PowerIterationResult as spectral_norm
    (result.shift holds the shift used).
    """
    what = "lipschitz.one_sided_l2"
    _check_matrix(what, W, square=True)
    check_iteration_options(what, max_iter, tol)
    if shift is None:
        validation.check_finite(what, W=W)
        S = 0.5 * (W + W.T)
        diag = S.diagonal()
        shift = float((S.abs().sum(dim=1) - diag.abs() - diag).max().clamp_min(0))
    return _single(W, u0, "symmetric", shift, max_iter, tol, backend)


@api_changes("lipschitz.one_sided_linf", old_positional=("weights",))
def one_sided_linf(W, *, weights=None):
    """mu_inf(W) = max_i (w_ii + sum_{j != i} |w_ij|), the one-sided Lipschitz constant in the inf-norm; W: (d, d).

    weights: (d,) positive: mu_inf(D W D^-1) with D = diag(weights). A single reduction: plain torch ops.
    Returns a 0-dim tensor.
    """
    what = "lipschitz.one_sided_linf"
    _check_matrix(what, W, square=True)
    validation.check_finite(what, W=W)
    if weights is not None:
        validation.check_tensor(what, "weights", weights, like=W)
        if weights.shape != (W.shape[0],):
            raise ValueError(f"deqkern.{what}: weights must be ({W.shape[0]},), got shape {tuple(weights.shape)}")
        validation.check_finite(what, weights=weights)
        if not bool((weights > 0).all()):
            raise ValueError(f"deqkern.{what}: weights must be > 0")
        W = weights[:, None] * W / weights[None, :]
    diag = W.diagonal()
    return (W.abs().sum(dim=1) - diag.abs() + diag).max()


def linf_norm(W):
    """||W||_inf = max_i sum_j |w_ij|, the induced inf-norm of W (m, n). A single reduction: plain torch ops."""
    _check_matrix("lipschitz.linf_norm", W)
    validation.check_finite("lipschitz.linf_norm", W=W)
    return W.abs().sum(dim=1).max()

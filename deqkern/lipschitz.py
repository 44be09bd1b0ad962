"""Lipschitz constants of dense layers: ||W||_2, the one-sided constants mu_2 and mu_inf, and ||W||_inf.

A DEQ layer z = act(z W^T + c) is a contraction when its Lipschitz constant is below 1; the one-sided
(log-norm) constant mu(J) < 0 of its Jacobian J = diag(act'(u)) W is the weaker monotone-operator condition.
`spectral_norm` and `one_sided_l2` run `torch.ops.deqkern.power_iteration` (one registered op for the whole
iteration, CPU C++, CUDA and Triton kernels); `one_sided_linf` and `linf_norm` are single reductions, for which
plain torch ops are the right tool.
"""
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import reference
from .ops import NonConvergenceError, _check_tensor, _resolve_backend

MODES = reference.POWER_ITERATION_MODES
NONCONVERGENCE_POLICIES = ("warn", "raise", "ignore")


class PowerIterationWarning(RuntimeWarning):
    """A power iteration stopped at max_iter before its value settled to tol."""


@dataclass
class PowerIterationResult:
    """value: () or (B,); u: (n,) or (B, n) last unit iterate (pass it back as u0 to warm-start);
    iterations: int32; converged: bool; shift: the shift used (mode "symmetric").

    Unpacks as `value, u = result`.
    """

    value: torch.Tensor
    u: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    shift: float = 0.0

    def __iter__(self):
        return iter((self.value, self.u))


# ---------------------------------------------------------------- fake kernel (shapes only, for torch.compile)
@torch.library.register_fake("deqkern::power_iteration")
def _power_iteration_fake(W, row_scale, u0, mode, shift, max_iter, tol):
    torch._check(W.dim() == 2, lambda: f"W must be (m, n), got {tuple(W.shape)}")
    torch._check(u0.dim() == 2 and u0.shape[1] == W.shape[1], lambda: f"u0 must be (batch, {W.shape[1]})")
    torch._check(mode != "symmetric" or W.shape[0] == W.shape[1], lambda: "mode 'symmetric' needs a square W")
    batch = u0.shape[0]
    return (
        u0.new_empty(batch),
        torch.empty_like(u0, memory_format=torch.contiguous_format),
        u0.new_empty(batch, dtype=torch.int32),
        u0.new_empty(batch, dtype=torch.bool),
    )


def _power_op(backend):
    if backend in ("cpu", "cuda"):
        return torch.ops.deqkern.power_iteration
    if backend == "triton":
        from .triton_kernels.power_iteration import power_iteration_triton

        return power_iteration_triton
    return reference.power_iteration_ref


# ---------------------------------------------------------------- checks
def _check_matrix(W, square=False, what="W"):
    _check_tensor(what, W)
    if W.dim() != 2 or W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D (m, n) matrix, got shape {tuple(W.shape)}")
    if square and W.shape[0] != W.shape[1]:
        raise ValueError(f"{what} must be square (d, d), got shape {tuple(W.shape)}")


def _check_finite(**tensors):
    """One host synchronisation for all tensors."""
    names = [name for name, t in tensors.items() if t is not None]
    flags = torch.stack([torch.isfinite(tensors[name]).all() for name in names]).tolist()
    bad = [name for name, ok in zip(names, flags) if not ok]
    if bad:
        raise ValueError(f"deqkern.lipschitz: {' and '.join(bad)} contain NaN or Inf")


def _check_options(max_iter, tol, name="max_iter"):
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or not (1 <= max_iter < 2**31):
        raise ValueError(f"{name} must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol > 0) or not math.isfinite(tol):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")


@functools.lru_cache(maxsize=64)
def _default_start(n, dtype, device):
    """ones / sqrt(n) plus a fixed non-constant perturbation, so that it is not orthogonal to the top vector of
    common structured matrices (zero row sums, alternating signs); deterministic."""
    j = torch.arange(n, dtype=torch.float64)
    u = 1.0 + 0.5 * torch.cos(2.399963229728653 * j + 0.5)  # golden angle: no short period
    return (u / u.norm()).to(dtype=dtype, device=device)


# ---------------------------------------------------------------- the batched op
def power_iteration(W, u0, mode="gram", row_scale=None, shift=0.0, max_iter=1000, tol=1e-6, backend="auto",
                    on_nonconvergence="warn", _trusted_start=False):
    """Batched power iteration on J_b = diag(row_scale_b) W, one fused kernel for the whole iteration.

    W: (m, n); u0: (B, n) nonzero start vectors; row_scale: (B, m) or None (ones); float32/float64, one device.
    mode "gram": value_b = ||J_b||_2. mode "symmetric" (square W): value_b = lambda_max((J_b + J_b^T) / 2),
    iterating on S_b + shift I; pass shift >= -lambda_min(S_b) (a Gershgorin bound is always safe).
    Each sample stops once |value_k - value_{k-1}| <= tol |value_k|. NaN/Inf inputs raise ValueError; samples that
    do not settle within max_iter warn (PowerIterationWarning), raise (NonConvergenceError) or are left to the
    caller ("ignore": no host synchronisation after the solve). The value of an unconverged sample is a lower bound.
    Returns PowerIterationResult(value (B,), u (B, n), iterations int32 (B,), converged bool (B,)).
    """
    _check_matrix(W, square=(mode == "symmetric"))
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_tensor("u0", u0, W.dtype, W.device)
    if u0.dim() != 2 or u0.shape[1] != W.shape[1]:
        raise ValueError(f"u0 must be (batch, {W.shape[1]}) to match W, got shape {tuple(u0.shape)}")
    if row_scale is not None:
        _check_tensor("row_scale", row_scale, W.dtype, W.device)
        if row_scale.shape != (u0.shape[0], W.shape[0]):
            raise ValueError(f"row_scale must be (batch, m) = {(u0.shape[0], W.shape[0])}, got {tuple(row_scale.shape)}")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift):
        raise ValueError(f"shift must be a finite number, got {shift!r}")
    _check_options(max_iter, tol)
    if on_nonconvergence not in NONCONVERGENCE_POLICIES:
        raise ValueError(f"on_nonconvergence must be one of {NONCONVERGENCE_POLICIES}, got {on_nonconvergence!r}")
    backend = _resolve_backend(backend, W.device)
    W, u0 = W.contiguous(), u0.contiguous()
    row_scale = None if row_scale is None else row_scale.contiguous()
    checks = on_nonconvergence != "ignore" and not torch.compiler.is_compiling()
    if checks and not _trusted_start and u0.shape[0] and not bool((u0 != 0).any(dim=1).all()):
        raise ValueError("u0 has an all-zero row: every start vector must be nonzero")
    value, u, iterations, converged = _power_op(backend)(W, row_scale, u0, mode, float(shift), int(max_iter),
                                                         float(tol))
    result = PowerIterationResult(value, u, iterations, converged, float(shift))
    if checks:
        _enforce_convergence(result, mode, max_iter, tol, on_nonconvergence, dict(W=W, u0=u0, row_scale=row_scale))
    return result


def _enforce_convergence(result, mode, max_iter, tol, policy, inputs):
    """A NaN/Inf input makes the value non-finite and the sample not converged (reference.py), so the happy path
    is one reduction and one host synchronisation; the inputs are scanned only to name the culprit."""
    if result.value.numel() == 0 or bool(result.converged.all()):
        return
    _check_finite(**inputs)
    if not bool(torch.isfinite(result.value).all()):
        raise FloatingPointError(f"deqkern.lipschitz: the power iteration ({mode}) overflowed to NaN/Inf")
    n_bad = int((~result.converged).sum())
    message = (
        f"deqkern.lipschitz: power iteration ({mode}) did not converge for {n_bad} of "
        f"{result.converged.numel()} samples within max_iter={max_iter} (tol={tol:g}); its value is a lower "
        "bound. Raise n_iter / max_iter, or warm-start from the returned u"
    )
    if policy == "raise":
        raise NonConvergenceError(message)
    warnings.warn(message, PowerIterationWarning, stacklevel=4)


def _single(W, u0, mode, shift, n_iter, tol, backend, on_nonconvergence="warn"):
    trusted = u0 is None
    if u0 is None:
        u0 = _default_start(W.shape[1], W.dtype, W.device)
    else:
        _check_tensor("u0", u0, W.dtype, W.device)
        if u0.shape != (W.shape[1],):
            raise ValueError(f"u0 must be ({W.shape[1]},) to match W, got shape {tuple(u0.shape)}")
    r = power_iteration(W, u0[None], mode=mode, shift=shift, max_iter=n_iter, tol=tol, backend=backend,
                        on_nonconvergence=on_nonconvergence, _trusted_start=trusted)
    return PowerIterationResult(r.value[0], r.u[0], r.iterations[0], r.converged[0], r.shift)


# ---------------------------------------------------------------- public estimates
def spectral_norm(W, n_iter=1000, tol=1e-6, u0=None, backend="auto"):
    """||W||_2, the largest singular value of W (m, n), by power iteration on W^T W.

    u0: (n,) start (default: a fixed vector near ones / sqrt(n)); pass a previous result's `u` to warm-start.
    Returns PowerIterationResult (unpacks as `value, u`): value 0-dim, u (n,), iterations, converged.
    Warns PowerIterationWarning when not converged within n_iter (the value is then a lower bound).
    """
    _check_matrix(W)
    return _single(W, u0, "gram", 0.0, n_iter, tol, backend)


def one_sided_l2(W, n_iter=1000, tol=1e-6, u0=None, backend="auto", shift=None):
    """mu_2(W) = lambda_max((W + W^T) / 2), the one-sided Lipschitz constant (logarithmic 2-norm) of W (d, d).

    Power iteration on S + shift I, S = (W + W^T) / 2. shift=None uses the Gershgorin bound
    max_i (sum_{j != i} |s_ij| - s_ii) >= -lambda_min(S), which always makes lambda_max the dominant eigenvalue
    (a shift from an *estimate* of ||S||_2 converges faster but can, when the estimate is low, converge to the
    wrong end of the spectrum: pass such a shift yourself only when you can bound it). The rate is
    (lambda_2 + shift) / (lambda_max + shift), so spread-out spectra need many iterations: a result that did not
    converge warns PowerIterationWarning and is a lower bound. Returns PowerIterationResult as spectral_norm
    (result.shift holds the shift used).
    """
    _check_matrix(W, square=True)
    _check_options(n_iter, tol, "n_iter")
    if shift is None:
        _check_finite(W=W)
        S = 0.5 * (W + W.T)
        diag = S.diagonal()
        shift = float((S.abs().sum(dim=1) - diag.abs() - diag).max().clamp_min(0))
    return _single(W, u0, "symmetric", shift, n_iter, tol, backend)


def one_sided_linf(W, weights=None):
    """mu_inf(W) = max_i (w_ii + sum_{j != i} |w_ij|), the one-sided Lipschitz constant in the inf-norm; W: (d, d).

    weights: (d,) positive: mu_inf(D W D^-1) with D = diag(weights). A single reduction: plain torch ops.
    Returns a 0-dim tensor.
    """
    _check_matrix(W, square=True)
    _check_finite(W=W)
    if weights is not None:
        _check_tensor("weights", weights, W.dtype, W.device)
        if weights.shape != (W.shape[0],):
            raise ValueError(f"weights must be ({W.shape[0]},), got shape {tuple(weights.shape)}")
        _check_finite(weights=weights)
        if not bool((weights > 0).all()):
            raise ValueError("weights must be > 0")
        W = weights[:, None] * W / weights[None, :]
    diag = W.diagonal()
    return (W.abs().sum(dim=1) - diag.abs() + diag).max()


def linf_norm(W):
    """||W||_inf = max_i sum_j |w_ij|, the induced inf-norm of W (m, n). A single reduction: plain torch ops."""
    _check_matrix(W)
    _check_finite(W=W)
    return W.abs().sum(dim=1).max()

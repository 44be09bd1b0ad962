"""Pure-PyTorch references: the executable specification of every deqkern op.

Every backend (CPU C++, CUDA, Triton) is tested against these functions. They are written for clarity,
not speed, and must never be edited to match a kernel.

Conventions shared by all solves:
- iterate x <- (1 - alpha) x + alpha T(x), one evaluation of T per iteration;
- per-sample relative residual r = ||T(x) - x|| / (||T(x)|| + RESIDUAL_EPS) of the iterate T was applied to;
- a sample stops once r <= tol (converged) or r is not finite (NaN/Inf: stopped, not converged);
  a stopped sample is frozen, so its result does not depend on the other samples of the batch;
- the returned x is the last update, `iterations` counts evaluations of T, `residual` is the last r;
- a sample whose inputs are not all finite (its rows of the batch inputs, or any entry of W) is never
  iterated: x stays its start, iterations 0, residual NaN, converged False. So bad input is flagged per
  sample by the kernels themselves, even where an activation would hide it (tanh(inf) = 1).
"""
import torch

from .activations import get_activation

RESIDUAL_EPS = 1e-12


def _finite_rows(W, *batch_tensors):
    """(batch,) bool: W is all finite and so is the sample's row of every batch tensor."""
    valid = torch.isfinite(W).all().expand(batch_tensors[0].shape[0])
    for t in batch_tensors:
        valid = valid & torch.isfinite(t).all(dim=1)
    return valid


def _damped_picard_ref(step, x0, alpha, tol, max_iter, valid):
    """Solve x = step(x) for the rows where `valid`; returns (x, iterations int32, residual, converged bool)."""
    x = x0.clone()
    batch = x.shape[0]
    iterations = torch.zeros(batch, dtype=torch.int32, device=x.device)
    residual = torch.full((batch,), float("nan"), dtype=x.dtype, device=x.device)
    active = valid.clone()
    for k in range(1, max_iter + 1):
        tx = step(x)
        r = (tx - x).norm(dim=1) / (tx.norm(dim=1) + RESIDUAL_EPS)
        x = torch.where(active[:, None], (1 - alpha) * x + alpha * tx, x)
        residual = torch.where(active, r, residual)
        iterations = torch.where(active, torch.full_like(iterations, k), iterations)
        active = active & (r > tol) & torch.isfinite(r)
        if not active.any():
            break
    return x, iterations, residual, residual <= tol


def fixed_point_dense_ref(W, c, z0, activation, alpha, tol, max_iter):
    """Fixed point of z = act(z W^T + c).  W: (d, d), c: (batch, d), z0: (batch, d)."""
    act = get_activation(activation).fn
    return _damped_picard_ref(lambda z: act(z @ W.T + c), z0, alpha, tol, max_iter, _finite_rows(W, c, z0))


def fixed_point_dense_backward_ref(W, c, z, grad_z, activation, alpha, tol, max_iter):
    """Implicit backward of fixed_point_dense at its fixed point z.

    With u = z W^T + c and s = act'(u), the adjoint g solves g = (s * g) W + grad_z. The solve iterates on
    grad_u = s * g, which satisfies grad_u = s * (grad_u W + grad_z), starting from 0; then
    dL/dc = grad_u and dL/dW = grad_u^T z. Rows with a non-finite entry in z, c or grad_z (or any in W) are
    not iterated (see the module docstring). Returns (grad_u, iterations, residual, converged).
    """
    s = get_activation(activation).derivative(z @ W.T + c)
    valid = _finite_rows(W, c, z, grad_z)
    return _damped_picard_ref(lambda h: s * (h @ W + grad_z), torch.zeros_like(z), alpha, tol, max_iter, valid)


# ---------------------------------------------------------------- power iteration (Lipschitz constants)
POWER_ITERATION_MODES = ("gram", "symmetric")


def _normalise_rows(z, fallback):
    """z / ||z|| per row; rows with a zero (or NaN) norm keep `fallback` (no 0/0)."""
    norm = z.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, z / norm, fallback)


def power_iteration_ref(W, row_scale, u0, mode, shift, max_iter, tol):
    """Batched power iteration on J_b = diag(row_scale_b) W.  W: (m, n), row_scale: (B, m) or None, u0: (B, n).

    "gram":      v <- J^T J v / ||.||,                 value = ||J v|| = sqrt(v^T J^T J v)  -> ||J||_2
    "symmetric": v <- (S + shift I) v / ||.||, S = (J + J^T) / 2,   value = v^T S v = v^T J v -> lambda_max(S)
    (square W only; shift >= -lambda_min(S) makes S + shift I PSD, so its top eigenvector is lambda_max's).
    v starts at u0 / ||u0||; value_k is the Rayleigh value of the k-th iterate before its update. A sample stops
    once |value_k - value_{k-1}| <= tol * |value_k| (k >= 2: converged) or value_k is not finite (not converged);
    stopped samples are frozen. A zero J v (or J^T J v) leaves v unchanged instead of dividing by 0.
    Returns (value (B,), u (B, n) the last normalised iterate, iterations int32 (B,), converged bool (B,)).
    """
    batch = u0.shape[0]
    s = torch.ones(batch, W.shape[0], dtype=W.dtype, device=W.device) if row_scale is None else row_scale
    v = _normalise_rows(u0, u0)
    value = torch.zeros(batch, dtype=W.dtype, device=W.device)
    previous = torch.full_like(value, float("nan"))
    iterations = torch.zeros(batch, dtype=torch.int32, device=W.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=W.device)
    active = torch.ones(batch, dtype=torch.bool, device=W.device)
    for k in range(1, max_iter + 1):
        jv = s * (v @ W.T)                                   # (B, m)
        if mode == "gram":
            val = jv.norm(dim=1)
            z = (s * jv) @ W                                 # J^T J v
        elif mode == "symmetric":
            val = (v * jv).sum(dim=1)
            z = 0.5 * (jv + (s * v) @ W) + shift * v         # (S + shift I) v
        else:
            raise ValueError(f"unknown mode {mode!r}; choose one of {POWER_ITERATION_MODES}")
        stop_converged = (val - previous).abs() <= tol * val.abs()  # False at k = 1 (previous is NaN)
        v = torch.where(active[:, None], _normalise_rows(z, v), v)
        value = torch.where(active, val, value)
        iterations = torch.where(active, torch.full_like(iterations, k), iterations)
        converged = torch.where(active, stop_converged, converged)
        active = active & ~stop_converged & torch.isfinite(val)
        previous = val
        if not active.any():
            break
    return value, v, iterations, converged

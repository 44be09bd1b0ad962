"""Specification of power_iteration (csrc/power_iteration/): batched power iteration on diag(row_scale_b) W."""
import torch

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

"""Pure-PyTorch references: the executable specification of every deqkern op.

Every backend (CPU C++, CUDA, Triton) is tested against these functions. They are written for clarity,
not speed, and must never be edited to match a kernel.

Conventions shared by all solves:
- iterate x <- (1 - alpha) x + alpha T(x), one evaluation of T per iteration;
- per-sample relative residual r = ||T(x) - x|| / (||T(x)|| + RESIDUAL_EPS) of the iterate T was applied to;
- a sample stops once r <= tol (converged) or r is not finite (NaN/Inf: stopped, not converged);
  a stopped sample is frozen, so its result does not depend on the other samples of the batch;
- the returned x is the last update, `iterations` counts evaluations of T, `residual` is the last r.
"""
import torch

from .activations import get_activation

RESIDUAL_EPS = 1e-12


def _damped_picard_ref(step, x0, alpha, tol, max_iter):
    """Solve x = step(x) row by row; returns (x, iterations int32, residual, converged bool)."""
    x = x0.clone()
    batch = x.shape[0]
    iterations = torch.zeros(batch, dtype=torch.int32, device=x.device)
    residual = torch.full((batch,), float("inf"), dtype=x.dtype, device=x.device)
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
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
    return _damped_picard_ref(lambda z: act(z @ W.T + c), z0, alpha, tol, max_iter)


def fixed_point_dense_backward_ref(W, c, z, grad_z, activation, alpha, tol, max_iter):
    """Implicit backward of fixed_point_dense at its fixed point z.

    With u = z W^T + c and s = act'(u), the adjoint g solves g = (s * g) W + grad_z. The solve iterates on
    grad_u = s * g, which satisfies grad_u = s * (grad_u W + grad_z), starting from 0; then
    dL/dc = grad_u and dL/dW = grad_u^T z. Returns (grad_u, iterations, residual, converged).
    """
    s = get_activation(activation).derivative(z @ W.T + c)
    return _damped_picard_ref(lambda h: s * (h @ W + grad_z), torch.zeros_like(z), alpha, tol, max_iter)

"""Specification of anderson_step (csrc/anderson_step/): one Anderson iteration of deqkern.solve, in place."""
import torch

from .anderson import anderson_weights_ref
from .common import keeps_iterating, relative_residual


def anderson_step_ref(X_hist, G_hist, H, x, fx, x_next, z_best, residual_best, residual, active, iterations,
                      k, beta, lam, tol):
    """One type-II Anderson step for every active sample, in place.

    X_hist, G_hist: (B, m, n) ring buffers of iterates x_i and residuals g_i = f(x_i) - x_i; H: (B, m, m) their
    Gram matrix G G^T in the accumulation dtype (float32 for half and float32 states, float64 for float64);
    x, fx: (B, n) the iterate and f(x); x_next, z_best: (B, n); residual_best, residual: (B,) accumulation dtype;
    active: (B,) bool; iterations: (B,) int32; k: steps already taken by the active samples (all share it).

    For an active sample: g = fx - x goes to slot k % m, its relative residual r (common.py, in the accumulation
    dtype), iterations = k + 1, and fx becomes z_best if r is the lowest residual so far. The sample stops (active
    False, x_next = x) once r <= tol or r is not finite; otherwise, with nh = min(k + 1, m) stored pairs,
    x_next = sum_i a_i (x_i + beta g_i), a = anderson_weights_ref(H, nh, slot, lam) (the one Anderson of deqkern,
    solved in the accumulation dtype). Inactive samples are untouched except x_next = x.
    """
    m = X_hist.shape[1]
    acc = H.dtype
    slot, nh = k % m, min(k + 1, m)
    act = active.clone()
    xa, fa = x.to(acc), fx.to(acc)
    r = relative_residual(fa, xa)
    X_hist[:, slot] = torch.where(act[:, None], x, X_hist[:, slot])
    G_hist[:, slot] = torch.where(act[:, None], (fa - xa).to(G_hist.dtype), G_hist[:, slot])
    residual.copy_(torch.where(act, r, residual))
    iterations.copy_(torch.where(act, torch.full_like(iterations, k + 1), iterations))
    better = act & (torch.isnan(residual_best) | (r < residual_best))
    residual_best.copy_(torch.where(better, r, residual_best))
    z_best.copy_(torch.where(better[:, None], fx, z_best))
    go_on = act & keeps_iterating(r, tol)
    active.copy_(go_on)

    Xn, Gn = X_hist[:, :nh].to(acc), G_hist[:, :nh].to(acc)
    gram = Gn @ Gn.transpose(1, 2)
    H[:, :nh, :nh] = torch.where(go_on[:, None, None], gram, H[:, :nh, :nh])
    a = anderson_weights_ref(gram, nh, slot, lam)
    mixed = torch.einsum("bj,bjn->bn", a, Xn + beta * Gn)
    x_next.copy_(torch.where(go_on[:, None], mixed.to(x_next.dtype), x))

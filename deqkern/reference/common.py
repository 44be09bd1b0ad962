"""The per-sample contract of every fixed-point solve, stated once (csrc/common/stop_rule.h and
triton_kernels/common.py are its kernel twins):

- iterate x <- update(x, T(x)), one evaluation of T per iteration;
- per-sample relative residual r = ||T(x) - x|| / (||T(x)|| + RESIDUAL_EPS) of the iterate T was applied to, its
  norms computed in float64 (so no finite float32 or half iterate overflows them), and NaN where a norm is not
  finite (float64 iterates beyond ~1e154, or a non-finite entry): an overflow is never read as convergence;
- a sample keeps iterating while r > tol and r is finite; once it stops (converged, or NaN/Inf) it is frozen, so its
  result does not depend on the other samples of the batch;
- the returned x is the last update, `iterations` counts evaluations of T, `residual` is the last r,
  `converged` is r <= tol;
- a sample whose inputs are not all finite (its rows of the batch inputs, or any entry of W) is never iterated:
  x stays its start, iterations 0, residual NaN, converged False. So bad input is flagged per sample by the
  kernels themselves, even where an activation would hide it (tanh(inf) = 1).

Half precision (float16, bfloat16) dense solves are the float32 solve of the same (exactly widened) inputs: the
iterate, every product and the residuals are float32, the returned x is rounded to the input dtype once, and the
residual is float32 (solved_in_accumulation_dtype).
"""
import functools

import torch

from ..activations import get_activation
from ..core.constants import RESIDUAL_EPS
from ..core.dtypes import HALF_DTYPES


def solved_in_accumulation_dtype(solve):
    """The specification of a dense solve on half inputs: `solve`(W, *batch tensors, *options) run on the tensors
    widened to float32, its x rounded back to W's dtype; float32 and float64 solves are `solve` itself."""

    @functools.wraps(solve)
    def wrapped(W, *args):
        if W.dtype not in HALF_DTYPES:
            return solve(W, *args)
        widened = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
        x, iterations, residual, converged, *penalty = solve(W.float(), *widened)
        if penalty:  # a backward's Jacobian penalty: its row term is rounded as x is, its value stays float32
            penalty[0] = penalty[0].to(W.dtype)
        return x.to(W.dtype), iterations, residual, converged, *penalty

    return wrapped


def with_jacobian_penalty(adjoint, W, c, z, activation, weight):
    """A dense backward's outputs with its exact Jacobian penalty (`jacobian_penalty=weight`): `adjoint` is the
    solved (grad_u, iterations, residual, converged); returned with weight dP/du added to grad_u, then weight dP/dW's
    row term (d,) and P, where P = ||J||_F^2 / N = sum_b sum_i act'(u_bi)^2 ||W_i||^2 / N at z (held constant),
    u = z W^T + c, J_b = diag(act'(u_b)) W, N = max(z.numel(), 1):
        dP/du_bi = 2 act'(u_bi) act''(u_bi) ||W_i||^2 / N,   dP/dW = (dP/du)^T z + diag(row term / weight) W,
        row term_i = weight 2 sum_b act'(u_bi)^2 / N.
    weight 0: no penalty, and the last two outputs are empty (0,) tensors. Every row of the batch enters the sums."""
    grad_u, iterations, residual, converged = adjoint
    if weight == 0:
        return grad_u, iterations, residual, converged, W.new_empty(0), W.new_empty(0)
    s, s1 = get_activation(activation).derivatives(z @ W.T + c)
    row_norms = (W * W).sum(dim=1)
    n = max(z.numel(), 1)
    column = (s * s).sum(dim=0)
    return (grad_u + 2 * weight / n * s * s1 * row_norms, iterations, residual, converged, 2 * weight / n * column,
            (column * row_norms).sum() / n)


def finite_rows(W, *batch_tensors):
    """(batch,) bool: W is all finite and so is the sample's row of every batch tensor."""
    valid = torch.isfinite(W).all().expand(batch_tensors[0].shape[0])
    for t in batch_tensors:
        valid = valid & torch.isfinite(t).all(dim=1)
    return valid


def relative_residual(tx, x):
    """(batch,) ||tx - x|| / (||tx|| + RESIDUAL_EPS) per row, in x's dtype (see the contract above)."""
    t = tx.to(torch.float64)
    difference_norm, value_norm = (t - x.to(torch.float64)).norm(dim=1), t.norm(dim=1)
    r = difference_norm / (value_norm + RESIDUAL_EPS)
    finite = torch.isfinite(difference_norm) & torch.isfinite(value_norm)
    return torch.where(finite, r, torch.full_like(r, float("nan"))).to(x.dtype)


def keeps_iterating(r, tol):
    return (r > tol) & torch.isfinite(r)


def iterate_per_sample(step, update, x0, valid, tol, max_iter):
    """Solve x = step(x) for the rows where `valid` under the contract above.

    update(k, x, tx) gives the next iterate of every row from x and tx = step(x) at evaluation k (1-based); rows that
    have stopped keep x. Returns (x, iterations int32, residual, converged bool).
    """
    x = x0.clone()
    batch = x.shape[0]
    iterations = torch.zeros(batch, dtype=torch.int32, device=x.device)
    residual = torch.full((batch,), float("nan"), dtype=x.dtype, device=x.device)
    active = valid.clone()
    for k in range(1, max_iter + 1):
        tx = step(x)
        r = relative_residual(tx, x)
        x = torch.where(active[:, None], update(k, x, tx), x)
        residual = torch.where(active, r, residual)
        iterations = torch.where(active, torch.full_like(iterations, k), iterations)
        active = active & keeps_iterating(r, tol)
        if not active.any():
            break
    return x, iterations, residual, residual <= tol

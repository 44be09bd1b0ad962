"""The solve loop of deqkern.solve while torch.compile or torch.export traces it: one `torch.while_loop`, so that a
whole Anderson (or Picard) solve, f included, is one graph with no host synchronisation.

Eager solves call the fused op deqkern::anderson_step once per iteration and ask the host "all samples stopped?"
(generic.py); a traced graph can do neither: the op takes the iteration number as a Python int and writes its
arguments in place, and the question is a data-dependent branch. Here the loop is `torch.while_loop` whose predicate
is the device scalar "some sample active and k < max_iter", whose carried state is tensors (k among them) and whose
body is functional: it returns the new state instead of writing its inputs. The step is the specification's
(deqkern/reference/anderson_step.py) with the history slot k % m and the count min(k + 1, m) as tensors: the
unfilled slots are masked out of the Gram matrix (an identity block, weight 0), which leaves the weights of the
filled ones as the specification solves them. Inductor then fuses the step's elementwise work itself.
"""
import math

import torch

from ..core.dtypes import accumulation_dtype
from ..reference.common import keeps_iterating, relative_residual


def _while_loop():
    # torch.while_loop is public from torch 2.13; the higher-order op underneath exists in every supported torch
    from torch._higher_order_ops.while_loop import while_loop

    return while_loop


def anderson_step_traced(k, x, fx, X_hist, G_hist, z_best, residual_best, residual, active, iterations, *, beta,
                         lam, tol):
    """One Anderson step of every active sample as a function of tensors (k a 0-d int64 tensor): the new (x_next,
    X_hist, G_hist, z_best, residual_best, residual, active, iterations), with the semantics of anderson_step_ref."""
    batch, m, _ = X_hist.shape
    acc = residual.dtype
    slots = torch.arange(m, device=x.device)
    slot = torch.remainder(k, m)
    filled = slots < torch.clamp(k + 1, max=m)  # (m,): the slots that hold a pair after this step's write
    here = slots == slot
    write = (active[:, None] & here[None, :])[..., None]  # (B, m, 1)
    xa, fa = x.to(acc), fx.to(acc)
    r = relative_residual(fa, xa)
    X_hist = torch.where(write, x[:, None, :], X_hist)
    G_hist = torch.where(write, (fa - xa).to(G_hist.dtype)[:, None, :], G_hist)
    residual = torch.where(active, r, residual)
    iterations = torch.where(active, (k + 1).to(iterations.dtype), iterations)
    better = active & (torch.isnan(residual_best) | (r < residual_best))
    residual_best = torch.where(better, r, residual_best)
    z_best = torch.where(better[:, None], fx, z_best)
    go_on = active & keeps_iterating(r, tol)

    Xn, Gn = X_hist.to(acc), G_hist.to(acc)
    gram = Gn @ Gn.transpose(1, 2)
    pair = filled[:, None] & filled[None, :]
    masked = torch.where(pair, gram, torch.eye(m, dtype=acc, device=x.device))  # unfilled: an identity block
    diagonal = torch.where(filled, torch.diagonal(gram, dim1=1, dim2=2), torch.zeros((), dtype=acc, device=x.device))
    A = masked + lam * torch.diag_embed(diagonal)
    L, info = torch.linalg.cholesky_ex(A)
    ones = filled.to(acc)[None, :, None].expand(batch, m, 1)
    y = torch.cholesky_solve(ones, L)[..., 0]  # 0 on the unfilled slots
    a = y / y.sum(dim=1, keepdim=True)
    ok = (info == 0) & torch.isfinite(a).all(dim=1)
    a = torch.where(ok[:, None], a, here.to(acc)[None, :])  # the plain (mixed) step where the system fails
    mixed = torch.einsum("bj,bjn->bn", a, Xn + beta * Gn)
    x_next = torch.where(go_on[:, None], mixed.to(x.dtype), x)
    return x_next, X_hist, G_hist, z_best, residual_best, residual, go_on, iterations


def anderson_traced(f, z0, check_output, m, beta, lam, tol, max_iter):
    """The driver of generic._anderson as one torch.while_loop (see the module): (z_best, iterations,
    residual_best, residual_last, None)."""
    batch, shape = z0.shape[0], z0.shape
    n = math.prod(shape[1:])
    acc = accumulation_dtype(z0.dtype)
    flat = z0.dim() == 2
    beta, lam, tol = float(beta), float(lam), float(tol)

    sample_shape = tuple(shape[1:])  # static; the batch size is read from the carried state inside the body (a
    # dynamic one, under torch.export, cannot be closed over)

    def evaluate(x):
        fx = f(x if flat else x.view(x.shape[0], *sample_shape))
        check_output(fx)
        return fx if flat else fx.reshape(x.shape)

    def keep_going(k, x, X_hist, G_hist, z_best, residual_best, residual, active, iterations):
        return active.any() & (k < max_iter)

    def body(k, x, X_hist, G_hist, z_best, residual_best, residual, active, iterations):
        state = anderson_step_traced(k, x, evaluate(x), X_hist, G_hist, z_best, residual_best, residual, active,
                                     iterations, beta=beta, lam=lam, tol=tol)
        return (k + 1, *state)

    x = z0.reshape(batch, n).clone(memory_format=torch.contiguous_format)
    nan = torch.full((batch,), math.nan, dtype=acc, device=z0.device)
    start = (torch.zeros((), dtype=torch.int64, device=z0.device), x, x.new_zeros(batch, m, n),
             x.new_zeros(batch, m, n), x.clone(), nan, nan.clone(),
             torch.ones(batch, dtype=torch.bool, device=z0.device),
             torch.zeros(batch, dtype=torch.int32, device=z0.device))
    _, _, _, _, z_best, residual_best, residual, _, iterations = _while_loop()(keep_going, body, start)
    return z_best.view(shape), iterations, residual_best, residual, None

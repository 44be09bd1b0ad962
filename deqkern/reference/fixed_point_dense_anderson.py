"""Specification of fixed_point_dense_anderson and its backward (csrc/fixed_point_dense_anderson/)."""
import torch

from ..activations import get_activation
from .anderson import anderson_weights_ref
from .common import finite_rows, iterate_per_sample, solved_in_accumulation_dtype, with_jacobian_penalty


def _anderson_update(batch, d, m, beta, lam, dtype, device):
    """The Anderson update(k, x, tx) of iterate_per_sample, with its ring buffer of the last m pairs."""
    hist_x = torch.zeros(batch, m, d, dtype=dtype, device=device)
    hist_g = torch.zeros(batch, m, d, dtype=dtype, device=device)
    gram = torch.zeros(batch, m, m, dtype=torch.float64, device=device)

    def update(k, x, tx):
        slot, n = (k - 1) % m, min(k, m)
        hist_x[:, slot] = x
        hist_g[:, slot] = tx - x
        # One new row (and column) of the Gram matrix per step: <g_slot, g_j>, dot products in x's dtype.
        row = torch.einsum("bd,bjd->bj", hist_g[:, slot], hist_g[:, :n]).double()
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        a = anderson_weights_ref(gram, n, slot, lam).to(dtype)
        return torch.einsum("bj,bjd->bd", a, hist_x[:, :n] + beta * hist_g[:, :n])

    return update


def _anderson_ref(step, x0, m, beta, lam, tol, max_iter, valid):
    """Solve x = step(x) by type-II Anderson: evaluation k stores x and g = step(x) - x in slot (k - 1) % m (the last
    n = min(k, m) pairs) and moves to x <- sum_i a_i (x_i + beta g_i) (beta = 1: sum_i a_i step(x_i); n = 1: the
    damped Picard step), a = anderson_weights_ref of the float64 Gram matrix. Stopping, freezing and non-finite
    inputs follow the per-sample contract (common.py)."""
    update = _anderson_update(x0.shape[0], x0.shape[1], m, beta, lam, x0.dtype, x0.device)
    return iterate_per_sample(step, update, x0, valid, tol, max_iter)


@solved_in_accumulation_dtype
def fixed_point_dense_anderson_ref(W, c, z0, activation, m, beta, lam, tol, max_iter):
    """Fixed point of z = act(z W^T + c) by Anderson acceleration.  W: (d, d), c: (batch, d), z0: (batch, d).

    m: history length (1..16), beta: mixing in (0, 1], lam >= 0: regulariser relative to the Gram diagonal
    (scale-invariant: the weights do not change when the residuals are scaled).
    """
    act = get_activation(activation).fn
    return _anderson_ref(lambda z: act(z @ W.T + c), z0, m, beta, lam, tol, max_iter, finite_rows(W, c, z0))


@solved_in_accumulation_dtype
def fixed_point_dense_anderson_backward_ref(W, c, z, grad_z, activation, m, beta, lam, tol, max_iter,
                                            jacobian_penalty=0.0):
    """Implicit backward of fixed_point_dense_anderson: the adjoint of fixed_point_dense_backward_ref,
    grad_u = s * (grad_u W + grad_z), s = act'(z W^T + c), solved from 0 by the same Anderson iteration, with the
    same Jacobian penalty and outputs."""
    s = get_activation(activation).derivative(z @ W.T + c)
    adjoint = _anderson_ref(lambda h: s * (h @ W + grad_z), torch.zeros_like(z), m, beta, lam, tol, max_iter,
                            finite_rows(W, c, z, grad_z))
    return with_jacobian_penalty(adjoint, W, c, z, activation, jacobian_penalty)

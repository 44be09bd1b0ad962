"""Specification of fixed_point_dense and fixed_point_dense_backward (csrc/fixed_point_dense/): damped Picard."""
from ..activations import get_activation
from .common import finite_rows, iterate_per_sample, solved_in_accumulation_dtype, with_jacobian_penalty


@solved_in_accumulation_dtype
def fixed_point_dense_ref(W, c, z0, activation, alpha, tol, max_iter):
    """Fixed point of z = act(z W^T + c) by x <- (1 - alpha) x + alpha act(x W^T + c) from z0.

    W: (d, d), c: (batch, d), z0: (batch, d). Returns (z, iterations int32, residual, converged bool).
    """
    act = get_activation(activation).fn
    return iterate_per_sample(lambda z: act(z @ W.T + c), lambda k, x, tx: (1 - alpha) * x + alpha * tx, z0,
                              finite_rows(W, c, z0), tol, max_iter)


@solved_in_accumulation_dtype
def fixed_point_dense_backward_ref(W, c, z, grad_z, activation, alpha, tol, max_iter, jacobian_penalty=0.0):
    """Implicit backward of fixed_point_dense at its fixed point z.

    With u = z W^T + c and s = act'(u), the adjoint g solves g = (s * g) W + grad_z. The solve iterates on
    grad_u = s * g, which satisfies grad_u = s * (grad_u W + grad_z), from 0 by the same damped iteration; then
    dL/dc = grad_u and dL/dW = grad_u^T z. Rows with a non-finite entry in z, c or grad_z (or any in W) are not
    iterated. jacobian_penalty = w adds w times the exact Jacobian penalty's gradient (common.with_jacobian_penalty).
    Returns (grad_u, iterations, residual, converged, penalty row term, penalty).
    """
    s = get_activation(activation).derivative(z @ W.T + c)
    adjoint = iterate_per_sample(lambda h: s * (h @ W + grad_z), lambda k, x, tx: (1 - alpha) * x + alpha * tx,
                                 z.new_zeros(z.shape), finite_rows(W, c, z, grad_z), tol, max_iter)
    return with_jacobian_penalty(adjoint, W, c, z, activation, jacobian_penalty)

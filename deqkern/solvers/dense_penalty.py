"""The exact Jacobian penalty of a dense layer (`fixed_point_dense(..., jacobian_penalty=w)`, the dense layers'
`jac_reg=`) in closed form in PyTorch, for the backward with create_graph=True only: its first-order backward gets
the penalty from the backward op's kernel, with grad_u (the specification of both: with_jacobian_penalty in
deqkern/reference/common.py)."""
import torch

from ..activations import get_activation
from ..core.dtypes import accumulation_dtype


def jacobian_penalty_gradient(W, c, z, activation, weight):
    """The gradient of weight * P, P = ||J||_F^2 / N = sum_b sum_i act'(u_bi)^2 ||W_i||^2 / N at the fixed point z
    (held constant, as in Bai et al.'s code), u = z W^T + c, N = max(z.numel(), 1), J_b = diag(act'(u_b)) W,
    written out so that it joins the implicit backward's own products: dP/du = 2 act' act'' ||W_i||^2 / N (added to
    the adjoint's grad_u, so dP/dc comes with it and dP/dW's (dP/du)^T z shares the one product grad_u^T z), plus
    dP/dW_i = (2 / N) sum_b act'(u_bi)^2 W_i. Returns (weight dP/du, weight (2 / N) sum_b act'^2 (d,), P detached).
    Costs one product z W^T and a few elementwise passes (in place where they can be). Half data is computed with in
    float32 (its 2 weight / N underflows float16 at everyday sizes) and the two gradient terms are rounded back."""
    dtype, acc = W.dtype, accumulation_dtype(W.dtype)
    if acc != dtype:
        grad_u, row_term, value = jacobian_penalty_gradient(W.to(acc), c.to(acc), z.to(acc), activation, weight)
        return grad_u.to(dtype), row_term.to(dtype), value
    s, s1 = get_activation(activation).derivatives(torch.addmm(c, z, W.T))
    r = torch.linalg.vector_norm(W, dim=1)
    r.mul_(r)
    count = max(z.numel(), 1)
    scale = 2.0 * weight / count
    column = torch.linalg.vector_norm(s, dim=0)
    column.mul_(column)  # sum_b act'(u_bi)^2
    value = torch.dot(column, r).detach() / count
    return s1.mul_(s).mul_(r.mul_(scale)), column.mul_(scale), value

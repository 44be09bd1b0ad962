"""Type-II Anderson acceleration, stated once for every Anderson kernel: the dense solve
(fixed_point_dense_anderson) and deqkern.solve's anderson_step use the same weights, regulariser, history cap and
default (csrc/common/anderson_weights.h, triton_kernels/anderson_weights.py)."""
import torch

from ..core.constants import ANDERSON_MAX_HISTORY  # noqa: F401  (the cap on n below)


def anderson_weights_ref(gram, n, slot, lam):
    """Mixing weights a (B, n), sum(a) = 1, minimising ||sum_i a_i g_i||^2 + lam sum_i a_i^2 G_ii.

    gram: (B, >= n, >= n) Gram matrix G_ij = <g_i, g_j> of the stored residuals (the first n slots), in the dtype
    the weights are solved in. a = y / (1^T y) with A y = 1, A = G + lam diag(G) (the solution of the bordered system
    [[0, 1^T], [1, A]] [nu; a] = [1; 0]), y by the Cholesky factorisation of A. Where A is not positive definite or
    a is not finite (e.g. a zero residual with lam = 0), a = e_slot: the plain (mixed) Picard step.
    """
    g = gram[:, :n, :n]
    A = g + lam * torch.diag_embed(torch.diagonal(g, dim1=1, dim2=2))
    L, info = torch.linalg.cholesky_ex(A)
    ones = torch.ones(g.shape[0], n, 1, dtype=g.dtype, device=g.device)
    y = torch.cholesky_solve(ones, L)[..., 0]
    a = y / y.sum(dim=1, keepdim=True)
    ok = (info == 0) & torch.isfinite(a).all(dim=1)
    fallback = torch.zeros_like(a)
    fallback[:, slot] = 1
    return torch.where(ok[:, None], a, fallback)

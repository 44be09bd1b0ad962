"""The mixing weights of one Anderson step in Triton: the Triton twin of csrc/common/anderson_weights.h, used by the
dense Anderson solve and by anderson_step (specification: deqkern/reference/anderson.py).

a = y / (1^T y) with A y = 1, A = G + lam diag(G) on the first n stored slots; elimination without pivoting (A is
symmetric positive definite whenever lam > 0 and no stored residual is zero). Where a pivot is not > 0 or the
weights are not finite, a = e_slot (the plain mixed Picard step).
"""
import triton
import triton.language as tl

from .common import INF


@triton.jit
def anderson_weights(H, n, slot, lam, MP: tl.constexpr):
    """(BLOCK_B, MP) weights from the Gram matrices H (BLOCK_B, MP, MP), in H's dtype; slots >= n get 0."""
    o_i = tl.arange(0, MP)
    i3 = o_i[None, :, None]
    j3 = o_i[None, None, :]
    used = (i3 < n) & (j3 < n)
    # A = G + lam diag(G) on the used block, the identity elsewhere; right-hand side 1 on the used slots.
    A = tl.where(used, H + tl.where(i3 == j3, lam * H, 0.0), tl.where(i3 == j3, 1.0, 0.0))
    rhs = tl.where(o_i[None, :] < n, 1.0, 0.0) + tl.zeros_like(tl.sum(A, axis=2))
    ok = tl.sum(rhs, axis=1) > 0  # (BLOCK_B,) True
    # Forward elimination without pivoting.
    for j in tl.static_range(MP):
        row_j = tl.sum(tl.where(i3 == j, A, 0.0), axis=1)             # (BLOCK_B, MP): A[j, :]
        piv = tl.sum(tl.where(o_i[None, :] == j, row_j, 0.0), axis=1)  # (BLOCK_B,)
        ok = ok & (piv > 0) & (piv < INF)
        rhs_j = tl.sum(tl.where(o_i[None, :] == j, rhs, 0.0), axis=1)
        col_j = tl.sum(tl.where(j3 == j, A, 0.0), axis=2)             # (BLOCK_B, MP): A[:, j]
        f = tl.where(o_i[None, :] > j, col_j / piv[:, None], 0.0)
        A = A - f[:, :, None] * row_j[:, None, :]
        rhs = rhs - f * rhs_j[:, None]
    # Back substitution.
    y = tl.zeros_like(rhs)
    for jj in tl.static_range(MP):
        j = MP - 1 - jj
        row_j = tl.sum(tl.where(i3 == j, A, 0.0), axis=1)
        piv = tl.sum(tl.where(o_i[None, :] == j, row_j, 0.0), axis=1)
        rhs_j = tl.sum(tl.where(o_i[None, :] == j, rhs, 0.0), axis=1)
        yj = (rhs_j - tl.sum(row_j * y, axis=1)) / piv   # y is 0 at j and below, so only later slots count
        y = tl.where(o_i[None, :] == j, yj[:, None], y)
    y = tl.where(o_i[None, :] < n, y, 0.0)
    total = tl.sum(y, axis=1)
    a = y / total[:, None]
    ok = ok & (total != 0) & (tl.max(tl.where(tl.abs(a) < INF, 0, 1), axis=1) == 0)
    fallback = tl.where(o_i[None, :] == slot, 1.0, 0.0) + tl.zeros_like(a)
    return tl.where(ok[:, None], a, fallback)

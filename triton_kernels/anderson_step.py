"""One type-II Anderson step of deqkern.solve as one Triton launch (semantics: deqkern/reference/anderson_step.py).

One program per sample. Pass 1 over BLOCK_N columns: g = f(x) - x goes to history slot k % m, the norms of g and
f(x) and the m dot products <g, g_j> accumulate in registers (the new row/column of the persistent Gram matrix H:
O(m n)). Then, in registers: the residual, the lowest-residual bookkeeping, the (M_PAD, M_PAD) Gram tile with
the new row/column, and the weights (anderson_weights.py, the one Anderson weight solve of deqkern) in float32
(float64 for float64 states). Pass 2 mixes x_next = sum_j a_j (x_j + beta g_j).
The slot being written is taken from registers, never re-read, so no barrier is needed between the passes.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from deqkern.core.constants import ANDERSON_MAX_HISTORY

from .anderson_weights import anderson_weights
from .common import device_guard, keeps_iterating, relative_residual


@triton.jit
def _copy_row(p_src, stride_src, p_dst, N, BLOCK_N: tl.constexpr):
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        tl.store(p_dst + o_n, tl.load(p_src + o_n * stride_src, mask=m_n), mask=m_n)


@triton.jit
def _anderson_step_kernel(
    # pointers
    X_ptr, G_ptr, H_ptr, x_ptr, fx_ptr, xn_ptr, zb_ptr, rb_ptr, r_ptr, act_ptr, it_ptr,
    # sizes and scalars
    N, M, k, beta: tl.float64, lam: tl.float64, tol: tl.float64,
    # strides of x and fx (the other tensors are contiguous)
    stride_x_b, stride_x_n, stride_f_b, stride_f_n,
    # meta-parameters
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    dtype = X_ptr.dtype.element_ty
    acc = H_ptr.dtype.element_ty
    i_b = tl.program_id(0).to(tl.int64)
    slot = k % M
    nh = tl.minimum(k + 1, M)
    o_i = tl.arange(0, M_PAD)  # history index along rows
    o_j = tl.arange(0, M_PAD)  # ... along columns
    m_h = o_i < nh
    p_x = x_ptr + i_b * stride_x_b
    p_f = fx_ptr + i_b * stride_f_b
    p_X = X_ptr + i_b * M * N
    p_G = G_ptr + i_b * M * N
    p_xn = xn_ptr + i_b * N
    active = tl.load(act_ptr + i_b).to(tl.int32) != 0
    b_beta = tl.full([], beta, acc)
    b_lam = tl.full([], lam, acc)
    b_tol = tl.full([], tol, acc)
    if active:
        # Sums in float64 (no finite float32 state overflows them), rounded to the accumulation type after.
        sq_g = tl.zeros([], dtype=tl.float64)
        sq_f = tl.zeros([], dtype=tl.float64)
        dots = tl.zeros([M_PAD], dtype=tl.float64)
        for n0 in range(0, N, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < N
            b_x = tl.load(p_x + o_n * stride_x_n, mask=m_n, other=0.0)
            b_f = tl.load(p_f + o_n * stride_f_n, mask=m_n, other=0.0)
            b_fa = b_f.to(acc)
            b_ga = b_fa - b_x.to(acc)
            b_g = b_ga.to(dtype)
            tl.store(p_X + slot * N + o_n, b_x, mask=m_n)
            tl.store(p_G + slot * N + o_n, b_g, mask=m_n)
            b_f64 = b_f.to(tl.float64)
            b_g64 = b_f64 - b_x.to(tl.float64)
            sq_g += tl.sum(b_g64 * b_g64, axis=0)
            sq_f += tl.sum(b_f64 * b_f64, axis=0)
            m_in = m_h[:, None] & m_n[None, :]
            b_G = tl.load(p_G + o_i[:, None] * N + o_n[None, :], mask=m_in, other=0.0)
            b_G = tl.where(o_i[:, None] == slot, b_g[None, :], b_G)  # the slot from registers, not memory
            dots += tl.sum(b_G.to(tl.float64) * b_g.to(tl.float64)[None, :], axis=1)
        r = relative_residual(sq_g, sq_f).to(acc)
        dots = dots.to(acc)  # H is kept in the accumulation type
        tl.store(r_ptr + i_b, r)
        tl.store(it_ptr + i_b, (k + 1).to(tl.int32))
        r_best = tl.load(rb_ptr + i_b)
        if (r_best != r_best) | (r < r_best):
            tl.store(rb_ptr + i_b, r)
            _copy_row(p_f, stride_f_n, zb_ptr + i_b * N, N, BLOCK_N)
        if keeps_iterating(r, b_tol):
            # H with the new row and column, in registers and back to memory.
            p_H = H_ptr + i_b * M * M + o_i[:, None] * M + o_j[None, :]
            m_hh = m_h[:, None] & (o_j < nh)[None, :]
            b_H = tl.load(p_H, mask=m_hh, other=0.0)
            dots_col = tl.sum(tl.where(o_i[:, None] == o_j[None, :], dots[:, None], 0.0), axis=0)  # dots by column
            b_H = tl.where(o_i[:, None] == slot, dots_col[None, :], b_H)
            b_H = tl.where(o_j[None, :] == slot, dots[:, None], b_H)
            tl.store(p_H, b_H, mask=m_hh)
            a = tl.sum(anderson_weights(b_H[None, :, :], nh, slot, b_lam, M_PAD), axis=0)
            a = tl.where(m_h, a, 0.0).to(acc)
            ab = a * b_beta
            for n0 in range(0, N, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_n = o_n < N
                m_in = m_h[:, None] & m_n[None, :]
                b_x = tl.load(p_x + o_n * stride_x_n, mask=m_n, other=0.0)
                b_g = (tl.load(p_f + o_n * stride_f_n, mask=m_n, other=0.0).to(acc) - b_x.to(acc)).to(dtype)
                b_X = tl.load(p_X + o_i[:, None] * N + o_n[None, :], mask=m_in, other=0.0)
                b_G = tl.load(p_G + o_i[:, None] * N + o_n[None, :], mask=m_in, other=0.0)
                b_X = tl.where(o_i[:, None] == slot, b_x[None, :], b_X)
                b_G = tl.where(o_i[:, None] == slot, b_g[None, :], b_G)
                out = tl.sum(a[:, None] * b_X.to(acc) + ab[:, None] * b_G.to(acc), axis=0)
                tl.store(p_xn + o_n, out.to(dtype), mask=m_n)
        else:
            tl.store(act_ptr + i_b, 0)
            _copy_row(p_x, stride_x_n, p_xn, N, BLOCK_N)
    else:
        _copy_row(p_x, stride_x_n, p_xn, N, BLOCK_N)


def _check(X_hist, G_hist, H, x, fx, x_next, z_best, residual_best, residual, active, iterations):
    torch._check(X_hist.dim() == 3 and G_hist.shape == X_hist.shape, lambda: "X_hist, G_hist must be (B, m, n)")
    B, m, n = X_hist.shape
    torch._check(1 <= m <= ANDERSON_MAX_HISTORY, lambda: f"history m must be in [1, {ANDERSON_MAX_HISTORY}]")
    torch._check(H.shape == (B, m, m), lambda: "H must be (B, m, m)")
    for t in (x, fx, x_next, z_best):
        torch._check(t.shape == (B, n) and t.dtype == X_hist.dtype, lambda: "x, fx, x_next, z_best: (B, n)")
    for t in (residual_best, residual, active, iterations):
        torch._check(t.shape == (B,), lambda: "residual_best, residual, active, iterations: (B,)")


def launch(X_hist, G_hist, H, x, fx, x_next, z_best, residual_best, residual, active, iterations, k, beta, lam,
           tol) -> None:
    """Checks the state and launches one Anderson step, one program per batch row."""
    _check(X_hist, G_hist, H, x, fx, x_next, z_best, residual_best, residual, active, iterations)
    for name, t in (("X_hist", X_hist), ("G_hist", G_hist), ("H", H), ("x_next", x_next), ("z_best", z_best),
                    ("residual_best", residual_best), ("residual", residual), ("active", active),
                    ("iterations", iterations)):
        torch._check(t.is_contiguous(),
                     lambda: f"deqkern.anderson_step: {name} is updated in place and must be contiguous")
    B, m, n = X_hist.shape
    if B == 0:
        return
    block_n = min(max(triton.next_power_of_2(max(n, 1)), 16), 256)
    m_pad = max(triton.next_power_of_2(m), 2)
    with device_guard(x):
        _anderson_step_kernel[(B,)](
            X_hist, G_hist, H, x, fx, x_next, z_best, residual_best, residual, active, iterations,
            n, m, k, beta, lam, tol,
            x.stride(0), x.stride(1), fx.stride(0), fx.stride(1),
            M_PAD=m_pad, BLOCK_N=block_n,
        )


@torch.library.custom_op(
    "deqkern::anderson_step_triton",
    mutates_args=("X_hist", "G_hist", "H", "x_next", "z_best", "residual_best", "residual", "active", "iterations"),
)
def anderson_step_triton(X_hist: Tensor, G_hist: Tensor, H: Tensor, x: Tensor, fx: Tensor, x_next: Tensor,
                         z_best: Tensor, residual_best: Tensor, residual: Tensor, active: Tensor, iterations: Tensor,
                         k: int, beta: float, lam: float, tol: float) -> None:
    """deqkern::anderson_step (csrc/anderson_step/anderson_step.cpp) in Triton; x and fx may be strided, the state it
    updates in place must be contiguous (the one contiguity rule of every backend)."""
    launch(X_hist, G_hist, H, x, fx, x_next, z_best, residual_best, residual, active, iterations, k, beta, lam, tol)


@anderson_step_triton.register_fake
def _(X_hist, G_hist, H, x, fx, x_next, z_best, residual_best, residual, active, iterations, k, beta, lam, tol):
    _check(X_hist, G_hist, H, x, fx, x_next, z_best, residual_best, residual, active, iterations)
    return None

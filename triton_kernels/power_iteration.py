"""Batched power iteration on J_b = diag(row_scale_b) W: one Triton launch for the whole iteration.

Semantics: deqkern/reference/power_iteration.py. One program per sample runs every iteration itself (a
`while` loop that ends when its value settles or max_iter is reached); nothing returns to the host in between.
Per iteration, with W (M, N) read in (BLOCK_M, BLOCK_N) tiles:
    pass 1 (rows):    y = s * (W v);  gram: c = s * y, value^2 = sum y^2;  symmetric: value = v . y
    pass 2 (columns): gram: z = W^T c;  symmetric: z = (y + W^T (s * v)) / 2 + shift v
    pass 3:           v = z / ||z|| (unless ||z|| = 0)
The vectors live in a launcher-allocated scratch (B, 3, max(M, N)): [v, z, y-or-c]; barriers separate the passes.
Products are broadcast multiply-and-sum in the input dtype (a matrix-vector product has no use for tl.dot).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import INF, device_guard, load_rows


@triton.jit
def _power_iteration_kernel(
    # pointers
    W_ptr, s_ptr, u0_ptr, value_ptr, u_ptr, iters_ptr, conv_ptr, scratch_ptr,
    # sizes and scalars (fp64 so that float64 runs see the caller's exact values)
    M, N, shift: tl.float64, tol: tl.float64, max_iter,
    # strides
    stride_w_m, stride_w_n, stride_s_b, stride_u0_b, stride_u_b, stride_scr_b, stride_scr_buf,
    # meta-parameters
    HAS_SCALE: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    dtype = W_ptr.dtype.element_ty
    i_b = tl.program_id(0).to(tl.int64)
    p_v = scratch_ptr + i_b * stride_scr_b
    p_z = p_v + stride_scr_buf
    p_c = p_v + 2 * stride_scr_buf
    p_s = s_ptr + i_b * stride_s_b
    b_shift = tl.full([], shift, dtype)
    b_tol = tl.full([], tol, dtype)

    # v = u0 / ||u0|| (u0 itself when its norm is 0)
    sq = tl.zeros([], dtype=dtype)
    for j0 in range(0, N, BLOCK_N):
        o_n = j0 + tl.arange(0, BLOCK_N)
        b_u = tl.load(u0_ptr + i_b * stride_u0_b + o_n, mask=o_n < N, other=0.0)
        sq += tl.sum(b_u * b_u, axis=0)
    norm = tl.sqrt(sq)
    inv = 1.0 / tl.where(norm > 0, norm, 1.0)
    for j0 in range(0, N, BLOCK_N):
        o_n = j0 + tl.arange(0, BLOCK_N)
        b_u = tl.load(u0_ptr + i_b * stride_u0_b + o_n, mask=o_n < N, other=0.0)
        tl.store(p_v + o_n, b_u * inv, mask=o_n < N)
    tl.debug_barrier()

    k = tl.full([], 0, tl.int32)
    value = tl.zeros([], dtype=dtype)
    previous = tl.zeros([], dtype=dtype)
    converged = tl.full([], 0, tl.int1)
    active = tl.full([], 1, tl.int1)
    while active & (k < max_iter):
        k += 1
        # pass 1: y = s * (W v) by row blocks
        acc_value = tl.zeros([], dtype=dtype)
        for i0 in range(0, M, BLOCK_M):
            o_m = i0 + tl.arange(0, BLOCK_M)
            m_m = o_m < M
            acc = tl.zeros([BLOCK_M], dtype=dtype)
            for j0 in range(0, N, BLOCK_N):
                o_n = j0 + tl.arange(0, BLOCK_N)
                m_n = o_n < N
                b_w = load_rows(W_ptr, o_m, o_n, m_m, m_n, stride_w_m, stride_w_n)
                b_v = tl.load(p_v + o_n, mask=m_n, other=0.0)
                acc += tl.sum(b_w * b_v[None, :], axis=1)
            if HAS_SCALE:
                b_s = tl.load(p_s + o_m, mask=m_m, other=0.0)
            else:
                b_s = tl.where(m_m, 1.0, 0.0).to(dtype)
            b_y = b_s * acc
            if SYMMETRIC:
                b_vm = tl.load(p_v + o_m, mask=m_m, other=0.0)
                acc_value += tl.sum(b_vm * b_y, axis=0)
                tl.store(p_c + o_m, b_y, mask=m_m)
            else:
                acc_value += tl.sum(b_y * b_y, axis=0)
                tl.store(p_c + o_m, b_s * b_y, mask=m_m)
        tl.debug_barrier()
        # pass 2: z by column blocks
        sq_z = tl.zeros([], dtype=dtype)
        for j0 in range(0, N, BLOCK_N):
            o_n = j0 + tl.arange(0, BLOCK_N)
            m_n = o_n < N
            acc = tl.zeros([BLOCK_N], dtype=dtype)
            for i0 in range(0, M, BLOCK_M):
                o_m = i0 + tl.arange(0, BLOCK_M)
                m_m = o_m < M
                b_w = load_rows(W_ptr, o_m, o_n, m_m, m_n, stride_w_m, stride_w_n)
                if SYMMETRIC:
                    b_coef = tl.load(p_v + o_m, mask=m_m, other=0.0)
                    if HAS_SCALE:
                        b_coef = b_coef * tl.load(p_s + o_m, mask=m_m, other=0.0)
                else:
                    b_coef = tl.load(p_c + o_m, mask=m_m, other=0.0)
                acc += tl.sum(b_w * b_coef[:, None], axis=0)
            if SYMMETRIC:
                b_y = tl.load(p_c + o_n, mask=m_n, other=0.0)
                b_v = tl.load(p_v + o_n, mask=m_n, other=0.0)
                acc = 0.5 * (b_y + acc) + b_shift * b_v
            sq_z += tl.sum(acc * acc, axis=0)
            tl.store(p_z + o_n, acc, mask=m_n)
        tl.debug_barrier()
        # pass 3: v = z / ||z||, kept when ||z|| = 0 (no 0 / 0) or NaN
        norm = tl.sqrt(sq_z)
        keep = ~(norm > 0)
        inv = 1.0 / tl.where(keep, 1.0, norm)
        for j0 in range(0, N, BLOCK_N):
            o_n = j0 + tl.arange(0, BLOCK_N)
            m_n = o_n < N
            b_z = tl.load(p_z + o_n, mask=m_n, other=0.0)
            b_v = tl.load(p_v + o_n, mask=m_n, other=0.0)
            tl.store(p_v + o_n, tl.where(keep, b_v, b_z * inv), mask=m_n)
        tl.debug_barrier()
        if SYMMETRIC:
            value = acc_value
        else:
            value = tl.sqrt(acc_value)
        converged = (k > 1) & (tl.abs(value - previous) <= b_tol * tl.abs(value))
        active = ~converged & (tl.abs(value) < INF)  # NaN < inf is false: NaN stops too
        previous = value

    for j0 in range(0, N, BLOCK_N):
        o_n = j0 + tl.arange(0, BLOCK_N)
        tl.store(u_ptr + i_b * stride_u_b + o_n, tl.load(p_v + o_n, mask=o_n < N, other=0.0), mask=o_n < N)
    tl.store(value_ptr + i_b, value)
    tl.store(iters_ptr + i_b, k)
    tl.store(conv_ptr + i_b, converged.to(tl.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
def _check_inputs(W: Tensor, row_scale: Optional[Tensor], u0: Tensor, mode: str) -> None:
    torch._check(mode in ("gram", "symmetric"), lambda: f"unknown mode {mode!r}")
    torch._check(W.dim() == 2, lambda: f"W must be (m, n), got {tuple(W.shape)}")
    torch._check(mode == "gram" or W.shape[0] == W.shape[1], lambda: "mode 'symmetric' needs a square W")
    torch._check(W.dtype in (torch.float32, torch.float64), lambda: f"unsupported dtype {W.dtype}")
    torch._check(u0.dim() == 2 and u0.shape[1] == W.shape[1], lambda: f"u0 must be (batch, {W.shape[1]})")
    for t in (u0,) if row_scale is None else (u0, row_scale):
        torch._check(t.dtype == W.dtype and t.device == W.device, lambda: "inputs must share dtype and device")
    if row_scale is not None:
        torch._check(row_scale.shape == (u0.shape[0], W.shape[0]), lambda: "row_scale must be (batch, m)")


def _empty_outputs(W: Tensor, u0: Tensor):
    batch = u0.shape[0]
    return (u0.new_empty((batch,)), torch.empty_like(u0, memory_format=torch.contiguous_format),
            u0.new_empty((batch,), dtype=torch.int32), u0.new_empty((batch,), dtype=torch.bool))


def launch(W, row_scale, u0, mode, shift, max_iter, tol, block_m=None, block_n=None):
    """Runs the iteration; block_m / block_n override the defaults (tests use them to cross tile edges)."""
    _check_inputs(W, row_scale, u0, mode)
    W, u0 = W.contiguous(), u0.contiguous()
    value, u, iters, converged = _empty_outputs(W, u0)
    batch = u0.shape[0]
    if batch == 0:
        return value, u, iters, converged
    M, N = W.shape
    block_m = block_m or min(32, max(16, triton.next_power_of_2(M)))
    block_n = block_n or min(128, max(16, triton.next_power_of_2(N)))
    scratch = u0.new_empty((batch, 3, max(M, N)))
    s = u0 if row_scale is None else row_scale.contiguous()  # not read without HAS_SCALE
    with device_guard(W):
        _power_iteration_kernel[(batch,)](
            W, s, u0, value, u, iters, converged.view(torch.uint8), scratch,
            M, N, float(shift), float(tol), int(max_iter),
            W.stride(0), W.stride(1), s.stride(0), u0.stride(0), u.stride(0), scratch.stride(0), scratch.stride(1),
            HAS_SCALE=row_scale is not None, SYMMETRIC=mode == "symmetric", BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=4,
        )
    return value, u, iters, converged


@torch.library.custom_op("deqkern::power_iteration_triton", mutates_args=())
def _power_iteration_op(W: Tensor, row_scale: Optional[Tensor], u0: Tensor, mode: str, shift: float, max_iter: int,
                        tol: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return launch(W, row_scale, u0, mode, shift, max_iter, tol)


@_power_iteration_op.register_fake
def _(W, row_scale, u0, mode, shift, max_iter, tol):
    _check_inputs(W, row_scale, u0, mode)
    return _empty_outputs(W, u0)


def power_iteration_triton(W: Tensor, row_scale: Optional[Tensor], u0: Tensor, mode: str, shift: float,
                           max_iter: int, tol: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Power iteration on diag(row_scale_b) W, W: (m, n), row_scale: (B, m) or None, u0: (B, n).

    Returns (value (B,), u (B, n), iterations int32 (B,), converged bool (B,)); see power_iteration_ref.
    """
    return torch.ops.deqkern.power_iteration_triton(W, row_scale, u0, mode, shift, max_iter, tol)

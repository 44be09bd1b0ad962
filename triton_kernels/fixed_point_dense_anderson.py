"""Dense fixed-point solve by type-II Anderson acceleration, and its implicit backward: one Triton launch per solve.

Semantics: deqkern/reference/fixed_point_dense_anderson.py. The map T
is the one of fixed_point_dense.py (forward act(x W^T + c), adjoint s * (h W + grad_z)); each step stores the pair
(x, g = T(x) - x) in history slot (k - 1) % m, adds one row of the Gram matrix of the stored g, solves for the weights
a (sum a = 1) minimising ||sum a_i g_i||^2 + lam sum a_i^2 ||g_i||^2, and moves to x <- sum_i a_i (x_i + beta g_i).

Each program owns BLOCK_B rows and runs the entire solve; the launcher picks one of two kernels by width:
- _anderson_kernel (d <= REGISTER_WIDTH = 64): the iterate, the bias, s and the operator tile live in registers
  (BLOCK_D >= d; compiled for sm_90, BLOCK_D = 128 spills kilobytes of registers in every configuration tried, up to
  16 warps: bench/results/compile_check_sm90.md); the slot written in this step is used from registers, older slots
  are read back after the barrier that closes every iteration;
- _anderson_scratch_kernel (wider rows, any d): the iterate (and s) live in a launcher-allocated scratch (2, B, d)
  and every pass goes over column blocks (common.SCRATCH_BLOCKS) as the Picard scratch path does: pass 1 computes
  T(x) block by block, stores the new pair in its slot, and sums ||g||^2, ||T(x)||^2 and the new Gram row; pass 2,
  after a barrier, mixes the stored pairs into the next iterate;
- the history (x_i, g_i) lives in a launcher-allocated scratch (2, MP, B, d), in the accumulation dtype;
- the Gram matrix (BLOCK_B, MP, MP) and the small solve run in float64 in registers (MP = next power of two >= m).
Both have only run under TRITON_INTERPRET=1.
The weights are anderson_weights.py's, the one Anderson weight solve of deqkern.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from deqkern.activations import get_activation
from deqkern.core.constants import ANDERSON_MAX_HISTORY, TRITON_DENSE_ANDERSON_REGISTER_WIDTH
from deqkern.core.dtypes import accumulation_dtype

from .anderson_weights import anderson_weights
from .common import (
    SCRATCH_BLOCKS,
    JacobianPenalty,
    apply_map,
    bias_of,
    check_dense_inputs,
    device_guard,
    empty_solve_outputs,
    fake_penalty_outputs,
    jacobian_penalty_block,
    load_rows,
    matmul,
    not_iterated_residual,
    product_options,
    record_step,
    register_prologue,
    relative_residual,
    scratch_map_block,
    scratch_prologue,
    squared_norms,
    store_rows,
)


REGISTER_WIDTH = TRITON_DENSE_ANDERSON_REGISTER_WIDTH  # the widest rows the register kernel holds
# The scratch kernel's warps: with 4, its float64 Gram solve and unrolled history loads spilled 360-770 bytes per thread
# at d = 100 (ptxas, sm_90); with 8, nothing spills at any width checked (bench/results/compile_check_sm90.md).
SCRATCH_WARPS = 8
# A history of this many elements or more is indexed in int64 (int32 products of slot and B * d would overflow).
WIDE_HISTORY_ELEMENTS = 2**31


def _num_warps(block_d: int) -> int:
    """4 warps up to BLOCK_D = 32; 8 at 64, where 4 warps spill in the adjoint (compile check for sm_90)."""
    return 4 if block_d <= 32 else 8


@triton.jit
def with_gram_row(H, gram_row, slot, o_m):
    """H (BLOCK_B, MP, MP) with row and column `slot` replaced by gram_row (BLOCK_B, MP): <g_slot, g_j>."""
    H = tl.where(o_m[None, :, None] == slot, gram_row[:, None, :], H)
    return tl.where(o_m[None, None, :] == slot, gram_row[:, :, None], H)


@triton.jit
def _anderson_kernel(
    # pointers
    W_ptr, c_ptr, z_ptr, gz_ptr, out_ptr, iters_ptr, res_ptr, conv_ptr, hist_ptr, rn_ptr, colsum_ptr,
    # sizes and scalars
    B, D, m, beta: tl.float64, lam: tl.float64, tol: tl.float64, max_iter,
    # strides; (stride_w_out, stride_w_in) are those of the iteration operator M: W's, or W^T's in the adjoint
    stride_w_out, stride_w_in, stride_c_b, stride_c_d, stride_z_b, stride_z_d, stride_gz_b, stride_gz_d,
    stride_o_b, stride_o_d, stride_h_kind, stride_h_slot, stride_h_b,
    # meta-parameters
    ACTIVATION: tl.constexpr, ADJOINT: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MP: tl.constexpr, WIDE_HISTORY: tl.constexpr, PENALTY: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward: z0 = z_ptr, bias c. Adjoint: z_ptr holds the fixed point z, bias grad_z, x0 = 0; PENALTY adds the
    Jacobian penalty's term to the result (common.jacobian_penalty_block)."""
    dtype = res_ptr.dtype.element_ty  # the accumulation dtype: the history's and every widened load's
    i_b = tl.program_id(0).to(tl.int64)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_bd = m_b[:, None] & m_d[None, :]
    o_m = tl.arange(0, MP)
    p_bias, stride_bias_b, stride_bias_d = bias_of(c_ptr, gz_ptr, stride_c_b, stride_c_d, stride_gz_b, stride_gz_d,
                                                   ADJOINT)
    b_mt, b_bias, b_s, b_x, active = register_prologue(
        W_ptr, p_bias, z_ptr, c_ptr, o_b, m_b, o_d, m_d, D, stride_w_out, stride_w_in, stride_bias_b, stride_bias_d,
        stride_z_b, stride_z_d, stride_c_b, stride_c_d, ACTIVATION, ADJOINT, USE_DOT, DOT_PRECISION)
    b_tol = tl.full([BLOCK_B], tol, dtype)
    b_beta = tl.full([BLOCK_B, BLOCK_D], beta, dtype)
    iters = tl.zeros([BLOCK_B], dtype=tl.int32)
    residual = not_iterated_residual(tl.zeros([BLOCK_B], dtype=dtype))
    H = tl.zeros([BLOCK_B, MP, MP], dtype=tl.float64)
    if WIDE_HISTORY:  # j * stride_h_slot = j * B * d passes 2^31: int64 (only then: it costs registers)
        stride_h_slot = tl.cast(stride_h_slot, tl.int64)
    p_hx = hist_ptr
    p_hg = hist_ptr + stride_h_kind
    k = tl.full([], 0, tl.int32)
    while (tl.max(active.to(tl.int32), axis=0) > 0) & (k < max_iter):
        k += 1
        slot = (k - 1) % m
        n = tl.minimum(k, m)
        b_t = apply_map(matmul(b_x, b_mt, USE_DOT, DOT_PRECISION), b_bias, b_s, m_bd, ACTIVATION, ADJOINT)
        b_g = b_t - b_x
        sq_g, sq_t = squared_norms(b_t, b_x)
        r = relative_residual(sq_g, sq_t).to(dtype)
        b_g64 = b_g.to(tl.float64)
        # The new row of the Gram matrix; older slots come from the scratch, this one from registers.
        gram_row = tl.zeros([BLOCK_B, MP], dtype=tl.float64)
        mixed = tl.zeros([BLOCK_B, BLOCK_D], dtype=dtype)
        for j in tl.static_range(MP):
            if j < n:
                # <g_slot, g_j> of the stored (rounded) g, summed in float64, as the reference's Gram matrix.
                if j == slot:
                    dot_j = tl.sum(b_g64 * b_g64, axis=1)
                else:
                    b_gj = load_rows(p_hg + j * stride_h_slot, o_b, o_d, m_b, m_d, stride_h_b, 1)
                    dot_j = tl.sum(b_g64 * b_gj.to(tl.float64), axis=1)
                gram_row = tl.where(o_m[None, :] == j, dot_j[:, None], gram_row)
        H = with_gram_row(H, gram_row, slot, o_m)
        a = anderson_weights(H, n, slot, lam, MP).to(dtype)
        for j in tl.static_range(MP):
            if j < n:
                a_j = tl.sum(tl.where(o_m[None, :] == j, a, 0.0), axis=1)
                if j == slot:
                    b_pair = b_x + b_beta * b_g
                else:
                    b_xj = load_rows(p_hx + j * stride_h_slot, o_b, o_d, m_b, m_d, stride_h_b, 1)
                    b_gj = load_rows(p_hg + j * stride_h_slot, o_b, o_d, m_b, m_d, stride_h_b, 1)
                    b_pair = b_xj + b_beta * b_gj
                mixed += a_j[:, None] * b_pair
        # Every thread has read the older slots: now this step's pair may overwrite its slot.
        tl.debug_barrier()
        store_rows(p_hx + slot * stride_h_slot, b_x, o_b, o_d, m_b, m_d, stride_h_b, 1)
        store_rows(p_hg + slot * stride_h_slot, b_g, o_b, o_d, m_b, m_d, stride_h_b, 1)
        b_x = tl.where(active[:, None], tl.where(m_bd, mixed, 0.0), b_x)
        residual, iters, active = record_step(active, r, residual, iters, k, b_tol)
        # The next iteration reads what this one wrote, from other threads of the program.
        tl.debug_barrier()
    if PENALTY:
        b_x += jacobian_penalty_block(W_ptr, z_ptr, c_ptr, rn_ptr, colsum_ptr, o_b, m_b, 0, D, stride_w_out,
                                      stride_w_in, stride_z_b, stride_z_d, stride_c_b, stride_c_d,
                                      ACTIVATION, USE_DOT, DOT_PRECISION, BLOCK_B, BLOCK_D, BLOCK_D)
    store_rows(out_ptr, b_x, o_b, o_d, m_b, m_d, stride_o_b, stride_o_d)
    tl.store(iters_ptr + o_b, iters, mask=m_b)
    tl.store(res_ptr + o_b, residual, mask=m_b)
    tl.store(conv_ptr + o_b, (residual <= b_tol).to(tl.uint8), mask=m_b)


@triton.jit
def _anderson_scratch_kernel(
    # pointers; scratch: (2, B, d) the iterate and, in the adjoint, s
    W_ptr, c_ptr, z_ptr, gz_ptr, out_ptr, iters_ptr, res_ptr, conv_ptr, hist_ptr, rn_ptr, colsum_ptr, scratch_ptr,
    # sizes and scalars
    B, D, m, beta: tl.float64, lam: tl.float64, tol: tl.float64, max_iter,
    # strides, as _anderson_kernel's, plus the scratch's (its columns are contiguous)
    stride_w_out, stride_w_in, stride_c_b, stride_c_d, stride_z_b, stride_z_d, stride_gz_b, stride_gz_d,
    stride_o_b, stride_o_d, stride_h_kind, stride_h_slot, stride_h_b, stride_s_buf, stride_s_b,
    # meta-parameters
    ACTIVATION: tl.constexpr, ADJOINT: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MP: tl.constexpr, WIDE_HISTORY: tl.constexpr, PENALTY: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The same solve as _anderson_kernel for rows of any width, column block by column block (module docstring)."""
    dtype = res_ptr.dtype.element_ty  # the accumulation dtype: the scratch's, the history's, every widened load's
    i_b = tl.program_id(0).to(tl.int64)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    o_m = tl.arange(0, MP)
    p_x = scratch_ptr
    p_s = scratch_ptr + stride_s_buf
    p_bias, stride_bias_b, stride_bias_d = bias_of(c_ptr, gz_ptr, stride_c_b, stride_c_d, stride_gz_b, stride_gz_d,
                                                   ADJOINT)
    active = scratch_prologue(W_ptr, z_ptr, c_ptr, gz_ptr, p_x, p_s, stride_s_b, o_b, m_b, D, stride_w_out,
                              stride_w_in, stride_c_b, stride_c_d, stride_z_b, stride_z_d, stride_gz_b, stride_gz_d,
                              ACTIVATION, ADJOINT, USE_DOT, DOT_PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
    tl.debug_barrier()
    b_tol = tl.full([BLOCK_B], tol, dtype)
    b_beta = tl.full([BLOCK_B, BLOCK_N], beta, dtype)
    iters = tl.zeros([BLOCK_B], dtype=tl.int32)
    residual = not_iterated_residual(tl.zeros([BLOCK_B], dtype=dtype))
    H = tl.zeros([BLOCK_B, MP, MP], dtype=tl.float64)
    if WIDE_HISTORY:  # j * stride_h_slot = j * B * d passes 2^31: int64 (only then: it costs registers)
        stride_h_slot = tl.cast(stride_h_slot, tl.int64)
    p_hx = hist_ptr
    p_hg = hist_ptr + stride_h_kind
    k = tl.full([], 0, tl.int32)
    while (tl.max(active.to(tl.int32), axis=0) > 0) & (k < max_iter):
        k += 1
        slot = (k - 1) % m
        n = tl.minimum(k, m)
        # Pass 1: T(x), g = T(x) - x and the pair stored in its slot, block by block; the norms and the new Gram
        # row summed over the blocks (older slots are read, never the one being written).
        sq_g = tl.zeros([BLOCK_B], dtype=tl.float64)
        sq_t = tl.zeros([BLOCK_B], dtype=tl.float64)
        gram_row = tl.zeros([BLOCK_B, MP], dtype=tl.float64)
        for n0 in range(0, D, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < D
            b_t, b_x = scratch_map_block(p_x, p_s, p_bias, stride_s_b, stride_bias_b, stride_bias_d, o_b, m_b, n0,
                                         W_ptr, D, stride_w_out, stride_w_in, ACTIVATION, ADJOINT, USE_DOT,
                                         DOT_PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
            b_g = b_t - b_x
            block_g, block_t = squared_norms(b_t, b_x)
            sq_g += block_g
            sq_t += block_t
            b_g64 = b_g.to(tl.float64)
            for j in tl.static_range(MP):
                if j < n:
                    if j == slot:
                        dot_j = tl.sum(b_g64 * b_g64, axis=1)
                    else:
                        b_gj = load_rows(p_hg + j * stride_h_slot, o_b, o_n, m_b, m_n, stride_h_b, 1)
                        dot_j = tl.sum(b_g64 * b_gj.to(tl.float64), axis=1)
                    gram_row = tl.where(o_m[None, :] == j, gram_row + dot_j[:, None], gram_row)
            store_rows(p_hx + slot * stride_h_slot, b_x, o_b, o_n, m_b, m_n, stride_h_b, 1)
            store_rows(p_hg + slot * stride_h_slot, b_g, o_b, o_n, m_b, m_n, stride_h_b, 1)
        r = relative_residual(sq_g, sq_t).to(dtype)
        H = with_gram_row(H, gram_row, slot, o_m)
        a = anderson_weights(H, n, slot, lam, MP).to(dtype)
        # Every thread has read x for its products and stored its part of the new pair.
        tl.debug_barrier()
        # Pass 2: x <- sum_j a_j (x_j + beta g_j) for the active rows (a frozen row keeps x).
        for n0 in range(0, D, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < D
            mixed = tl.zeros([BLOCK_B, BLOCK_N], dtype=dtype)
            for j in tl.static_range(MP):
                if j < n:
                    a_j = tl.sum(tl.where(o_m[None, :] == j, a, 0.0), axis=1)
                    b_xj = load_rows(p_hx + j * stride_h_slot, o_b, o_n, m_b, m_n, stride_h_b, 1)
                    b_gj = load_rows(p_hg + j * stride_h_slot, o_b, o_n, m_b, m_n, stride_h_b, 1)
                    mixed += a_j[:, None] * (b_xj + b_beta * b_gj)
            b_x = load_rows(p_x, o_b, o_n, m_b, m_n, stride_s_b, 1)
            b_x = tl.where(active[:, None], tl.where(m_n[None, :], mixed, 0.0), b_x)
            store_rows(p_x, b_x, o_b, o_n, m_b, m_n, stride_s_b, 1)
        residual, iters, active = record_step(active, r, residual, iters, k, b_tol)
        # The next iteration reads what this one wrote, from other threads of the program.
        tl.debug_barrier()
    for n0 in range(0, D, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < D
        b_x = load_rows(p_x, o_b, o_n, m_b, m_n, stride_s_b, 1)
        if PENALTY:
            b_x += jacobian_penalty_block(W_ptr, z_ptr, c_ptr, rn_ptr, colsum_ptr, o_b, m_b, n0, D, stride_w_out,
                                          stride_w_in, stride_z_b, stride_z_d, stride_c_b, stride_c_d,
                                          ACTIVATION, USE_DOT, DOT_PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
        store_rows(out_ptr, b_x, o_b, o_n, m_b, m_n, stride_o_b, stride_o_d)
    tl.store(iters_ptr + o_b, iters, mask=m_b)
    tl.store(res_ptr + o_b, residual, mask=m_b)
    tl.store(conv_ptr + o_b, (residual <= b_tol).to(tl.uint8), mask=m_b)


def launch(W, c, z, grad_z, activation, m, beta, lam, tol, max_iter, adjoint: bool, in_registers=None,
           blocks=None, jacobian_penalty: float = 0.0):
    """Runs one solve (the forward, or the adjoint with grad_z): rows of d <= REGISTER_WIDTH in registers, wider ones
    through the scratch kernel. Tests set in_registers=False (and blocks, as SCRATCH_BLOCKS) to reach the scratch
    kernel at small d. The adjoint returns the op's six outputs (with jacobian_penalty's), the forward four."""
    act_id = get_activation(activation).id
    check_dense_inputs(W, (c, z) if grad_z is None else (c, z, grad_z))
    torch._check(1 <= m <= ANDERSON_MAX_HISTORY, lambda: f"m must be in [1, {ANDERSON_MAX_HISTORY}], got {m}")
    torch._check(0 < beta <= 1, lambda: f"beta must be in (0, 1], got {beta}")
    torch._check(lam >= 0, lambda: f"lam must be >= 0, got {lam}")
    W, c, z = W.contiguous(), c.contiguous(), z.contiguous()
    grad_z = c if grad_z is None else grad_z.contiguous()
    out, iters, residual, converged = empty_solve_outputs(z)
    outputs = (out, iters, residual, converged)
    batch, d = z.shape
    compute = accumulation_dtype(W.dtype)  # float16/bfloat16 data is widened on load: the solve runs in float32
    if in_registers is None:
        in_registers = d <= REGISTER_WIDTH
    block_d = max(16, triton.next_power_of_2(d))
    block_b = 16 if compute == torch.float32 else max(1, min(16, 8192 // block_d**2))
    block = dict(SCRATCH_BLOCKS, **(blocks or {}))
    programs = triton.cdiv(batch, block_b if in_registers else block["BLOCK_B"])
    penalty = JacobianPenalty(W, batch, programs, jacobian_penalty, compute)
    if batch == 0:
        return (*outputs, *penalty.outputs(W)) if adjoint else outputs
    mp = triton.next_power_of_2(m)
    hist = z.new_empty((2, m, batch, d), dtype=compute)
    stride_out, stride_in = (W.stride(1), W.stride(0)) if adjoint else (W.stride(0), W.stride(1))
    row_norms, column_sums = penalty.kernel_args()
    common_args = (batch, d, int(m), float(beta), float(lam), float(tol), int(max_iter), stride_out, stride_in,
                   c.stride(0), c.stride(1), z.stride(0), z.stride(1), grad_z.stride(0), grad_z.stride(1),
                   out.stride(0), out.stride(1), hist.stride(0), hist.stride(1), hist.stride(2))
    meta = dict(ACTIVATION=act_id, ADJOINT=adjoint, **product_options(compute), MP=mp,
                WIDE_HISTORY=hist.numel() >= WIDE_HISTORY_ELEMENTS, PENALTY=penalty.enabled)
    with device_guard(z):
        if in_registers:
            _anderson_kernel[(programs,)](
                W, c, z, grad_z, out, iters, residual, converged.view(torch.uint8), hist, row_norms, column_sums,
                *common_args, **meta, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=_num_warps(block_d))
        else:
            scratch = z.new_empty((2, batch, d), dtype=compute)
            torch._check(not meta["USE_DOT"] or min(block["BLOCK_B"], block["BLOCK_N"], block["BLOCK_K"]) >= 16,
                         lambda: f"tl.dot needs blocks of at least 16, got {block}")
            _anderson_scratch_kernel[(programs,)](
                W, c, z, grad_z, out, iters, residual, converged.view(torch.uint8), hist, row_norms, column_sums,
                scratch, *common_args, scratch.stride(0), scratch.stride(1), **meta, **block,
                num_warps=SCRATCH_WARPS)
    return (*outputs, *penalty.outputs(W)) if adjoint else outputs


@torch.library.custom_op("deqkern::fixed_point_dense_anderson_triton", mutates_args=())
def _anderson_op(W: Tensor, c: Tensor, z0: Tensor, activation: str, m: int, beta: float, lam: float, tol: float,
                 max_iter: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return launch(W, c, z0, None, activation, m, beta, lam, tol, max_iter, adjoint=False)


@_anderson_op.register_fake
def _(W, c, z0, activation, m, beta, lam, tol, max_iter):
    check_dense_inputs(W, (c, z0))
    return empty_solve_outputs(z0)


@torch.library.custom_op("deqkern::fixed_point_dense_anderson_backward_triton", mutates_args=())
def _anderson_backward_op(W: Tensor, c: Tensor, z: Tensor, grad_z: Tensor, activation: str, m: int, beta: float,
                          lam: float, tol: float, max_iter: int, jacobian_penalty: float = 0.0
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launch(W, c, z, grad_z, activation, m, beta, lam, tol, max_iter, adjoint=True,
                  jacobian_penalty=jacobian_penalty)


@_anderson_backward_op.register_fake
def _(W, c, z, grad_z, activation, m, beta, lam, tol, max_iter, jacobian_penalty=0.0):
    check_dense_inputs(W, (c, z, grad_z))
    return (*empty_solve_outputs(z), *fake_penalty_outputs(W, c, jacobian_penalty))


def fixed_point_dense_anderson_triton(W: Tensor, c: Tensor, z0: Tensor, activation: str, m: int, beta: float,
                                      lam: float, tol: float, max_iter: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fixed point of z = act(z W^T + c) by Anderson. W: (d, d), c, z0: (batch, d).

    Returns (z (batch, d), iterations int32 (batch,), residual (batch,), converged bool (batch,)).
    """
    return torch.ops.deqkern.fixed_point_dense_anderson_triton(W, c, z0, activation, m, beta, lam, tol, max_iter)


def fixed_point_dense_anderson_backward_triton(W: Tensor, c: Tensor, z: Tensor, grad_z: Tensor, activation: str,
                                               m: int, beta: float, lam: float, tol: float, max_iter: int,
                                               jacobian_penalty: float = 0.0
                                               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Solves grad_u = s * (grad_u W + grad_z), s = act'(z W^T + c), from 0 by Anderson, with the Jacobian penalty
    of weight jacobian_penalty. Shapes and outputs as fixed_point_dense_backward_triton's."""
    return torch.ops.deqkern.fixed_point_dense_anderson_backward_triton(W, c, z, grad_z, activation, m, beta, lam,
                                                                        tol, max_iter, jacobian_penalty)

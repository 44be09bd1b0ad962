"""Dense fixed-point solve z = act(z W^T + c) and its implicit backward: one Triton launch per solve.

Semantics: deqkern/reference/fixed_point_dense.py (fixed_point_dense_ref, fixed_point_dense_backward_ref). One kernel serves both
solves; it iterates x <- (1 - alpha) x + alpha T(x) with
    forward:  T(x) = act(x W^T + c),               x0 = z0,
    adjoint:  T(h) = s * (h W + grad_z),           h0 = 0,   s = act'(z W^T + c) computed once,
so both are x <- T(x) with a matvec against M = W (forward) or M = W^T (adjoint, passed as swapped strides). With the
Jacobian penalty (PENALTY), the adjoint's epilogue adds its term to the result (common.jacobian_penalty_block, which
forms z W^T + c once more: one product per program, next to the solve's one per iteration).

Each program owns BLOCK_B rows and all d columns and runs every iteration itself: a `while` loop stops when no row
of its tile is active, stopped rows are frozen by masks, and nothing returns to the host until the solve is done.
- IN_REGISTERS (small d): the iterate, the bias, s and the operator tile stay in registers for the whole solve.
- otherwise: the iterate lives in a launcher-allocated scratch (2 ping-pong buffers, plus one for s in the adjoint)
  and each iteration loops over BLOCK_N output columns x BLOCK_K input columns; a barrier separates the writes of
  one iteration from the reads of the next. Any d works (scratch is 2-3 x B x d elements).
Non-finite inputs are flagged by the kernel itself: a row with a NaN/Inf in its c, z0 / z or grad_z, or every row
when W has one, starts inactive, so it is never iterated (x stays its start, iterations 0, residual NaN).
Products (common.product_options): float32 with tl.dot, exact (input_precision="ieee") by default so results match
the reference to ~1e-5, TF32 tensor cores when torch.get_float32_matmul_precision() allows them; float64 with a
broadcast multiply-and-sum, because fp64 tl.dot is not supported by every Triton version.
float16 and bfloat16 inputs are read as they are and widened on load: the solve runs in float32 (the scratch, the
products and the residual), and only the result is rounded back to the input dtype.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from deqkern.activations import get_activation
from deqkern.core.dtypes import HALF_DTYPES, accumulation_dtype

from .common import (
    INTERPRET,
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


# ----------------------------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _fixed_point_dense_kernel(
    # pointers
    W_ptr, c_ptr, z_ptr, gz_ptr, out_ptr, iters_ptr, res_ptr, conv_ptr, scratch_ptr, rn_ptr, colsum_ptr,
    # sizes and scalars (alpha, 1 - alpha and tol as fp64 so that float64 solves see the caller's exact values)
    B, D, alpha: tl.float64, one_minus_alpha: tl.float64, tol: tl.float64, max_iter,
    # strides; (stride_w_out, stride_w_in) are those of the iteration operator M: W's, or W^T's in the adjoint
    stride_w_out, stride_w_in, stride_c_b, stride_c_d, stride_z_b, stride_z_d, stride_gz_b, stride_gz_d,
    stride_o_b, stride_o_d, stride_s_buf, stride_s_b,
    # meta-parameters
    ACTIVATION: tl.constexpr, ADJOINT: tl.constexpr, IN_REGISTERS: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PENALTY: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward: z0 = z_ptr, bias c. Adjoint: z_ptr holds the fixed point z, bias grad_z, x0 = 0; PENALTY adds the
    Jacobian penalty's term to the result (common.jacobian_penalty_block)."""
    dtype = res_ptr.dtype.element_ty  # the accumulation dtype: the scratch's and every widened load's
    i_b = tl.program_id(0).to(tl.int64)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    p_bias, stride_bias_b, stride_bias_d = bias_of(c_ptr, gz_ptr, stride_c_b, stride_c_d, stride_gz_b, stride_gz_d,
                                                   ADJOINT)
    b_alpha = tl.full([BLOCK_B, BLOCK_N], alpha, dtype)
    b_one_minus_alpha = tl.full([BLOCK_B, BLOCK_N], one_minus_alpha, dtype)
    b_tol = tl.full([BLOCK_B], tol, dtype)

    iters = tl.zeros([BLOCK_B], dtype=tl.int32)
    residual = not_iterated_residual(tl.zeros([BLOCK_B], dtype=dtype))  # kept by rows that are never iterated
    k = tl.full([], 0, tl.int32)

    if IN_REGISTERS:
        # BLOCK_N == BLOCK_K >= D: one tile holds whole rows.
        o_d = tl.arange(0, BLOCK_N)
        m_d = o_d < D
        m_bd = m_b[:, None] & m_d[None, :]
        b_mt, b_bias, b_s, b_x, active = register_prologue(
            W_ptr, p_bias, z_ptr, c_ptr, o_b, m_b, o_d, m_d, D, stride_w_out, stride_w_in, stride_bias_b,
            stride_bias_d, stride_z_b, stride_z_d, stride_c_b, stride_c_d, ACTIVATION, ADJOINT, USE_DOT,
            DOT_PRECISION)
        while (tl.max(active.to(tl.int32), axis=0) > 0) & (k < max_iter):
            k += 1
            b_t = apply_map(matmul(b_x, b_mt, USE_DOT, DOT_PRECISION), b_bias, b_s, m_bd, ACTIVATION, ADJOINT)
            sq_diff, sq_t = squared_norms(b_t, b_x)
            r = relative_residual(sq_diff, sq_t).to(dtype)
            b_x = tl.where(active[:, None], b_one_minus_alpha * b_x + b_alpha * b_t, b_x)
            residual, iters, active = record_step(active, r, residual, iters, k, b_tol)
        if PENALTY:
            b_x += jacobian_penalty_block(W_ptr, z_ptr, c_ptr, rn_ptr, colsum_ptr, o_b, m_b, 0, D, stride_w_out,
                                          stride_w_in, stride_z_b, stride_z_d, stride_c_b, stride_c_d,
                                          ACTIVATION, USE_DOT, DOT_PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
        store_rows(out_ptr, b_x, o_b, o_d, m_b, m_d, stride_o_b, stride_o_d)
    else:
        # Scratch: buffers 0 and 1 hold the iterate (ping-pong), buffer 2 holds s in the adjoint.
        p_s = scratch_ptr + 2 * stride_s_buf
        active = scratch_prologue(W_ptr, z_ptr, c_ptr, gz_ptr, scratch_ptr, p_s, stride_s_b, o_b, m_b, D, stride_w_out,
                                  stride_w_in, stride_c_b, stride_c_d, stride_z_b, stride_z_d, stride_gz_b, stride_gz_d,
                                  ACTIVATION, ADJOINT, USE_DOT, DOT_PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
        tl.debug_barrier()
        while (tl.max(active.to(tl.int32), axis=0) > 0) & (k < max_iter):
            k += 1
            p_src = scratch_ptr + ((k - 1) % 2).to(tl.int64) * stride_s_buf
            p_dst = scratch_ptr + (k % 2).to(tl.int64) * stride_s_buf
            sq_diff = tl.zeros([BLOCK_B], dtype=tl.float64)
            sq_t = tl.zeros([BLOCK_B], dtype=tl.float64)
            for n0 in range(0, D, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_n = o_n < D
                b_t, b_x = scratch_map_block(p_src, p_s, p_bias, stride_s_b, stride_bias_b, stride_bias_d, o_b, m_b,
                                             n0, W_ptr, D, stride_w_out, stride_w_in, ACTIVATION, ADJOINT, USE_DOT,
                                             DOT_PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
                block_diff, block_t = squared_norms(b_t, b_x)
                sq_diff += block_diff
                sq_t += block_t
                # Frozen rows are copied too: the next iteration reads the other buffer.
                b_x = tl.where(active[:, None], b_one_minus_alpha * b_x + b_alpha * b_t, b_x)
                store_rows(p_dst, b_x, o_b, o_n, m_b, m_n, stride_s_b, 1)
            r = relative_residual(sq_diff, sq_t).to(dtype)
            residual, iters, active = record_step(active, r, residual, iters, k, b_tol)
            # The next iteration reads what this one wrote, from other threads of the program.
            tl.debug_barrier()
        p_last = scratch_ptr + (k % 2).to(tl.int64) * stride_s_buf
        for n0 in range(0, D, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < D
            b_x = load_rows(p_last, o_b, o_n, m_b, m_n, stride_s_b, 1)
            if PENALTY:
                b_x += jacobian_penalty_block(W_ptr, z_ptr, c_ptr, rn_ptr, colsum_ptr, o_b, m_b, n0, D, stride_w_out,
                                              stride_w_in, stride_z_b, stride_z_d, stride_c_b, stride_c_d,
                                              ACTIVATION, USE_DOT, DOT_PRECISION, BLOCK_B, BLOCK_N,
                                              BLOCK_K)
            store_rows(out_ptr, b_x, o_b, o_n, m_b, m_n, stride_o_b, stride_o_d)

    tl.store(iters_ptr + o_b, iters, mask=m_b)
    tl.store(res_ptr + o_b, residual, mask=m_b)
    tl.store(conv_ptr + o_b, (residual <= b_tol).to(tl.uint8), mask=m_b)


if INTERPRET:
    _kernel = _fixed_point_dense_kernel
else:
    # Block sizes come from _default_config; only the warp count is tuned. The kernel reads its inputs and
    # rewrites its outputs and scratch from scratch, so the tuning runs leave no trace.
    _kernel = triton.autotune(
        configs=[triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)],
        key=["D", "ACTIVATION", "ADJOINT", "IN_REGISTERS", "DOT_PRECISION", "PENALTY", "BLOCK_B", "BLOCK_N",
             "BLOCK_K"],
    )(_fixed_point_dense_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
def _default_config(dtype: torch.dtype, d: int) -> dict:
    """Block sizes for data of `dtype`: whole rows in registers for small d, column blocks over a scratch buffer
    otherwise."""
    block_d = max(16, triton.next_power_of_2(d))
    # float32: tl.dot needs every dimension >= 16; beyond 64 the operator tile held across the loop spills (ptxas,
    # sm_90). Half data (solved in float32) keeps its tiles beside their widened copies: at 64 the adjoint spilled
    # about 1 KB with 4 warps, so it holds rows of at most 32. float64 multiplies through a (BLOCK_B, BLOCK_K, BLOCK_N)
    # product: keep it at <= 8192 elements.
    if dtype == torch.float32 and block_d <= 64 or dtype in HALF_DTYPES and block_d <= 32:
        return dict(IN_REGISTERS=True, BLOCK_B=16, BLOCK_N=block_d, BLOCK_K=block_d)
    if dtype == torch.float64 and block_d <= 32:
        return dict(IN_REGISTERS=True, BLOCK_B=min(32, 8192 // block_d**2), BLOCK_N=block_d, BLOCK_K=block_d)
    return dict(IN_REGISTERS=False, **SCRATCH_BLOCKS)


def launch(W, c, z, grad_z, activation, alpha, tol, max_iter, adjoint: bool, config: Optional[dict] = None,
           jacobian_penalty: float = 0.0):
    """Runs one solve; `config` overrides _default_config (tests use it to reach the scratch path). The adjoint
    returns the op's six outputs (with jacobian_penalty's), the forward four."""
    act_id = get_activation(activation).id
    check_dense_inputs(W, (c, z) if grad_z is None else (c, z, grad_z))
    W, c, z = W.contiguous(), c.contiguous(), z.contiguous()
    grad_z = c if grad_z is None else grad_z.contiguous()  # unused by the forward kernel
    out, iters, residual, converged = empty_solve_outputs(z)
    batch, d = z.shape
    compute = accumulation_dtype(W.dtype)
    cfg = dict(_default_config(W.dtype, d), **(config or {}))
    grid = (triton.cdiv(batch, cfg["BLOCK_B"]),)
    penalty = JacobianPenalty(W, batch, grid[0], jacobian_penalty, compute)
    outputs = (out, iters, residual, converged)
    if batch == 0:
        return (*outputs, *penalty.outputs(W)) if adjoint else outputs
    products = product_options(compute)
    torch._check(not products["USE_DOT"] or min(cfg["BLOCK_B"], cfg["BLOCK_N"], cfg["BLOCK_K"]) >= 16,
                 lambda: f"tl.dot needs blocks of at least 16, got {cfg}")
    if cfg["IN_REGISTERS"]:
        torch._check(cfg["BLOCK_N"] >= d and cfg["BLOCK_K"] == cfg["BLOCK_N"], lambda: f"bad config {cfg}")
        scratch = out  # not read
    else:
        scratch = z.new_empty((3 if adjoint else 2, batch, d), dtype=compute)
    # M = W in the forward, W^T in the adjoint: the transpose is only a swap of strides.
    stride_out, stride_in = (W.stride(1), W.stride(0)) if adjoint else (W.stride(0), W.stride(1))
    row_norms, column_sums = penalty.kernel_args()
    with device_guard(z):
        _kernel[grid](
            W, c, z, grad_z, out, iters, residual, converged.view(torch.uint8), scratch, row_norms, column_sums,
            batch, d, float(alpha), 1.0 - float(alpha), float(tol), int(max_iter),
            stride_out, stride_in, c.stride(0), c.stride(1), z.stride(0), z.stride(1),
            grad_z.stride(0), grad_z.stride(1), out.stride(0), out.stride(1),
            scratch.stride(0) if scratch.dim() == 3 else 0, scratch.stride(-2),
            ACTIVATION=act_id, ADJOINT=adjoint, PENALTY=penalty.enabled, **products, **cfg,
        )
    return (*outputs, *penalty.outputs(W)) if adjoint else outputs


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; fake kernels give the output metadata)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("deqkern::fixed_point_dense_triton", mutates_args=())
def _fixed_point_dense_op(W: Tensor, c: Tensor, z0: Tensor, activation: str, alpha: float, tol: float,
                          max_iter: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return launch(W, c, z0, None, activation, alpha, tol, max_iter, adjoint=False)


@_fixed_point_dense_op.register_fake
def _(W, c, z0, activation, alpha, tol, max_iter):
    check_dense_inputs(W, (c, z0))
    return empty_solve_outputs(z0)


@torch.library.custom_op("deqkern::fixed_point_dense_backward_triton", mutates_args=())
def _fixed_point_dense_backward_op(W: Tensor, c: Tensor, z: Tensor, grad_z: Tensor, activation: str, alpha: float,
                                   tol: float, max_iter: int, jacobian_penalty: float = 0.0
                                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launch(W, c, z, grad_z, activation, alpha, tol, max_iter, adjoint=True, jacobian_penalty=jacobian_penalty)


@_fixed_point_dense_backward_op.register_fake
def _(W, c, z, grad_z, activation, alpha, tol, max_iter, jacobian_penalty=0.0):
    check_dense_inputs(W, (c, z, grad_z))
    return (*empty_solve_outputs(z), *fake_penalty_outputs(W, c, jacobian_penalty))


def fixed_point_dense_triton(W: Tensor, c: Tensor, z0: Tensor, activation: str, alpha: float, tol: float,
                             max_iter: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fixed point of z = act(z W^T + c). W: (d, d), c, z0: (batch, d).

    Returns (z (batch, d), iterations int32 (batch,), residual (batch,), converged bool (batch,)).
    """
    return torch.ops.deqkern.fixed_point_dense_triton(W, c, z0, activation, alpha, tol, max_iter)


def fixed_point_dense_backward_triton(W: Tensor, c: Tensor, z: Tensor, grad_z: Tensor, activation: str,
                                      alpha: float, tol: float, max_iter: int, jacobian_penalty: float = 0.0
                                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Solves grad_u = s * (grad_u W + grad_z), s = act'(z W^T + c), from 0, with the Jacobian penalty of weight
    jacobian_penalty. Shapes as the forward.

    Returns (grad_u (batch, d), iterations int32 (batch,), residual (batch,), converged bool (batch,), the penalty's
    row term (d,) and value (0-dim), or (0,) each without one).
    """
    return torch.ops.deqkern.fixed_point_dense_backward_triton(W, c, z, grad_z, activation, alpha, tol, max_iter,
                                                               jacobian_penalty)

"""What every deqkern Triton kernel shares: the residual eps, row loads and stores, the finiteness tests, the
per-sample contract (deqkern/reference/common.py states it; csrc/common/stop_rule.h is the C++ twin), the pieces of
the dense solves (operator tiles, the prologue, the map T) and the device guard of the launchers.

Inside kernels: p_ pointers, b_ register blocks, m_ masks, o_ offsets; compile-time switches are UPPER_CASE.
"""
import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from deqkern.core.constants import RESIDUAL_EPS
from deqkern.core.dtypes import SOLVE_DTYPES

from .activations import activation_derivative, activation_derivatives, apply_activation

# TRITON_INTERPRET is read when the kernels are decorated: the launchers skip autotuning under the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EPS: tl.constexpr = tl.constexpr(RESIDUAL_EPS)
INF: tl.constexpr = tl.constexpr(float("inf"))


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (otherwise the kernel runs on cuda:0)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- rows and finiteness
@triton.jit
def widen(b):
    """b in its accumulation dtype (deqkern/core/dtypes.py): float16 and bfloat16 tiles become float32, float32 and
    float64 ones are b itself. (A compile-time branch: only one side is ever compiled.)"""
    if b.dtype.is_fp16() or b.dtype.is_bf16():
        wide = b.to(tl.float32)
    else:
        wide = b
    return wide


@triton.jit
def load_rows(p_base, o_b, o_d, m_b, m_d, stride_b, stride_d):
    """Tile x[o_b, o_d] of a (B, d) tensor, 0 outside the masks, widened to the accumulation dtype."""
    p = p_base + o_b[:, None] * stride_b + o_d[None, :] * stride_d
    return widen(tl.load(p, mask=m_b[:, None] & m_d[None, :], other=0.0))


@triton.jit
def store_rows(p_base, value, o_b, o_d, m_b, m_d, stride_b, stride_d):
    p = p_base + o_b[:, None] * stride_b + o_d[None, :] * stride_d
    tl.store(p, value, mask=m_b[:, None] & m_d[None, :])


@triton.jit
def nonfinite_rows(b):
    """(BLOCK_B,) int32: 1 where the row of the tile b holds a NaN or an Inf, else 0 (|NaN| < inf is False)."""
    return tl.max(tl.where(tl.abs(b) < INF, 0, 1), axis=1)


@triton.jit
def any_nonfinite(b):
    """int32 scalar: 1 if the 2-D tile b holds a NaN or an Inf, else 0."""
    return tl.max(nonfinite_rows(b), axis=0)


# ---------------------------------------------------------------------------------------------- the per-sample contract
@triton.jit
def squared_norms(b_t, b_x):
    """(||t - x||^2, ||t||^2) per row of the tiles, summed in float64: no finite float32 row overflows them."""
    b_t64 = b_t.to(tl.float64)
    b_d64 = b_t64 - b_x.to(tl.float64)
    return tl.sum(b_d64 * b_d64, axis=1), tl.sum(b_t64 * b_t64, axis=1)


@triton.jit
def relative_residual(sq_diff, sq_t):
    """||T(x) - x|| / (||T(x)|| + eps) from float64 squared norms (sqrt and / correctly rounded); NaN where a squared
    norm is not finite (an overflow, or a non-finite entry), so an overflow is never read as success."""
    r = tl.sqrt(sq_diff) / (tl.sqrt(sq_t) + EPS)
    return tl.where((sq_diff < INF) & (sq_t < INF), r, not_iterated_residual(r))


@triton.jit
def not_iterated_residual(like):
    """NaN of like's shape and dtype. (No NaN global: Triton checks that a global keeps its value between the kernels
    that read it, by !=, and NaN != NaN fails that check when the kernel is compiled for a GPU.)"""
    return tl.zeros_like(like) + (INF - INF)


@triton.jit
def keeps_iterating(r, tol):
    """r > tol and finite (r >= 0, so r < inf also stops NaN)."""
    return (r > tol) & (r < INF)


@triton.jit
def record_step(active, r, residual, iters, k, tol):
    """After evaluation k: the active rows take r and k, and go on while keeps_iterating. Returns (residual, iters,
    active)."""
    residual = tl.where(active, r, residual)
    iters = tl.where(active, k, iters)
    return residual, iters, active & keeps_iterating(r, tol)


# ---------------------------------------------------------------------------------------------- dense solves
@triton.jit
def bias_of(c_ptr, gz_ptr, stride_c_b, stride_c_d, stride_gz_b, stride_gz_d, ADJOINT: tl.constexpr):
    """The bias of the map T and its strides: c (forward) or grad_z (adjoint)."""
    if ADJOINT:
        return gz_ptr, stride_gz_b, stride_gz_d
    else:
        return c_ptr, stride_c_b, stride_c_d


@triton.jit
def load_operator(W_ptr, o_k, o_n, D, stride_out, stride_in):
    """Tile (BLOCK_K, BLOCK_N) of M^T, i.e. M[o_n, o_k] transposed, so that x @ tile = (x M^T)[:, o_n]; widened to
    the accumulation dtype."""
    p = W_ptr + o_k[:, None] * stride_in + o_n[None, :] * stride_out
    return widen(tl.load(p, mask=(o_k[:, None] < D) & (o_n[None, :] < D), other=0.0))


def product_options(compute_dtype: torch.dtype) -> dict:
    """The constexprs of the dense solves' products, for a solve computing in `compute_dtype`: float32 (and widened
    half data) multiplies with tl.dot, exact ("ieee", the default) unless PyTorch's own switch allows TF32 for float32
    products (torch.set_float32_matmul_precision("high") or "medium", which torch.backends.cuda.matmul.allow_tf32 =
    True also sets): then "tf32", on tensor cores (about 3 decimal digits per product: use tol >= 1e-3). float64
    multiplies with a broadcast multiply-and-sum (fp64 tl.dot is not supported by every Triton version)."""
    use_dot = compute_dtype == torch.float32
    tf32 = use_dot and torch.get_float32_matmul_precision() != "highest"
    return dict(USE_DOT=use_dot, DOT_PRECISION="tf32" if tf32 else "ieee")


@triton.jit
def matmul(b_x, b_mt, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_B, K) @ (K, N) accumulated in the input dtype (product_options)."""
    if USE_DOT:
        return tl.dot(b_x, b_mt, input_precision=DOT_PRECISION)
    else:
        return tl.sum(b_x[:, :, None] * b_mt[None, :, :], axis=1)


@triton.jit
def register_prologue(W_ptr, p_bias, z_ptr, c_ptr, o_b, m_b, o_d, m_d, D, stride_w_out, stride_w_in, stride_bias_b,
                      stride_bias_d, stride_z_b, stride_z_d, stride_c_b, stride_c_d, ACTIVATION: tl.constexpr,
                      ADJOINT: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Start of a dense solve whose rows fit in one tile: the operator tile M^T, the bias rows, s (adjoint; the bias
    otherwise), the start x (z0, or 0 in the adjoint) and the active rows: valid batch rows whose inputs are all
    finite (the padding loads as 0), none at all if W (the whole of the tile) has a NaN or an Inf."""
    m_bd = m_b[:, None] & m_d[None, :]
    b_mt = load_operator(W_ptr, o_d, o_d, D, stride_w_out, stride_w_in)
    b_bias = load_rows(p_bias, o_b, o_d, m_b, m_d, stride_bias_b, stride_bias_d)
    b_z = load_rows(z_ptr, o_b, o_d, m_b, m_d, stride_z_b, stride_z_d)
    bad = tl.maximum(nonfinite_rows(b_bias), nonfinite_rows(b_z))
    if ADJOINT:
        # s = act'(z W^T + c): M^T = W, so the tile of W^T is read with the strides swapped back.
        b_u = matmul(b_z, load_operator(W_ptr, o_d, o_d, D, stride_w_in, stride_w_out), USE_DOT, DOT_PRECISION)
        b_c = load_rows(c_ptr, o_b, o_d, m_b, m_d, stride_c_b, stride_c_d)
        bad = tl.maximum(bad, nonfinite_rows(b_c))
        b_s = tl.where(m_bd, activation_derivative(b_u + b_c, ACTIVATION), 0.0)
        b_x = tl.zeros_like(b_z)
    else:
        b_s = b_bias
        b_x = b_z
    active = m_b & (bad == 0) & (any_nonfinite(b_mt) == 0)
    return b_mt, b_bias, b_s, b_x, active


# The column blocks of the dense solves whose iterate lives in a scratch buffer (rows too wide for registers): BLOCK_K
# = 32 spilled 44 bytes in the float32 Picard adjoint (bench/compile_check.py); 16 spills nothing. float64 multiplies
# through a (BLOCK_B, BLOCK_K, BLOCK_N) product of 8192 elements.
SCRATCH_BLOCKS = dict(BLOCK_B=16, BLOCK_N=32, BLOCK_K=16)


@triton.jit
def blocked_matvec(p_x, stride_x_b, stride_x_d, o_b, m_b, n0, W_ptr, D, stride_out, stride_in,
                   USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """(x M^T)[o_b, n0:n0+BLOCK_N] in the accumulation dtype, x read from global memory BLOCK_K columns at a time."""
    o_n = n0 + tl.arange(0, BLOCK_N)
    acc = widen(tl.zeros([BLOCK_B, BLOCK_N], dtype=W_ptr.dtype.element_ty))
    for k0 in range(0, D, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        b_x = load_rows(p_x, o_b, o_k, m_b, o_k < D, stride_x_b, stride_x_d)
        acc += matmul(b_x, load_operator(W_ptr, o_k, o_n, D, stride_out, stride_in), USE_DOT, DOT_PRECISION)
    return acc


@triton.jit
def scratch_map_block(p_x, p_s, p_bias, stride_x_b, stride_bias_b, stride_bias_d, o_b, m_b, n0, W_ptr, D,
                      stride_w_out, stride_w_in, ACTIVATION: tl.constexpr, ADJOINT: tl.constexpr,
                      USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Column block n0 of T(x) for an iterate in a scratch (scratch_prologue's layout): (T(x), x) tiles of the block,
    T(x) 0 in padded columns."""
    o_n = n0 + tl.arange(0, BLOCK_N)
    m_n = o_n < D
    acc = blocked_matvec(p_x, stride_x_b, 1, o_b, m_b, n0, W_ptr, D, stride_w_out, stride_w_in, USE_DOT,
                         DOT_PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
    b_bias = load_rows(p_bias, o_b, o_n, m_b, m_n, stride_bias_b, stride_bias_d)
    if ADJOINT:
        b_s = load_rows(p_s, o_b, o_n, m_b, m_n, stride_x_b, 1)
    else:
        b_s = b_bias
    b_t = apply_map(acc, b_bias, b_s, m_b[:, None] & m_n[None, :], ACTIVATION, ADJOINT)
    return b_t, load_rows(p_x, o_b, o_n, m_b, m_n, stride_x_b, 1)


@triton.jit
def scratch_prologue(W_ptr, z_ptr, c_ptr, gz_ptr, p_x, p_s, stride_x_b, o_b, m_b, D, stride_w_out, stride_w_in,
                     stride_c_b, stride_c_d, stride_z_b, stride_z_d, stride_gz_b, stride_gz_d,
                     ACTIVATION: tl.constexpr, ADJOINT: tl.constexpr, USE_DOT: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Start of a dense solve whose iterate lives in a scratch (rows p_x + b * stride_x_b, unit column stride, and
    s likewise at p_s): writes the start x (z0, or 0 in the adjoint) and, in the adjoint, s = act'(z W^T + c), column
    block by column block, and returns the active rows: valid batch rows whose c, z0 / z (and grad_z) rows are
    finite, none at all if W has a NaN or an Inf. The caller puts a barrier before reading the scratch back."""
    bad = tl.zeros([BLOCK_B], dtype=tl.int32)
    w_bad = tl.full([], 0, tl.int32)
    for n0 in range(0, D, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < D
        b_z = load_rows(z_ptr, o_b, o_n, m_b, m_n, stride_z_b, stride_z_d)
        b_c = load_rows(c_ptr, o_b, o_n, m_b, m_n, stride_c_b, stride_c_d)
        bad = tl.maximum(bad, tl.maximum(nonfinite_rows(b_z), nonfinite_rows(b_c)))
        for k0 in range(0, D, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            b_mt = load_operator(W_ptr, o_k, o_n, D, stride_w_out, stride_w_in)
            w_bad = tl.maximum(w_bad, any_nonfinite(b_mt))
        if ADJOINT:
            b_gz = load_rows(gz_ptr, o_b, o_n, m_b, m_n, stride_gz_b, stride_gz_d)
            bad = tl.maximum(bad, nonfinite_rows(b_gz))
            b_u = blocked_matvec(z_ptr, stride_z_b, stride_z_d, o_b, m_b, n0, W_ptr, D, stride_w_in, stride_w_out,
                                 USE_DOT, DOT_PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
            store_rows(p_s, activation_derivative(b_u + b_c, ACTIVATION), o_b, o_n, m_b, m_n, stride_x_b, 1)
            b_x = tl.zeros_like(b_z)
        else:
            b_x = b_z
        store_rows(p_x, b_x, o_b, o_n, m_b, m_n, stride_x_b, 1)
    return m_b & (bad == 0) & (w_bad == 0)


@triton.jit
def jacobian_penalty_block(W_ptr, z_ptr, c_ptr, rn_ptr, colsum_ptr, o_b, m_b, n0, D, stride_w_out, stride_w_in,
                           stride_z_b, stride_z_d, stride_c_b, stride_c_d, ACTIVATION: tl.constexpr,
                           USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Column block n0 of an adjoint's exact Jacobian penalty (with_jacobian_penalty in deqkern/reference/common.py),
    from u = z W^T + c ((stride_w_out, stride_w_in) are M = W^T's, as the adjoint's): returns the term
    act'(u) act''(u) (2 w / N) ||W_i||^2 of grad_u (rn_ptr: (2 w / N) ||W_i||^2, scaled by the launcher: a float64
    scale argument made Triton 3.8 cap the Anderson register kernel at 128 registers and spill; 0 outside the masks)
    and stores this program's sums of act'(u)^2 over its rows at colsum_ptr[program, n0:n0+BLOCK_N] (the launcher
    sums the programs: JacobianPenalty.outputs). A register solve passes n0 = 0 and its whole-row blocks."""
    o_n = n0 + tl.arange(0, BLOCK_N)
    m_n = o_n < D
    m_bd = m_b[:, None] & m_n[None, :]
    b_u = blocked_matvec(z_ptr, stride_z_b, stride_z_d, o_b, m_b, n0, W_ptr, D, stride_w_in, stride_w_out, USE_DOT,
                         DOT_PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
    b_s, b_second = activation_derivatives(b_u + load_rows(c_ptr, o_b, o_n, m_b, m_n, stride_c_b, stride_c_d),
                                           ACTIVATION)
    b_s = tl.where(m_bd, b_s, 0.0)
    tl.store(colsum_ptr + tl.program_id(0).to(tl.int64) * D + o_n, tl.sum(b_s * b_s, axis=0), mask=m_n)
    scaled_row_norms = tl.load(rn_ptr + o_n, mask=m_n, other=0.0)
    return tl.where(m_bd, b_s * b_second * scaled_row_norms[None, :], 0.0)


class JacobianPenalty:
    """The launcher's side of an adjoint's Jacobian penalty of weight w (0: none): the kernel arguments
    ((2 w / N) ||W_i||^2, per-program column sums) and, after the launch, the op's two penalty outputs (the C++ twin:
    DenseSolveTensors in csrc/common/params_from_tensors.h)."""

    def __init__(self, W, batch, programs, weight, compute_dtype):
        torch._check(math.isfinite(weight) and weight >= 0,
                     lambda: f"jacobian_penalty must be finite and >= 0, got {weight}")
        self.weight, self.numel = float(weight), max(batch * W.shape[0], 1)
        self.enabled = self.weight > 0
        if self.enabled:
            wide = W.to(compute_dtype)
            self.row_norms = (wide * wide).sum(dim=1)
            self.column_sums = W.new_empty((programs, W.shape[0]), dtype=compute_dtype)
        else:  # not read: a forward's or a penalty-free adjoint's launch does no penalty work
            self.row_norms = self.column_sums = W.new_empty(0, dtype=compute_dtype)
        self.scale = 2.0 * self.weight / self.numel
        self.scaled_row_norms = self.row_norms * self.scale if self.enabled else self.row_norms

    def kernel_args(self):
        """(the row norms scaled by 2 w / N, the column sums' buffer)."""
        return self.scaled_row_norms, self.column_sums

    def outputs(self, W):
        """(row term (d,) in W's dtype, value 0-dim in the accumulation dtype), or (0,) each without a penalty."""
        if not self.enabled:
            return W.new_empty(0), self.row_norms.new_empty(0)
        column = self.column_sums.sum(dim=0)
        return (column * self.scale).to(W.dtype), torch.dot(column, self.row_norms) / self.numel


@triton.jit
def apply_map(acc, b_bias, b_s, m_bd, ACTIVATION: tl.constexpr, ADJOINT: tl.constexpr):
    """T(x) from acc = x M^T: act(acc + c) or s * (acc + grad_z); 0 in padded columns."""
    if ADJOINT:
        t = b_s * (acc + b_bias)
    else:
        t = apply_activation(acc + b_bias, ACTIVATION)
    return tl.where(m_bd, t, 0.0)


def check_dense_inputs(W: torch.Tensor, rows) -> None:
    """W (d, d) of a solve dtype and the (batch, d) row tensors of one dtype and device (the ops' argument checks)."""
    torch._check(W.dim() == 2 and W.shape[0] == W.shape[1], lambda: f"W must be (d, d), got {tuple(W.shape)}")
    torch._check(W.dtype in SOLVE_DTYPES, lambda: f"unsupported dtype {W.dtype}")
    for x in rows:
        torch._check(x.dim() == 2 and x.shape == rows[0].shape and x.shape[1] == W.shape[0],
                     lambda: f"expected (batch, {W.shape[0]}) inputs, got {[tuple(r.shape) for r in rows]}")
        torch._check(x.dtype == W.dtype and x.device == W.device, lambda: "inputs must share dtype and device")


def empty_solve_outputs(like: torch.Tensor):
    """(x, iterations int32, residual in the accumulation dtype, converged bool) of a dense solve with like's batch:
    the registered ops' fake outputs (deqkern/ops/_dense_solve.py), allocated."""
    from deqkern.ops._dense_solve import fake_solve_outputs

    return fake_solve_outputs(like, like)


def fake_penalty_outputs(W: torch.Tensor, like: torch.Tensor, jacobian_penalty: float):
    """A backward's Jacobian penalty outputs, metadata only (deqkern/ops/_dense_solve.py)."""
    from deqkern.ops._dense_solve import fake_penalty_outputs as fake

    return fake(W, like, jacobian_penalty)

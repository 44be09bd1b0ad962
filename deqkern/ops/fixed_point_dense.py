"""fixed_point_dense: the differentiable fixed-point solve of a dense implicit layer (schema:
csrc/fixed_point_dense/fixed_point_dense.cpp): fake kernels, backends, autograd and the public function.

`torch.ops.deqkern.fixed_point_dense` / `fixed_point_dense_backward` are the raw, non-differentiable kernels (one op
per solve); method="anderson" runs the fixed_point_dense_anderson ops instead (fixed_point_dense_anderson.py) under
the same autograd function.
"""
import warnings
from typing import Optional

import torch

from ..activations import get_activation
from ..core import validation
from ..core.autograd import single_backward
from ..core.backends import kernel, register_kernel_backends, resolve_backend
from ..core.constants import ANDERSON_DEFAULT_BETA, ANDERSON_DEFAULT_LAM, ANDERSON_DEFAULT_M
from ..core.dtypes import SOLVE_DTYPES, accumulation_dtype
from ..core.errors import SkippedGradientWarning
from ..core.info import SolverInfo
from ..core.policy import check_policy, enforce_convergence
from ..reference import fixed_point_dense_backward_ref, fixed_point_dense_ref

METHODS = ("picard", "anderson")
BACKWARD_OVERFLOW_POLICIES = ("raise", "skip")
_ADVICE = "see info.converged, raise max_iter, use damping (alpha < 1) or a contractive layer"


# ---------------------------------------------------------------- fake kernels and backends
def fake_solve_outputs(x_like, batch_like):
    """(x, iterations int32, residual in the accumulation dtype, converged bool) of a dense solve, metadata only."""
    batch = batch_like.shape[0]
    return (
        torch.empty_like(x_like, memory_format=torch.contiguous_format),
        batch_like.new_empty(batch, dtype=torch.int32),
        batch_like.new_empty(batch, dtype=accumulation_dtype(batch_like.dtype)),
        batch_like.new_empty(batch, dtype=torch.bool),
    )


def register_dense_solve(op, reference, backward_reference, check_options=lambda *options: None):
    """Fake kernels and backends of a dense solve op `op`(W, c, z0, activation, *options) and its implicit backward
    `op`_backward(W, c, z, grad_z, activation, *options): fixed_point_dense and fixed_point_dense_anderson."""

    @torch.library.register_fake(f"deqkern::{op}")
    def _forward_fake(W, c, z0, activation, *options):
        torch._check(W.dim() == 2 and W.shape[0] == W.shape[1], lambda: "W must be square")
        torch._check(c.shape == z0.shape, lambda: "c and z0 must have the same shape")
        check_options(*options)
        return fake_solve_outputs(z0, c)

    @torch.library.register_fake(f"deqkern::{op}_backward")
    def _backward_fake(W, c, z, grad_z, activation, *options):
        torch._check(z.shape == grad_z.shape, lambda: "z and grad_z must have the same shape")
        check_options(*options)
        return fake_solve_outputs(grad_z, c)

    register_kernel_backends(op, reference, triton_module=op)
    register_kernel_backends(f"{op}_backward", backward_reference, triton_module=op)


register_dense_solve("fixed_point_dense", fixed_point_dense_ref, fixed_point_dense_backward_ref)


def _solve_fns(backend: str, method: str, alpha: float, m: int, beta: float, lam: float):
    """(forward(W, c, z0, activation, tol, max_iter), backward(W, c, z, grad_z, activation, tol, max_iter))."""
    if method == "anderson":
        from . import fixed_point_dense_anderson  # noqa: F401  (registers the Anderson ops' backends)

        fwd, bwd = kernel("fixed_point_dense_anderson", backend), kernel("fixed_point_dense_anderson_backward", backend)
        return (lambda W, c, z0, act, tol, it: fwd(W, c, z0, act, m, beta, lam, tol, it),
                lambda W, c, z, gz, act, tol, it: bwd(W, c, z, gz, act, m, beta, lam, tol, it))
    fwd, bwd = kernel("fixed_point_dense", backend), kernel("fixed_point_dense_backward", backend)
    return (lambda W, c, z0, act, tol, it: fwd(W, c, z0, act, alpha, tol, it),
            lambda W, c, z, gz, act, tol, it: bwd(W, c, z, gz, act, alpha, tol, it))


# ---------------------------------------------------------------- checks
def check_dense_inputs(what, W, c, z0=None):
    """W (d, d), c (batch, d) and z0 (batch, d) or None: float16/bfloat16/float32/float64, one dtype, one device."""
    validation.check_tensor(what, "W", W, dtypes=SOLVE_DTYPES)
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"deqkern.{what}: W must be a square (d, d) matrix, got shape {tuple(W.shape)}")
    if W.shape[0] == 0:
        raise ValueError(f"deqkern.{what}: the width d must be >= 1 (a state of no entries has no fixed point to solve "
                         "for), got W of shape (0, 0)")
    for name, t in (("c", c), ("z0", z0)):
        if t is None:
            continue
        validation.check_tensor(what, name, t, dtypes=SOLVE_DTYPES, like=W)
        if t.dim() != 2 or t.shape[1] != W.shape[0]:
            raise ValueError(f"deqkern.{what}: {name} must be (batch, {W.shape[0]}) to match W, got shape "
                             f"{tuple(t.shape)}")
    if z0 is not None and z0.shape != c.shape:
        raise ValueError(f"deqkern.{what}: z0 must have the shape of c {tuple(c.shape)}, got {tuple(z0.shape)}")


def _check_method_options(what, method, alpha, m, beta, lam):
    validation.check_choice(what, "method", method, METHODS)
    if method != "anderson":
        return
    validation.check_anderson_options(what, m, beta, lam)
    if alpha != 1.0:
        raise ValueError(f"deqkern.{what}: alpha is Picard's damping; method='anderson' mixes with beta instead, got "
                         f"alpha={alpha!r}")


# ---------------------------------------------------------------- autograd
class _FixedPointDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W, c, z0, activation, alpha, tol, max_iter, backend, bwd_tol, bwd_max_iter, policy, info,
                solver, jacobian_penalty, on_backward_overflow):
        method, m, beta, lam = solver
        forward_op, _ = _solve_fns(backend, method, alpha, m, beta, lam)
        z, iterations, residual, converged = forward_op(W, c, z0, activation, tol, max_iter)
        ctx.save_for_backward(W, c, z)
        ctx.options = (activation, alpha, backend, bwd_tol, bwd_max_iter, policy, info, solver)
        ctx.jacobian_penalty = jacobian_penalty
        ctx.skip_overflow = on_backward_overflow == "skip"
        ctx.mark_non_differentiable(iterations, residual, converged)
        return z, iterations, residual, converged

    @staticmethod
    @single_backward("fixed_point_dense")  # double backward raises instead of missing the solve's contribution
    def backward(ctx, grad_z, *unused_grads):
        W, c, z = ctx.saved_tensors
        activation, alpha, backend, tol, max_iter, policy, info, (method, m, beta, lam) = ctx.options
        _, backward_op = _solve_fns(backend, method, alpha, m, beta, lam)
        grad_u, iterations, residual, converged = backward_op(W, c, z, grad_z, activation, tol, max_iter)
        backward_info = SolverInfo(iterations, residual, converged)
        if info is not None and not torch.compiler.is_compiling():
            info.backward = backward_info
        if ctx.skip_overflow and not torch.compiler.is_compiling() and not bool(
                torch.isfinite(residual).all() & torch.isfinite(grad_u).all()):
            backward_info.gradient_skipped = True
            warnings.warn("deqkern.fixed_point_dense backward: the adjoint is not finite (an overflow, or NaN/Inf in "
                          "the incoming gradient); on_backward_overflow='skip' gave this solve zero gradients: skip "
                          "the optimiser step for this batch", SkippedGradientWarning, stacklevel=2)
            zero_W = torch.zeros_like(W) if ctx.needs_input_grad[0] else None
            zero_c = torch.zeros_like(c) if ctx.needs_input_grad[1] else None
            return zero_W, zero_c, *([None] * 13)
        enforce_convergence("fixed_point_dense backward", converged, residual, policy, tol=tol, max_iter=max_iter,
                            inputs={"grad_z": grad_z}, advice=_ADVICE)
        row_term = None
        if ctx.jacobian_penalty:
            grad_u_penalty, row_term, value = _jacobian_penalty_gradient(W, c, z, activation, ctx.jacobian_penalty)
            grad_u = grad_u + grad_u_penalty
            if info is not None and not torch.compiler.is_compiling():
                info.jacobian_penalty = value
        grad_W = None
        if ctx.needs_input_grad[0]:
            grad_W = grad_u.T @ z
            if row_term is not None:
                grad_W.addcmul_(row_term[:, None], W)
        grad_c = grad_u if ctx.needs_input_grad[1] else None
        return grad_W, grad_c, *([None] * 13)


def _jacobian_penalty_gradient(W, c, z, activation, weight):
    """The gradient of weight * P, P = ||J||_F^2 / N = sum_b sum_i act'(u_bi)^2 ||W_i||^2 / N at the fixed point z
    (held constant, as in Bai et al.'s code), u = z W^T + c, N = z.numel(), J_b = diag(act'(u_b)) W, written out so
    that it joins the implicit backward's own products: dP/du = 2 act' act'' ||W_i||^2 / N (added to the adjoint's
    grad_u, so dP/dc comes with it and dP/dW's (dP/du)^T z shares the one product grad_u^T z), plus
    dP/dW_i = (2 / N) sum_b act'(u_bi)^2 W_i. Returns (weight dP/du, weight (2 / N) sum_b act'^2 (d,), P detached).
    Costs one product z W^T and a few elementwise passes (in place where they can be). Half data is computed with in
    float32 (its 2 weight / N underflows float16 at everyday sizes) and the two gradient terms are rounded back."""
    dtype, acc = W.dtype, accumulation_dtype(W.dtype)
    if acc != dtype:
        grad_u, row_term, value = _jacobian_penalty_gradient(W.to(acc), c.to(acc), z.to(acc), activation, weight)
        return grad_u.to(dtype), row_term.to(dtype), value
    s, s1 = get_activation(activation).derivatives(torch.addmm(c, z, W.T))
    r = torch.linalg.vector_norm(W, dim=1)
    r.mul_(r)
    scale = 2.0 * weight / z.numel()
    column = torch.linalg.vector_norm(s, dim=0)
    column.mul_(column)  # sum_b act'(u_bi)^2
    value = torch.dot(column, r).detach() / z.numel()
    return s1.mul_(s).mul_(r.mul_(scale)), column.mul_(scale), value


def fixed_point_dense(
    W: torch.Tensor,
    c: torch.Tensor,
    activation: str = "tanh",
    alpha: float = 1.0,
    tol: float = 1e-4,
    max_iter: int = 100,
    z0: Optional[torch.Tensor] = None,
    backend: str = "auto",
    on_nonconvergence: str = "warn",
    backward_tol: Optional[float] = None,
    backward_max_iter: Optional[int] = None,
    method: str = "picard",
    m: int = ANDERSON_DEFAULT_M,
    beta: float = ANDERSON_DEFAULT_BETA,
    lam: float = ANDERSON_DEFAULT_LAM,
    jacobian_penalty: float = 0.0,
    on_backward_overflow: str = "raise",
):
    """Fixed point z* = act(z* W^T + c) of a dense implicit layer, solved by one fused kernel per solve.

    W: (d, d); c: (batch, d); z0: (batch, d) starting point (default zeros); one dtype (float32, float64, or the half
    dtypes float16 and bfloat16: those are solved in float32, the iterate and residuals kept in float32 and z rounded
    to the half dtype once; info.residual is then float32), one device, any strides. Products are exact in the
    compute dtype, except on backend="triton" when torch.get_float32_matmul_precision() is "high" or "medium": then
    float32 (and half) solves multiply on TF32 tensor cores (about 3 digits per product: use tol >= 1e-3).
    Iterates z <- (1 - alpha) z + alpha act(z W^T + c), stopping each sample once its relative residual
    ||f(z) - z|| / (||f(z)|| + 1e-12) <= tol. Differentiable in W and c by the implicit function theorem
    (the adjoint solved with the same kernel, `backward_tol` / `backward_max_iter` default to tol / max_iter).

    method: "picard" (the damped iteration above) or "anderson": type-II Anderson acceleration with history m
    (1..16), mixing beta in (0, 1] and Tikhonov regulariser lam relative to the Gram diagonal (the weights solve
    min ||sum a_i g_i||^2 + lam sum a_i^2 ||g_i||^2 s.t. sum a_i = 1; scale-invariant; the same algorithm as
    deqkern.solve's, deqkern/reference/anderson.py); same stopping rule, same per-sample statistics; the implicit
    backward is then solved by Anderson too. alpha must stay 1 with "anderson".

    on_nonconvergence: "warn" (NonConvergenceWarning), "raise" (NonConvergenceError) or "ignore" (no host
    synchronisation and no checks at all: read `info`). Unless "ignore", NaN/Inf in the inputs raise ValueError
    and an overflowing iteration raises FloatingPointError, in the forward and the backward solve.

    jacobian_penalty: a weight w >= 0 (default 0: none). The backward then also adds the gradient (in W and c) of
    w ||J||_F^2 / z.numel(), the exact Jacobian penalty of the layer at z* (J_b = diag(act'(u_b)) W; z* held
    constant, as Bai, Koltun and Kolter's Jacobian regularisation does): one extra product and a few elementwise
    passes in the backward, no double backward. The loss value is unchanged; the penalty itself is reported as
    `info.jacobian_penalty` once the backward has run.

    on_backward_overflow: "raise" (default: a non-finite adjoint raises FloatingPointError, or ValueError naming a
    non-finite incoming gradient) or "skip": the solve's gradients to W and c are zeros instead, with a
    SkippedGradientWarning and `info.backward.gradient_skipped` set, so that a training loop can skip the batch
    (check it before the optimiser step) rather than die or step on NaN (costs one host synchronisation).
    Returns (z, SolverInfo).
    """
    what = "fixed_point_dense"
    check_dense_inputs(what, W, c, z0)
    get_activation(activation)
    validation.check_solver_options(what, alpha, tol, max_iter)
    bwd_tol = tol if backward_tol is None else backward_tol
    bwd_max_iter = max_iter if backward_max_iter is None else backward_max_iter
    validation.check_solver_options(what, alpha, bwd_tol, bwd_max_iter, prefix="backward_")
    _check_method_options(what, method, alpha, m, beta, lam)
    solver = (method, int(m), float(beta), float(lam))
    check_policy(what, on_nonconvergence)
    validation.check_nonnegative(what, "jacobian_penalty", jacobian_penalty)
    validation.check_choice(what, "on_backward_overflow", on_backward_overflow, BACKWARD_OVERFLOW_POLICIES)
    backend = resolve_backend(backend, W.device, what)

    z0 = torch.zeros_like(c) if z0 is None else z0.detach()
    info = None if torch.compiler.is_compiling() else SolverInfo()
    if torch.is_grad_enabled() and (W.requires_grad or c.requires_grad):
        z, iterations, residual, converged = _FixedPointDense.apply(
            W, c, z0, activation, float(alpha), float(tol), int(max_iter), backend, float(bwd_tol),
            int(bwd_max_iter), on_nonconvergence, info, solver, float(jacobian_penalty), on_backward_overflow,
        )
    else:  # no autograd node to build: call the op directly
        forward_op, _ = _solve_fns(backend, method, float(alpha), *solver[1:])
        z, iterations, residual, converged = forward_op(W, c, z0, activation, float(tol), int(max_iter))
    if info is None:
        info = SolverInfo(iterations, residual, converged)
    else:
        info.iterations, info.residual, info.converged = iterations, residual, converged
    enforce_convergence(what, converged, residual, on_nonconvergence, tol=tol, max_iter=max_iter,
                        inputs={"W": W, "c": c, "z0": z0}, advice=_ADVICE)
    return z, info

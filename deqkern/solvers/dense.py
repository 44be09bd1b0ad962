"""The public dense solve `deqkern.fixed_point_dense` and its autograd: one fused op for the forward solve
(fixed_point_dense or fixed_point_dense_anderson, deqkern/ops/) and one for the implicit backward's adjoint solve."""
import warnings
from typing import Optional, Tuple

import torch

from ..activations import get_activation
from ..core import validation
from ..core.api import api_changes
from ..core.autograd import implicit_linear_solution, raise_when_differentiated
from ..core.backends import BACKENDS, kernel, resolve_backend
from ..core.constants import ANDERSON_DEFAULT_BETA, ANDERSON_DEFAULT_LAM, ANDERSON_DEFAULT_M, DENSE_METHODS
from ..core.dtypes import SOLVE_DTYPES
from ..core.errors import SkippedGradientWarning
from ..core.info import SolverInfo
from ..core.policy import DIVERGENCE_ADVICE, check_policy, enforce_convergence
from ..ops import fixed_point_dense as _picard_op, fixed_point_dense_anderson as _anderson_op  # noqa: F401 (backends)
from ..ops._dense_solve import fake_penalty_outputs, fake_solve_outputs
from .dense_penalty import jacobian_penalty_gradient
from .generic import solve

BACKWARD_OVERFLOW_POLICIES = ("raise", "skip")
_ADVICE = "see info.converged, raise max_iter, use damping (alpha < 1) or a contractive layer"
# a backward op's outputs: (grad_u, iterations, residual, converged, Jacobian penalty row term, its value)
_BackwardOutputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("deqkern::fixed_point_dense_tensor_alpha", mutates_args=())
def _picard_tensor_alpha(W: torch.Tensor, c: torch.Tensor, z0: torch.Tensor, activation: str, alpha: torch.Tensor,
                         tol: float, max_iter: int, backend: str
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """deqkern::fixed_point_dense with the damping alpha a 0-dim tensor, read inside the op: for a layer whose alpha
    is a function of its weight (LinfContractiveDEQ) inside a torch.compile graph, where reading it would break the
    graph. The solve is the fused kernel's, unchanged."""
    return kernel("fixed_point_dense", backend)(W, c, z0, activation, float(alpha), tol, max_iter)


@torch.library.custom_op("deqkern::fixed_point_dense_tensor_alpha_backward", mutates_args=())
def _picard_tensor_alpha_backward(W: torch.Tensor, c: torch.Tensor, z: torch.Tensor, grad_z: torch.Tensor,
                                  activation: str, alpha: torch.Tensor, tol: float, max_iter: int,
                                  jacobian_penalty: float, backend: str) -> _BackwardOutputs:
    """deqkern::fixed_point_dense_backward with a tensor alpha (see fixed_point_dense_tensor_alpha)."""
    return kernel("fixed_point_dense_backward", backend)(W, c, z, grad_z, activation, float(alpha), tol, max_iter,
                                                         jacobian_penalty)


@_picard_tensor_alpha.register_fake
def _picard_tensor_alpha_fake(W, c, z0, activation, alpha, tol, max_iter, backend):
    return fake_solve_outputs(z0, c)


@_picard_tensor_alpha_backward.register_fake
def _picard_tensor_alpha_backward_fake(W, c, z, grad_z, activation, alpha, tol, max_iter, jacobian_penalty, backend):
    return (*fake_solve_outputs(grad_z, c), *fake_penalty_outputs(W, c, jacobian_penalty))


@torch.library.custom_op("deqkern::fixed_point_dense_anderson_tensor_beta", mutates_args=())
def _anderson_tensor_beta(W: torch.Tensor, c: torch.Tensor, z0: torch.Tensor, activation: str, m: int,
                          beta: torch.Tensor, lam: float, tol: float, max_iter: int, backend: str
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """deqkern::fixed_point_dense_anderson with the mixing beta a 0-dim tensor, read inside the op (as
    fixed_point_dense_tensor_alpha reads Picard's alpha): LinfContractiveDEQ's Anderson mixes by beta alpha*."""
    return kernel("fixed_point_dense_anderson", backend)(W, c, z0, activation, m, float(beta), lam, tol, max_iter)


@torch.library.custom_op("deqkern::fixed_point_dense_anderson_tensor_beta_backward", mutates_args=())
def _anderson_tensor_beta_backward(W: torch.Tensor, c: torch.Tensor, z: torch.Tensor, grad_z: torch.Tensor,
                                   activation: str, m: int, beta: torch.Tensor, lam: float, tol: float,
                                   max_iter: int, jacobian_penalty: float, backend: str) -> _BackwardOutputs:
    """deqkern::fixed_point_dense_anderson_backward with a tensor beta (see fixed_point_dense_anderson_tensor_beta)."""
    return kernel("fixed_point_dense_anderson_backward", backend)(W, c, z, grad_z, activation, m, float(beta), lam,
                                                                   tol, max_iter, jacobian_penalty)


@_anderson_tensor_beta.register_fake
def _anderson_tensor_beta_fake(W, c, z0, activation, m, beta, lam, tol, max_iter, backend):
    return fake_solve_outputs(z0, c)


@_anderson_tensor_beta_backward.register_fake
def _anderson_tensor_beta_backward_fake(W, c, z, grad_z, activation, m, beta, lam, tol, max_iter, jacobian_penalty,
                                        backend):
    return (*fake_solve_outputs(grad_z, c), *fake_penalty_outputs(W, c, jacobian_penalty))


def _solve_fns(backend: str, method: str, alpha, m: int, beta, lam: float):
    """(forward(W, c, z0, activation, tol, max_iter), backward(W, c, z, grad_z, activation, tol, max_iter,
    jacobian_penalty)); Picard's alpha and Anderson's beta floats, or 0-dim tensors read inside the op (the
    tensor-option ops take the backend last)."""
    if method == "anderson":
        if isinstance(beta, torch.Tensor):
            fwd = lambda *args: _anderson_tensor_beta(*args, backend)  # noqa: E731
            bwd = lambda *args: _anderson_tensor_beta_backward(*args, backend)  # noqa: E731
        else:
            fwd = kernel("fixed_point_dense_anderson", backend)
            bwd = kernel("fixed_point_dense_anderson_backward", backend)
        return (lambda W, c, z0, act, tol, it: fwd(W, c, z0, act, m, beta, lam, tol, it),
                lambda W, c, z, gz, act, tol, it, pen: bwd(W, c, z, gz, act, m, beta, lam, tol, it, pen))
    if isinstance(alpha, torch.Tensor):
        fwd = lambda *args: _picard_tensor_alpha(*args, backend)  # noqa: E731
        bwd = lambda *args: _picard_tensor_alpha_backward(*args, backend)  # noqa: E731
    else:
        fwd, bwd = kernel("fixed_point_dense", backend), kernel("fixed_point_dense_backward", backend)
    return (lambda W, c, z0, act, tol, it: fwd(W, c, z0, act, alpha, tol, it),
            lambda W, c, z, gz, act, tol, it, pen: bwd(W, c, z, gz, act, alpha, tol, it, pen))


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
    validation.check_choice(what, "method", method, DENSE_METHODS)
    if method != "anderson":
        return
    validation.check_anderson_options(what, m, beta, lam)
    if alpha != 1.0:
        raise ValueError(f"deqkern.{what}: alpha is Picard's damping; method='anderson' mixes with beta instead, got "
                         f"alpha={alpha!r}")


def check_dense_options(what, activation, alpha, tol, max_iter, backend, on_nonconvergence, backward_tol,
                        backward_max_iter, method, m, beta, on_backward_overflow, lam=ANDERSON_DEFAULT_LAM,
                        jacobian_penalty=0.0):
    """Every option of a dense solve, checked where it is given (a layer checks its options at construction)."""
    get_activation(activation)
    validation.check_solver_options(what, alpha, tol, max_iter)
    bwd_tol = tol if backward_tol is None else backward_tol
    bwd_max_iter = max_iter if backward_max_iter is None else backward_max_iter
    validation.check_solver_options(what, alpha, bwd_tol, bwd_max_iter, prefix="backward_")
    _check_method_options(what, method, alpha, m, beta, lam)
    check_policy(what, on_nonconvergence)
    validation.check_nonnegative(what, "jacobian_penalty", jacobian_penalty)
    validation.check_choice(what, "on_backward_overflow", on_backward_overflow, BACKWARD_OVERFLOW_POLICIES)
    validation.check_choice(what, "backend", backend, BACKENDS)
    return bwd_tol, bwd_max_iter


# ---------------------------------------------------------------- autograd
_PENALTY_SECOND_ORDER = (b"deqkern.fixed_point_dense: the second derivative of jacobian_penalty's gradient is not "
                         b"supported: differentiate twice without the penalty (jacobian_penalty=0, jac_reg=None)")


def _differentiable_adjoint(W, c, z, grad_z, grad_u_solved, activation, options):
    """grad_u = s * (grad_u W + grad_z), s = act'(z W^T + c), as a differentiable function of W, c, z* and grad_z: y =
    s * (grad_u* W + grad_z) from the solved grad_u* (the fused kernel's), with the implicit derivative of the linear
    fixed point (core/autograd.py). Its transposed solve, w = (s * w) W^T + q, runs in deqkern.solve (plain PyTorch
    around the fused step op: second derivatives are rare enough not to have kernels of their own)."""
    _, alpha, _, tol, max_iter, policy, _, (method, m, beta, lam) = options
    s = get_activation(activation).derivative(torch.addmm(c, z, W.T))
    y = s * (grad_u_solved @ W + grad_z)
    s_const, W_const = s.detach(), W.detach()

    def solve_transposed(q):
        options = dict(m=m, beta=float(beta), lam=lam) if method == "anderson" else dict(alpha=float(alpha))
        w, _ = solve(lambda w: torch.addmm(q, s_const * w, W_const.T), torch.zeros_like(q), method=method, tol=tol,
                     max_iter=max_iter, on_nonconvergence=policy, **options)
        return w

    return implicit_linear_solution(y, solve_transposed, "fixed_point_dense")


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
    def backward(ctx, grad_z, *unused_grads):
        """First order: the fused adjoint solve. With create_graph=True: the same solve, then its result made a
        differentiable function of W, c, z* and grad_z (second derivatives, see _differentiable_adjoint)."""
        create_graph = torch.is_grad_enabled()
        W, c, z = ctx.saved_tensors  # z is this node's output: with create_graph, differentiable through this node
        activation, alpha, backend, tol, max_iter, policy, info, (method, m, beta, lam) = ctx.options
        _, backward_op = _solve_fns(backend, method, alpha, m, beta, lam)
        # First order, the penalty's gradient comes out of the adjoint's op, computed where s = act'(u) is. With
        # create_graph the op's grad_u must be the solve's alone (_differentiable_adjoint): the penalty is added
        # after it, in closed form (dense_penalty.py).
        penalty = ctx.jacobian_penalty
        with torch.no_grad():
            grad_u, iterations, residual, converged, row_term, value = backward_op(
                W.detach(), c.detach(), z.detach(), grad_z.detach(), activation, tol, max_iter,
                0.0 if create_graph else penalty)
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
        if create_graph:
            grad_u = _differentiable_adjoint(W, c, z, grad_z, grad_u, activation, ctx.options)
            if penalty:  # the penalty's gradient is closed-form first order: differentiating it again raises
                with torch.no_grad():
                    grad_u_penalty, row_term, value = jacobian_penalty_gradient(W.detach(), c.detach(), z.detach(),
                                                                                activation, penalty)
                grad_u_penalty, row_term = raise_when_differentiated(_PENALTY_SECOND_ORDER, grad_u_penalty, row_term,
                                                                     anchors=(W, c, z, grad_z))
                grad_u = grad_u + grad_u_penalty
        if penalty and info is not None and not torch.compiler.is_compiling():
            info.jacobian_penalty = value
        grad_W = None
        if ctx.needs_input_grad[0]:
            grad_W = grad_u.T @ z
            if penalty:
                grad_W = grad_W + row_term[:, None] * W if create_graph else grad_W.addcmul_(row_term[:, None], W)
        grad_c = grad_u if ctx.needs_input_grad[1] else None
        return grad_W, grad_c, *([None] * 13)


def _option_value(option):
    """A float option as a float, a tensor one (read inside the op) as it is."""
    return option if isinstance(option, torch.Tensor) else float(option)


# the option each method can take as a 0-dim tensor, and what it is
_TENSOR_OPTIONS = {"alpha": ("picard", "Picard's damping"), "beta": ("anderson", "Anderson's mixing")}


def _checked_tensor_option(what, name, value, method, W):
    """A tensor alpha (Picard) or beta (Anderson): 0-dim, floating point, on W's device, detached (its value is
    checked in (0, 1] inside the traced graph only as far as tracing allows: eagerly, now)."""
    if value.dim() != 0 or not value.is_floating_point() or value.device != W.device:
        raise ValueError(f"deqkern.{what}: a tensor {name} must be a 0-dim floating-point tensor on W's device, got "
                         f"shape {tuple(value.shape)}, {value.dtype} on {value.device}")
    needs, role = _TENSOR_OPTIONS[name]
    if method != needs:
        raise ValueError(f"deqkern.{what}: a tensor {name} is {role}; method={method!r} takes a float")
    if not torch.compiler.is_compiling():
        validation.check_unit_interval(what, name, float(value))
    return value.detach()


@api_changes("fixed_point_dense", old_positional=(
    "activation", "alpha", "tol", "max_iter", "z0", "backend", "on_nonconvergence", "backward_tol", "backward_max_iter",
    "method", "m", "beta", "lam", "jacobian_penalty", "on_backward_overflow"))
def fixed_point_dense(
    W: torch.Tensor,
    c: torch.Tensor,
    *,
    z0: Optional[torch.Tensor] = None,
    activation: str = "tanh",
    method: str = "picard",
    tol: float = 1e-4,
    max_iter: int = 100,
    alpha: float = 1.0,
    m: int = ANDERSON_DEFAULT_M,
    beta: float = ANDERSON_DEFAULT_BETA,
    lam: float = ANDERSON_DEFAULT_LAM,
    backward_tol: Optional[float] = None,
    backward_max_iter: Optional[int] = None,
    on_nonconvergence: str = "warn",
    on_backward_overflow: str = "raise",
    jacobian_penalty: float = 0.0,
    backend: str = "auto",
):
    """z* = act(z* W^T + c), solved by one fused kernel per solve and differentiated implicitly; returns (z*, info).

    W: (d, d); c: (batch, d); z0: (batch, d) start (default zeros). float32/float64, or float16/bfloat16 (solved in
    float32, z* rounded once); one device, any strides. Each sample stops once ||f(z) - z|| / (||f(z)|| + 1e-12)
    <= tol. method "picard" (damping alpha: a float, or a 0-dim tensor read inside the op, so that an alpha computed
    from a weight stays in a compiled graph) or "anderson" (history m <= 16, mixing beta, a float or such a tensor,
    regulariser lam relative to the Gram diagonal; the backward then runs Anderson too). jacobian_penalty=w adds the
    gradient of w ||J||_F^2 / numel at z* in the backward (computed in the backward op's kernel).
    on_backward_overflow "skip" turns a non-finite adjoint into zero gradients and a SkippedGradientWarning. Every
    option and failure mode: docs/api.md.
    """
    what = "fixed_point_dense"
    check_dense_inputs(what, W, c, z0)
    alpha = _checked_tensor_option(what, "alpha", alpha, method, W) if isinstance(alpha, torch.Tensor) else alpha
    beta = _checked_tensor_option(what, "beta", beta, method, W) if isinstance(beta, torch.Tensor) else beta
    # a tensor option's value was checked above (eagerly): the options' check sees 1 in its place
    bwd_tol, bwd_max_iter = check_dense_options(what, activation, 1.0 if isinstance(alpha, torch.Tensor) else alpha,
                                                tol, max_iter, backend, on_nonconvergence, backward_tol,
                                                backward_max_iter, method, m,
                                                1.0 if isinstance(beta, torch.Tensor) else beta,
                                                on_backward_overflow, lam, jacobian_penalty)
    solver = (method, int(m), _option_value(beta), float(lam))
    backend = resolve_backend(backend, W.device, what)

    z0 = torch.zeros_like(c) if z0 is None else z0.detach()
    info = None if torch.compiler.is_compiling() else SolverInfo()
    if torch.is_grad_enabled() and (W.requires_grad or c.requires_grad):
        z, iterations, residual, converged = _FixedPointDense.apply(
            W, c, z0, activation, _option_value(alpha), float(tol), int(max_iter), backend, float(bwd_tol),
            int(bwd_max_iter), on_nonconvergence, info, solver, float(jacobian_penalty), on_backward_overflow,
        )
    else:  # no autograd node to build: call the op directly
        forward_op, _ = _solve_fns(backend, method, _option_value(alpha), *solver[1:])
        z, iterations, residual, converged = forward_op(W, c, z0, activation, float(tol), int(max_iter))
    if info is None:
        info = SolverInfo(iterations, residual, converged)
    else:
        info.iterations, info.residual, info.converged = iterations, residual, converged
    enforce_convergence(what, converged, residual, on_nonconvergence, tol=tol, max_iter=max_iter,
                        inputs={"W": W, "c": c, "z0": z0}, advice=_ADVICE, overflow_advice=DIVERGENCE_ADVICE)
    return z, info

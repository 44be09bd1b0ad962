"""The differentiable fixed-point solve of a dense implicit layer: checks, backends, fake kernels, autograd.

`torch.ops.deqkern.fixed_point_dense` / `fixed_point_dense_backward` are the raw, non-differentiable kernels
(one op per solve, CPU and CUDA registered in C++); `fixed_point_dense` here is the public, differentiable API.
"""
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import _extension, reference
from .activations import get_activation

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
METHODS = ("picard", "anderson")
ANDERSON_MAX_M = reference.ANDERSON_MAX_M
ANDERSON_DEFAULT_LAM = 1e-4  # relative to the Gram diagonal: see reference._anderson_weights
NONCONVERGENCE_POLICIES = ("warn", "raise", "ignore")


class NonConvergenceError(RuntimeError):
    """A solve stopped at max_iter with some samples above tol (on_nonconvergence="raise")."""


class NonConvergenceWarning(RuntimeWarning):
    """A solve stopped at max_iter with some samples above tol (on_nonconvergence="warn")."""


@dataclass
class SolverInfo:
    """Per-sample statistics of one solve.

    iterations: (B,) int32, evaluations of the layer; residual: (B,) last relative residual
    ||f(z) - z|| / (||f(z)|| + 1e-12); converged: (B,) bool, residual <= tol. `backward` is filled with the
    statistics of the implicit backward solve once autograd has run it (eager mode only); `trace` the per-iteration
    residuals when the solver was asked for them.
    """

    iterations: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None
    converged: Optional[torch.Tensor] = None
    backward: Optional["SolverInfo"] = None
    trace: Optional[torch.Tensor] = None  # (iterations, B) residual history, when a solver was asked to keep it


# ---------------------------------------------------------------- fake kernels (shapes only, for torch.compile)
def _fake_solve(x_like, batch_like):
    batch = batch_like.shape[0]
    return (
        torch.empty_like(x_like),
        batch_like.new_empty(batch, dtype=torch.int32),
        batch_like.new_empty(batch),
        batch_like.new_empty(batch, dtype=torch.bool),
    )


@torch.library.register_fake("deqkern::fixed_point_dense")
def _fixed_point_dense_fake(W, c, z0, activation, alpha, tol, max_iter):
    torch._check(W.dim() == 2 and W.shape[0] == W.shape[1], lambda: "W must be square")
    torch._check(c.shape == z0.shape, lambda: "c and z0 must have the same shape")
    return _fake_solve(z0, c)


@torch.library.register_fake("deqkern::fixed_point_dense_backward")
def _fixed_point_dense_backward_fake(W, c, z, grad_z, activation, alpha, tol, max_iter):
    torch._check(z.shape == grad_z.shape, lambda: "z and grad_z must have the same shape")
    return _fake_solve(grad_z, c)


@torch.library.register_fake("deqkern::fixed_point_dense_anderson")
def _fixed_point_dense_anderson_fake(W, c, z0, activation, m, beta, lam, tol, max_iter):
    torch._check(W.dim() == 2 and W.shape[0] == W.shape[1], lambda: "W must be square")
    torch._check(c.shape == z0.shape, lambda: "c and z0 must have the same shape")
    torch._check(1 <= m <= ANDERSON_MAX_M, lambda: f"m must be in [1, {ANDERSON_MAX_M}]")
    return _fake_solve(z0, c)


@torch.library.register_fake("deqkern::fixed_point_dense_anderson_backward")
def _fixed_point_dense_anderson_backward_fake(W, c, z, grad_z, activation, m, beta, lam, tol, max_iter):
    torch._check(z.shape == grad_z.shape, lambda: "z and grad_z must have the same shape")
    torch._check(1 <= m <= ANDERSON_MAX_M, lambda: f"m must be in [1, {ANDERSON_MAX_M}]")
    return _fake_solve(grad_z, c)


# ---------------------------------------------------------------- backends
def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            if _extension.CUDA_EXTENSION_BUILT:
                return "cuda"
            if _extension.triton_available():
                return "triton"
            raise RuntimeError("deqkern: no GPU backend: the CUDA extension is not built and Triton is not installed")
        return "reference"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {device}")
        if not _extension.CUDA_EXTENSION_BUILT:
            raise RuntimeError(
                "backend='cuda': the CUDA extension (deqkern._C_cuda) is not built; reinstall with a CUDA build "
                "of torch and nvcc on PATH (DEQKERN_FORCE_CUDA=1 makes a missing toolkit an error)"
            )
    if backend == "triton":
        if not _extension.triton_available():
            raise RuntimeError("backend='triton': Triton is not installed (pip install triton)")
        if device.type != "cuda" and not _extension.triton_interpreter_on():
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device}")
    return backend


def _solve_ops(backend: str):
    """(forward, backward) callables with the signature of the registered ops, for one backend."""
    if backend in ("cpu", "cuda"):
        return torch.ops.deqkern.fixed_point_dense, torch.ops.deqkern.fixed_point_dense_backward
    if backend == "triton":
        from .triton_kernels import fixed_point_dense as triton_ops

        return triton_ops.fixed_point_dense_triton, triton_ops.fixed_point_dense_backward_triton
    return reference.fixed_point_dense_ref, reference.fixed_point_dense_backward_ref


def _anderson_ops(backend: str):
    """(forward, backward) callables with the signature of the registered Anderson ops, for one backend."""
    if backend in ("cpu", "cuda"):
        return torch.ops.deqkern.fixed_point_dense_anderson, torch.ops.deqkern.fixed_point_dense_anderson_backward
    if backend == "triton":
        from .triton_kernels import fixed_point_dense_anderson as triton_ops

        return triton_ops.fixed_point_dense_anderson_triton, triton_ops.fixed_point_dense_anderson_backward_triton
    return reference.fixed_point_dense_anderson_ref, reference.fixed_point_dense_anderson_backward_ref


def _solve_fns(backend: str, method: str, alpha: float, m: int, beta: float, lam: float):
    """(forward(W, c, z0, activation, tol, max_iter), backward(W, c, z, grad_z, activation, tol, max_iter))."""
    if method == "anderson":
        fwd, bwd = _anderson_ops(backend)
        return (lambda W, c, z0, act, tol, it: fwd(W, c, z0, act, m, beta, lam, tol, it),
                lambda W, c, z, gz, act, tol, it: bwd(W, c, z, gz, act, m, beta, lam, tol, it))
    fwd, bwd = _solve_ops(backend)
    return (lambda W, c, z0, act, tol, it: fwd(W, c, z0, act, alpha, tol, it),
            lambda W, c, z, gz, act, tol, it: bwd(W, c, z, gz, act, alpha, tol, it))


# ---------------------------------------------------------------- checks
def _check_tensor(name, t, dtype=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but W has {dtype}: use one dtype")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but W is on {device}: use one device")


def _check_solver_options(alpha, tol, max_iter, prefix=""):
    if not isinstance(alpha, (int, float)) or not (0 < alpha <= 1):
        raise ValueError(f"{prefix}alpha must be a number in (0, 1], got {alpha!r}")
    if not isinstance(tol, (int, float)) or not (tol > 0) or not math.isfinite(tol):
        raise ValueError(f"{prefix}tol must be a finite number > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or not (1 <= max_iter < 2**31):
        raise ValueError(f"{prefix}max_iter must be an integer >= 1, got {max_iter!r}")


def _check_method_options(method, alpha, m, beta, lam):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method != "anderson":
        return
    if isinstance(m, bool) or not isinstance(m, int) or not (1 <= m <= ANDERSON_MAX_M):
        raise ValueError(f"m (the Anderson history length) must be an integer in [1, {ANDERSON_MAX_M}], got {m!r}")
    if not isinstance(beta, (int, float)) or not (0 < beta <= 1):
        raise ValueError(f"beta (the Anderson mixing) must be a number in (0, 1], got {beta!r}")
    if not isinstance(lam, (int, float)) or not (lam >= 0) or not math.isfinite(lam):
        raise ValueError(f"lam (the Anderson regulariser, relative to the Gram diagonal) must be a finite number "
                         f">= 0, got {lam!r}")
    if alpha != 1.0:
        raise ValueError(f"alpha is Picard's damping; method='anderson' mixes with beta instead, got alpha={alpha!r}")


def _check_dense_inputs(W, c, z0):
    _check_tensor("W", W)
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be a square (d, d) matrix, got shape {tuple(W.shape)}")
    for name, t in (("c", c), ("z0", z0)):
        if t is None:
            continue
        _check_tensor(name, t, W.dtype, W.device)
        if t.dim() != 2 or t.shape[1] != W.shape[0]:
            raise ValueError(f"{name} must be (batch, {W.shape[0]}) to match W, got shape {tuple(t.shape)}")
    if z0 is not None and z0.shape != c.shape:
        raise ValueError(f"z0 must have the shape of c {tuple(c.shape)}, got {tuple(z0.shape)}")


def _host_checks_enabled(policy: str) -> bool:
    return policy != "ignore" and not torch.compiler.is_compiling()


def _enforce_policy(what, info, policy, tol, max_iter, inputs):
    """Raises on NaN/Inf (in `inputs` or the iteration), warns or raises on non-convergence.

    The kernels flag a sample with non-finite inputs as not converged (reference.py), so when every sample
    converged the inputs were finite: the happy path is one reduction and one host synchronisation.
    """
    if not _host_checks_enabled(policy) or info.converged.numel() == 0 or bool(info.converged.all()):
        return
    bad = [name for name, t in inputs.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"deqkern.{what}: {' and '.join(bad)} contain NaN or Inf")
    finite = torch.isfinite(info.residual)
    if not bool(finite.all()):
        samples = (~finite).nonzero().flatten()[:8].tolist()
        raise FloatingPointError(
            f"deqkern.{what}: the iteration overflowed to NaN/Inf for samples {samples}: the layer is not "
            "contractive there; use a smaller alpha or a smaller weight norm"
        )
    n_bad = int((~info.converged).sum())
    message = (
        f"deqkern.{what}: {n_bad} of {info.converged.numel()} samples did not reach tol={tol:g} within "
        f"max_iter={max_iter} (largest residual {float(info.residual.max()):.3e}); "
        "see info.converged, raise max_iter, use damping (alpha < 1) or a contractive layer"
    )
    if policy == "raise":
        raise NonConvergenceError(message)
    warnings.warn(message, NonConvergenceWarning, stacklevel=4)


# ---------------------------------------------------------------- autograd
class _FixedPointDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W, c, z0, activation, alpha, tol, max_iter, backend, bwd_tol, bwd_max_iter, policy, info,
                solver=("picard", 5, 1.0, ANDERSON_DEFAULT_LAM)):
        method, m, beta, lam = solver
        forward_op, _ = _solve_fns(backend, method, alpha, m, beta, lam)
        z, iterations, residual, converged = forward_op(W, c, z0, activation, tol, max_iter)
        ctx.save_for_backward(W, c, z)
        ctx.options = (activation, alpha, backend, bwd_tol, bwd_max_iter, policy, info, solver)
        ctx.mark_non_differentiable(iterations, residual, converged)
        return z, iterations, residual, converged

    @staticmethod
    def backward(ctx, grad_z, *unused_grads):
        W, c, z = ctx.saved_tensors
        activation, alpha, backend, tol, max_iter, policy, info, (method, m, beta, lam) = ctx.options
        _, backward_op = _solve_fns(backend, method, alpha, m, beta, lam)
        grad_u, iterations, residual, converged = backward_op(W, c, z, grad_z.contiguous(), activation, tol, max_iter)
        backward_info = SolverInfo(iterations, residual, converged)
        if info is not None and not torch.compiler.is_compiling():
            info.backward = backward_info
        _enforce_policy("fixed_point_dense backward", backward_info, policy, tol, max_iter, {"grad_z": grad_z})
        grad_W = grad_u.T @ z if ctx.needs_input_grad[0] else None
        grad_c = grad_u if ctx.needs_input_grad[1] else None
        return grad_W, grad_c, None, None, None, None, None, None, None, None, None, None, None


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
    m: int = 5,
    beta: float = 1.0,
    lam: float = ANDERSON_DEFAULT_LAM,
):
    """Fixed point z* = act(z* W^T + c) of a dense implicit layer, solved by one fused kernel per solve.

    W: (d, d); c: (batch, d); z0: (batch, d) starting point (default zeros); float32 or float64, one device.
    Iterates z <- (1 - alpha) z + alpha act(z W^T + c), stopping each sample once its relative residual
    ||f(z) - z|| / (||f(z)|| + 1e-12) <= tol. Differentiable in W and c by the implicit function theorem
    (the adjoint solved with the same kernel, `backward_tol` / `backward_max_iter` default to tol / max_iter).

    method: "picard" (the damped iteration above) or "anderson": type-II Anderson acceleration with history m
    (1..16), mixing beta in (0, 1] and Tikhonov regulariser lam relative to the Gram diagonal (the weights solve
    min ||sum a_i g_i||^2 + lam sum a_i^2 ||g_i||^2 s.t. sum a_i = 1; scale-invariant); same stopping rule, same
    per-sample statistics; the implicit backward is then solved by Anderson too (deqkern/reference.py,
    fixed_point_dense_anderson_ref). alpha must stay 1 with "anderson".

    on_nonconvergence: "warn" (NonConvergenceWarning), "raise" (NonConvergenceError) or "ignore" (no host
    synchronisation and no checks at all: read `info`). Unless "ignore", NaN/Inf in the inputs raise ValueError
    and an overflowing iteration raises FloatingPointError, in the forward and the backward solve.
    Returns (z, SolverInfo).
    """
    _check_dense_inputs(W, c, z0)
    get_activation(activation)
    _check_solver_options(alpha, tol, max_iter)
    bwd_tol = tol if backward_tol is None else backward_tol
    bwd_max_iter = max_iter if backward_max_iter is None else backward_max_iter
    _check_solver_options(alpha, bwd_tol, bwd_max_iter, prefix="backward_")
    _check_method_options(method, alpha, m, beta, lam)
    solver = (method, int(m), float(beta), float(lam))
    if on_nonconvergence not in NONCONVERGENCE_POLICIES:
        raise ValueError(f"on_nonconvergence must be one of {NONCONVERGENCE_POLICIES}, got {on_nonconvergence!r}")
    backend = _resolve_backend(backend, W.device)

    W, c = W.contiguous(), c.contiguous()
    z0 = torch.zeros_like(c) if z0 is None else z0.detach().contiguous()
    info = None if torch.compiler.is_compiling() else SolverInfo()
    if torch.is_grad_enabled() and (W.requires_grad or c.requires_grad):
        z, iterations, residual, converged = _FixedPointDense.apply(
            W, c, z0, activation, float(alpha), float(tol), int(max_iter), backend, float(bwd_tol),
            int(bwd_max_iter), on_nonconvergence, info, solver,
        )
    else:  # no autograd node to build: call the op directly
        forward_op, _ = _solve_fns(backend, method, float(alpha), *solver[1:])
        z, iterations, residual, converged = forward_op(W, c, z0, activation, float(tol), int(max_iter))
    if info is None:
        info = SolverInfo(iterations, residual, converged)
    else:
        info.iterations, info.residual, info.converged = iterations, residual, converged
    _enforce_policy("fixed_point_dense", info, on_nonconvergence, tol, max_iter, {"W": W, "c": c, "z0": z0})
    return z, info

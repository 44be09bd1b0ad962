"""The solve of any DEQ layer: `deqkern.solve(f, z0, method="anderson" | "picard" | "broyden")`.

f is a black box (B, ...) -> (B, ...), evaluated by PyTorch once per iteration on the whole batch. Everything else of
an Anderson (or Picard) iteration is ONE registered op, `deqkern::anderson_step` (csrc/anderson_step/,
triton_kernels/anderson_step.py, the specification deqkern/reference/anderson_step.py, fake kernel and backends in
deqkern/ops/anderson_step.py). Broyden is plain PyTorch (no kernel).
"""
import math
import threading
from typing import Callable, Optional

import torch

from ..core import validation
from ..core.api import api_changes
from ..core.backends import kernel, resolve_backend
from ..core.constants import ANDERSON_DEFAULT_BETA, ANDERSON_DEFAULT_LAM, ANDERSON_DEFAULT_M, SOLVE_METHODS
from ..core.dtypes import SOLVE_DTYPES, accumulation_dtype
from ..core.info import SolverInfo
from ..core.policy import DIVERGENCE_ADVICE, check_policy, enforce_convergence
from ..ops import anderson_step  # noqa: F401  (registers the anderson_step backends)
from ..reference.common import relative_residual
from .state import StateLayout, is_structured
from .traced import anderson_traced

# The keywords of solve() besides f, z0 and method: what nn.DEQ and the torchdeq adapter forward to it.
SOLVE_OPTIONS = frozenset(
    ("m", "beta", "alpha", "lam", "tol", "max_iter", "check_every", "return_trace", "on_nonconvergence", "backend",
     "process_group", "loop")
)
# loop="auto": a torch.while_loop when torch.compile or torch.export traces the solve (one graph), the Python loop
# around the fused step op otherwise; "python": the Python loop always (under torch.compile the graph breaks where
# the host asks "all stopped?").
LOOPS = ("auto", "python")
# How often the host asks "all samples stopped?" when check_every is None: on the CPU the question is a 1 us op,
# cheaper than one extra evaluation of f; on a GPU it is a synchronisation that drains the launch queue.
DEFAULT_CHECK_EVERY_CPU, DEFAULT_CHECK_EVERY_GPU = 1, 4


def _check_output(fz, z0, k):
    """f's output at evaluation k + 1: checked every time (metadata only, no synchronisation; its values are checked
    by the step op: a non-finite f(x) stops the sample with a NaN residual, reported by the policy)."""
    if not isinstance(fz, torch.Tensor):
        raise TypeError(f"deqkern.solve: f must return a torch.Tensor, got {type(fz).__name__} at evaluation {k + 1}")
    if fz.shape != z0.shape:
        raise ValueError(
            f"deqkern.solve: f(z) has shape {tuple(fz.shape)} at evaluation {k + 1} but z0 has {tuple(z0.shape)}: a "
            "fixed-point map must return a tensor of its input's shape"
        )
    if fz.dtype != z0.dtype or fz.device != z0.device:
        raise TypeError(f"deqkern.solve: f(z) is {fz.dtype} on {fz.device} at evaluation {k + 1} but z0 is {z0.dtype} "
                        f"on {z0.device}: f must keep the state's dtype and device")


def _check_traceable(return_trace, process_group):
    """What a traced solve (one torch.while_loop) cannot do, refused by name."""
    if return_trace:
        raise ValueError("deqkern.solve: return_trace=True is not available under torch.compile or torch.export (the "
                         "traced solve is one loop with no per-iteration record); read info.residual instead")
    if process_group is not None:
        raise ValueError("deqkern.solve: process_group is not available under torch.compile or torch.export (agreeing "
                         "on 'all stopped' across ranks is a collective per iteration)")


def _all_stopped(active, process_group):
    """True when no sample is active; with a process group, when no sample of any rank is (one all_reduce, so that
    every rank runs f, and any collective inside it, the same number of times)."""
    if process_group is None:
        return not bool(active.any())
    import torch.distributed as dist

    flag = active.any().to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
    return not bool(flag)


def _check_options(f, z0, method, m, beta, alpha, lam, tol, max_iter, check_every, policy):
    what = "solve"
    if not callable(f):
        raise TypeError(f"deqkern.solve: f must be callable, got {type(f).__name__}")
    validation.check_tensor(what, "z0", z0, dtypes=SOLVE_DTYPES)
    if z0.dim() < 1:
        raise ValueError("deqkern.solve: z0 must have a batch dimension: (B, ...)")
    if math.prod(z0.shape[1:]) == 0:
        raise ValueError(f"deqkern.solve: a sample of z0 must have at least one entry, got z0 of shape "
                         f"{tuple(z0.shape)}")
    validation.check_choice(what, "method", method, SOLVE_METHODS)
    if method == "broyden":  # no kernel: its memory m is not bounded by the Anderson cap
        validation.check_anderson_options(what, m, beta, lam, m_name="m (the Broyden memory)",
                                          max_m=validation.MAX_INT32)
    else:
        validation.check_anderson_options(what, m, beta, lam)
    validation.check_solver_options(what, alpha, tol, max_iter)
    if check_every is not None:
        validation.check_int(what, "check_every", check_every, 1)
    check_policy(what, policy)


# The history buffers of the last CPU solve on each thread, kept for the next solve of the same shape. Without it,
# glibc hands the freed multi-MB buffers back to the OS and the next solve faults them in again page by page:
# measured 700 page faults and 1.5-2 ms more per solve at B=256, n=256, m=5 (a solve is 5 ms), depending on what
# the process allocated before. CUDA needs none of this (PyTorch's caching allocator).
_HISTORY_CACHE = threading.local()
_HISTORY_CACHE_MAX_BYTES = 64 << 20


def _history_key(z0, batch, m, n):
    """The cache key of a solve's history buffers, or None where they must not be cached."""
    if z0.device.type != "cpu" or type(z0) is not torch.Tensor or torch.compiler.is_compiling():
        return None  # tensor subclasses (fake, functional) and traced code allocate per solve
    if torch._C._functorch.is_functorch_wrapped_tensor(z0):
        return None  # torch.func transforms: their wrappers must not outlive the transform
    if 2 * batch * m * n * z0.element_size() > _HISTORY_CACHE_MAX_BYTES:
        return None
    # Buffers made under inference mode cannot be written outside it: the mode is part of the key.
    return (z0.dtype, batch, m, n, torch.is_inference_mode_enabled())


def _take_history(key, z0, batch, m, n):
    cached = getattr(_HISTORY_CACHE, "entry", None)
    _HISTORY_CACHE.entry = None  # taken (a solve nested inside f allocates its own), or freed before we allocate
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    del cached
    return z0.new_empty(batch, m, n), z0.new_empty(batch, m, n)


def release_cached_buffers():
    """Frees the history buffers that this thread's last CPU solve kept for the next one (at most 64 MB)."""
    _HISTORY_CACHE.entry = None


def _anderson(f, z0, step, m, beta, lam, tol, max_iter, check_every, return_trace, process_group):
    """The driver loop shared by Anderson and Picard (Anderson with m = 1): f, then one fused op, per iteration."""
    batch, shape = z0.shape[0], z0.shape
    n = math.prod(shape[1:])
    acc = accumulation_dtype(z0.dtype)
    history_key = _history_key(z0, batch, m, n)
    X_hist, G_hist = _take_history(history_key, z0, batch, m, n)
    H = torch.zeros(batch, m, m, dtype=acc, device=z0.device)
    x = z0.reshape(batch, n).clone(memory_format=torch.contiguous_format)
    x_next = torch.empty_like(x)
    z_best = torch.empty_like(x)
    residual_best = torch.full((batch,), math.nan, dtype=acc, device=z0.device)
    residual = torch.full_like(residual_best, math.nan)
    active = torch.ones(batch, dtype=torch.bool, device=z0.device)
    iterations = torch.zeros(batch, dtype=torch.int32, device=z0.device)
    trace = [] if return_trace else None  # grows with the iterations actually run
    steps = 0
    flat = z0.dim() == 2  # (B, n) states go to f as they are: a view per iteration costs ~2 us, a sixth of the loop
    beta, lam, tol = float(beta), float(lam), float(tol)
    for k in range(max_iter):
        fx = f(x if flat else x.view(shape))
        _check_output(fx, z0, k)
        step(X_hist, G_hist, H, x, fx if flat else fx.reshape(batch, n), x_next, z_best, residual_best, residual,
             active, iterations, k, beta, lam, tol)
        x, x_next = x_next, x
        steps = k + 1
        if trace is not None:  # the samples that were active in this step are those with iterations == k + 1
            trace.append(torch.where(iterations == steps, residual, math.nan))
        if steps % check_every == 0 and _all_stopped(active, process_group):
            break
    if history_key is not None:
        _HISTORY_CACHE.entry = (history_key, (X_hist, G_hist))
    return z_best.view(shape), iterations, residual_best, residual, _stack_trace(trace, batch, acc, z0.device)


def _empty_solve(z0, return_trace):
    """The result of a solve of no samples: z0 itself and empty statistics."""
    acc = accumulation_dtype(z0.dtype)
    residual = torch.empty(0, dtype=acc, device=z0.device)
    return z0.clone(), SolverInfo(iterations=torch.empty(0, dtype=torch.int32, device=z0.device), residual=residual,
                                  converged=torch.empty(0, dtype=torch.bool, device=z0.device),
                                  trace=torch.empty(0, 0, dtype=acc, device=z0.device) if return_trace else None)


def _stack_trace(trace, batch, dtype, device):
    """(iterations run, B) from the per-iteration rows, or None when no trace was asked for."""
    if trace is None:
        return None
    return torch.stack(trace) if trace else torch.empty(0, batch, dtype=dtype, device=device)


def _broyden(f, z0, m, tol, max_iter, check_every, return_trace, process_group):
    """Limited-memory "good" Broyden as in torchdeq / the DEQ reference code, in plain PyTorch (no kernel).

    The inverse Jacobian of g(x) = f(x) - x is approximated by -I + sum_i u_i v_i^T (Sherman-Morrison rank-one
    updates from the (dx, dg) pairs); the step is x <- x - J^-1 g, no line search. Limited memory: after m updates
    the approximation restarts from -I (torchdeq keeps max_iter updates; a ring that overwrites the oldest pair
    makes the approximation inconsistent and diverges). The state is kept in
    float32 (float64 for float64 z0); per-sample stopping and freezing as for Anderson.
    """
    batch, shape, dtype = z0.shape[0], z0.shape, z0.dtype
    n = math.prod(shape[1:])
    acc = accumulation_dtype(dtype)
    x = z0.reshape(batch, n).to(acc)
    U = x.new_zeros(batch, m, n)
    V = x.new_zeros(batch, m, n)
    z_best = z0.reshape(batch, n).clone()
    residual_best = torch.full((batch,), math.nan, dtype=acc, device=z0.device)
    residual = torch.full_like(residual_best, math.nan)
    active = torch.ones(batch, dtype=torch.bool, device=z0.device)
    iterations = torch.zeros(batch, dtype=torch.int32, device=z0.device)
    trace = [] if return_trace else None

    def matvec(v):  # (-I + U^T V) v, per sample
        return -v + torch.einsum("bjn,bj->bn", U, torch.einsum("bjn,bn->bj", V, v))

    def rmatvec(v):  # v^T (-I + U^T V)
        return -v + torch.einsum("bj,bjn->bn", torch.einsum("bn,bjn->bj", v, U), V)

    x_prev = g_prev = None
    steps = 0
    for k in range(max_iter):
        fx = f(x.to(dtype).view(shape))
        _check_output(fx, z0, k)
        fx = fx.reshape(batch, n)
        fa = fx.to(acc)
        g = fa - x
        r = relative_residual(fa, x)
        residual = torch.where(active, r, residual)
        iterations = torch.where(active, torch.full_like(iterations, k + 1), iterations)
        better = active & (torch.isnan(residual_best) | (r < residual_best))
        residual_best = torch.where(better, r, residual_best)
        z_best = torch.where(better[:, None], fx, z_best)
        if trace is not None:
            trace.append(torch.where(active, r, math.nan))
        active = active & (r > tol) & torch.isfinite(r)
        steps = k + 1
        if steps % check_every == 0 and _all_stopped(active, process_group):
            break
        if k > 0:
            slot = (k - 1) % m
            if slot == 0 and k > 1:  # memory full: restart from -I (overwriting the oldest pair diverges); the new
                U.zero_()           # pair is then an update of -I, so the restart comes before it is computed
                V.zero_()
            dx, dg = x - x_prev, g - g_prev
            vT = rmatvec(dx)
            u = (dx - matvec(dg)) / torch.einsum("bn,bn->b", vT, dg)[:, None]
            keep = active[:, None] & torch.isfinite(u).all(dim=1, keepdim=True) & torch.isfinite(vT).all(
                dim=1, keepdim=True)
            U[:, slot] = torch.where(keep, u, 0.0)
            V[:, slot] = torch.where(keep, vT, 0.0)
        x_prev, g_prev = x, g
        x = torch.where(active[:, None], x - matvec(g), x)
    return z_best.view(shape), iterations, residual_best, residual, _stack_trace(trace, batch, acc, z0.device)


@torch.no_grad()
@api_changes("solve", old_positional=("method",))
def solve(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    method: str = "anderson",
    tol: float = 1e-4,
    max_iter: int = 100,
    m: int = ANDERSON_DEFAULT_M,
    beta: float = ANDERSON_DEFAULT_BETA,
    alpha: float = 1.0,
    lam: float = ANDERSON_DEFAULT_LAM,
    check_every: Optional[int] = None,
    return_trace: bool = False,
    on_nonconvergence: str = "warn",
    process_group=None,
    backend: str = "auto",
    loop: str = "auto",
):
    """z* = f(z*) for any map f of a state z0 (B, ...), or of a tuple or list of such tensors (one batch size, dtype
    and device; f returns the same structure); returns (z*, SolverInfo), z* of z0's structure. Not differentiable.

    method "anderson" (history m <= 16, mixing beta, regulariser lam relative to each residual's norm: the dense
    solve's algorithm, deqkern/reference/anderson.py), "picard" (damping alpha) or "broyden" (memory m, plain
    PyTorch). f is evaluated once per iteration on the whole batch; the rest of the iteration is one op,
    deqkern::anderson_step. Each sample stops once its relative residual <= tol and is frozen; it returns f of its
    lowest-residual iterate. check_every: how often the host asks "all stopped?" (default 1 on CPU, 4 on GPU).
    process_group: agree that question across ranks when f holds a collective. loop: "auto" (under torch.compile
    or torch.export, Anderson and Picard run as one torch.while_loop: fullgraph=True and export work) or "python"
    (the eager loop always; under torch.compile the graph breaks at each "all stopped?"). Details: docs/api.md.
    """
    # A structured state is packed once into the solver's (B, n) buffer; f sees views in the original shapes.
    layout = StateLayout.of("solve", z0) if is_structured(z0) else None
    if layout is not None:
        z0 = layout.pack(z0)
    _check_options(f, z0, method, m, beta, alpha, lam, tol, max_iter, check_every, on_nonconvergence)
    if layout is not None:
        f = layout.flat_map("solve", f)
    resolved = resolve_backend(backend, z0.device, "solve")
    if check_every is None:
        check_every = DEFAULT_CHECK_EVERY_CPU if z0.device.type == "cpu" else DEFAULT_CHECK_EVERY_GPU
    if z0.shape[0] == 0 and process_group is None:
        z, info = _empty_solve(z0, return_trace)
        return (z if layout is None else layout.unpack(z)), info
    validation.check_choice("solve", "loop", loop, LOOPS)
    traced = torch.compiler.is_compiling() and method != "broyden" and loop == "auto"
    if traced:
        _check_traceable(return_trace, process_group)
    if method == "picard":
        m, beta = 1, alpha
    if method == "broyden":
        out = _broyden(f, z0, m, tol, max_iter, check_every, return_trace, process_group)
    elif traced:  # torch.compile / torch.export: the whole solve as one torch.while_loop (traced.py)
        out = anderson_traced(f, z0, lambda fz: _check_output(fz, z0, 0), m, beta, lam, tol, max_iter)
    else:
        out = _anderson(f, z0, kernel("anderson_step", resolved), m, beta, lam, tol, max_iter, check_every,
                        return_trace, process_group)
    z, iterations, residual_best, residual_last, trace = out
    converged = residual_best <= tol
    # The policy sees the last residual, so that an overflow is reported as such (converged is the same).
    enforce_convergence("solve", converged, residual_last, on_nonconvergence, tol=tol, max_iter=max_iter,
                        inputs={"z0": z0}, advice="raise max_iter, or use a contractive f",
                        overflow_advice=DIVERGENCE_ADVICE)
    if layout is not None:
        z = layout.unpack(z)
    return z, SolverInfo(iterations=iterations, residual=residual_best, converged=converged, trace=trace)

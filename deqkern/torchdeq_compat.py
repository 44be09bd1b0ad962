"""Drop-in deqkern solvers for torchdeq: `register_torchdeq_solvers()` then
`torchdeq.get_deq(f_solver="deqkern_anderson", b_solver="deqkern_anderson", ...)`.

torchdeq's solver contract (torchdeq 0.1.0, torchdeq/solver/*.py and torchdeq/core.py, torchdeq/grad.py):

    z_star, trajectory, info = solver(func, x0, max_iter=..., tol=..., stop_mode="abs"|"rel", indexing=None, **kw)

- `func` maps a tensor shaped like x0 (B, ...) to the same shape; the forward calls come under torch.no_grad, the
  backward (IFT adjoint) calls are vector-Jacobian products plus the incoming gradient, with x0 = zeros.
- `stop_mode`: "abs" stops on ||f(z) - z|| < tol, "rel" on ||f(z) - z|| / ||f(z)|| < tol (per sample, all samples).
- `indexing` (DEQIndexing in training): cumulative solver steps at which states are returned in `trajectory`;
  core zips `trajectory` with its gradient functions (the last one is IFT), so it must not be empty.
- `info`: a torchdeq SolverStat (dict) with 'abs_lowest', 'rel_lowest' (B,), 'abs_trace', 'rel_trace' (B, N),
  'nstep' (B,) float; core adds 'sradius' in eval mode.
- extra keyword arguments: torchdeq's own solvers ignore unknown ones silently; these adapters do not (TypeError).

How the adapters match it: deqkern.solve stops on the relative residual ||f(z) - z|| / (||f(z)|| + 1e-12) <= tol.
stop_mode="rel" passes tol through; stop_mode="abs" converts tol into a relative one with the largest ||f(z)|| of
the batch (tol_rel = tol / max_b ||f(z_b)||, which implies the absolute criterion for every sample), checks the
absolute residual of the result and, if some sample is still above tol, resumes (warm start) with the remaining
iteration budget (at most 3 rounds). The statistics are measured on the returned z with one extra evaluation of f
(abs_trace / rel_trace are (B, 1): the final step, as torchdeq's `solver_stat_from_final_step`). `indexing` runs the
solve in chunks ending at each requested step (Anderson/Broyden histories restart at each chunk) and returns one
state per index (the converged state for indices past convergence, where torchdeq's solvers would return fewer).
`tau` is Anderson's mixing parameter (deqkern beta) or the fixed-point damping (deqkern alpha); return_final=True is
not supported (deqkern returns the lowest-residual iterate). Non-convergence follows `on_nonconvergence`
(default "warn"); NaN/Inf in the result raise FloatingPointError unless "ignore".
"""
import warnings

import torch

from .core.constants import SOLVE_METHODS
from .core.errors import NonConvergenceError, NonConvergenceWarning
from .core.policy import check_policy
from .solvers.generic import SOLVE_OPTIONS, solve
_MAX_ROUNDS = 3
# torchdeq's own relative residual ||f(z) - z|| / (||f(z)|| + 1e-9): the adapter reports and checks torchdeq's stop
# criterion exactly as torchdeq computes it (deqkern's solves use deqkern.core.constants.RESIDUAL_EPS).
TORCHDEQ_RESIDUAL_EPS = 1e-9


def _require_torchdeq():
    try:
        import torchdeq  # noqa: F401
        from torchdeq.solver import register_solver
        from torchdeq.solver.stat import SolverStat
    except ImportError as exc:  # pragma: no cover - exercised only without torchdeq
        raise ImportError(
            "deqkern.register_torchdeq_solvers needs torchdeq (pip install torchdeq); deqkern itself does not"
        ) from exc
    return register_solver, SolverStat


def _residuals(func, z):
    """f(z) and torchdeq's absolute and relative residuals of z, per sample."""
    fz = func(z)
    b = z.shape[0] if z.dim() >= 1 else 1
    diff = (fz - z).reshape(b, -1).norm(dim=1)
    rel = diff / (fz.reshape(b, -1).norm(dim=1) + TORCHDEQ_RESIDUAL_EPS)
    return fz, diff, rel


def _make_solver(method, policy, defaults, SolverStat):
    def solver(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, tau=1.0, return_final=False,
               **kwargs):
        if stop_mode not in ("abs", "rel"):
            raise ValueError(f"deqkern.torchdeq_compat ({method}): stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
        if return_final:
            raise ValueError(f"deqkern.torchdeq_compat ({method}): return_final=True is not supported (deqkern "
                             "returns the "
                             "lowest-residual iterate)")
        options = dict(defaults)
        options.update(kwargs)  # unknown keys reach deqkern.solve, which raises TypeError
        if tau != 1.0:
            if method == "anderson":
                options["beta"] = float(tau)
            elif method == "picard":
                options["alpha"] = float(tau)
            else:
                raise ValueError(f"deqkern.torchdeq_compat ({method}): tau={tau!r} is not supported by broyden")
        max_iter = int(max_iter)
        dtype_tiny = torch.finfo(x0.dtype).tiny if x0.is_floating_point() else 1e-30

        nstep = torch.zeros(x0.shape[0], device=x0.device)
        state = {"z": x0.detach(), "abs": None, "rel": None}

        def run(budget):
            z = state["z"]
            fz = None
            if state["abs"] is not None:
                crit = state["abs"] if stop_mode == "abs" else state["rel"]
                if bool((crit <= tol).all()):
                    return  # converged: later trajectory entries repeat the converged state
            for _ in range(_MAX_ROUNDS):
                if budget < 1:
                    break
                if stop_mode == "rel":
                    rtol = float(tol)
                else:
                    if fz is None:
                        fz = func(z)
                    scale = float(fz.reshape(fz.shape[0], -1).norm(dim=1).max()) if fz.numel() else 1.0
                    rtol = min(float(tol) / max(scale, dtype_tiny), 0.5)
                z, sinfo = solve(func, z, method=method, tol=rtol, max_iter=budget, on_nonconvergence="ignore",
                                 **options)
                its = sinfo.iterations.to(nstep.device, nstep.dtype)
                nstep.add_(its)
                budget -= int(its.max()) if its.numel() else 0
                fz, abs_res, rel_res = _residuals(func, z)
                state.update(z=z.detach(), abs=abs_res, rel=rel_res)
                crit = abs_res if stop_mode == "abs" else rel_res
                if stop_mode == "rel" or bool((crit <= tol).all()):
                    break
            if state["abs"] is None:  # budget 0: measure the starting point
                _, state["abs"], state["rel"] = _residuals(func, z)

        trajectory = []
        if indexing:
            done = 0
            for step in indexing:
                step = int(step)
                run(step - done)
                done = max(done, step)
                trajectory.append(state["z"])
        else:
            run(max_iter)
        z = state["z"]
        abs_res, rel_res = state["abs"], state["rel"]
        crit = abs_res if stop_mode == "abs" else rel_res

        if policy != "ignore" and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(crit).all()):
                raise FloatingPointError(f"deqkern.torchdeq_compat ({method}): the solve produced NaN/Inf (not "
                                         "contractive?)")
            if not bool((crit <= tol).all()):
                msg = (f"deqkern.torchdeq_compat ({method}): {int((crit > tol).sum())} of {crit.numel()} samples did "
                       f"not reach "
                       f"{stop_mode} tol={tol:g} within max_iter={max_iter} (largest {float(crit.max()):.3e})")
                if policy == "raise":
                    raise NonConvergenceError(msg)
                warnings.warn(msg, NonConvergenceWarning, stacklevel=3)

        info = SolverStat(
            abs_lowest=abs_res, rel_lowest=rel_res, abs_trace=abs_res.unsqueeze(1), rel_trace=rel_res.unsqueeze(1),
            nstep=nstep,
        )
        return z, trajectory, info

    solver.__name__ = f"deqkern_{method}"
    solver.__doc__ = f"torchdeq-compatible wrapper of deqkern.solve(method={method!r}) (see deqkern.torchdeq_compat)."
    return solver


def register_torchdeq_solvers(prefix: str = "deqkern_", on_nonconvergence: str = "warn", **solve_options):
    """Registers deqkern.solve as torchdeq solvers "<prefix>anderson", "<prefix>picard", "<prefix>broyden".

    on_nonconvergence: "warn" (NonConvergenceWarning), "raise" (NonConvergenceError) or "ignore", checked against
    torchdeq's own stop criterion (stop_mode, tol); solve_options: defaults for deqkern.solve (m, beta, alpha, lam,
    check_every, backend), overridden by torchdeq's solver_kwargs. Returns the registered names.
    Needs torchdeq (ImportError otherwise); importing deqkern does not.
    """
    register_solver, SolverStat = _require_torchdeq()
    check_policy("register_torchdeq_solvers", on_nonconvergence)
    reserved = {"tol", "max_iter", "on_nonconvergence", "return_trace"}
    unknown = sorted(set(solve_options) - (SOLVE_OPTIONS - reserved))
    if unknown:
        raise TypeError(f"deqkern.register_torchdeq_solvers: unknown or reserved option(s) {unknown}; torchdeq "
                        f"sets tol and "
                        f"max_iter itself; valid: {sorted(SOLVE_OPTIONS - reserved)}")
    _warn_when_backward_solver_is_unused(prefix)
    names = []
    for method in SOLVE_METHODS:
        name = f"{prefix}{method}"
        register_solver(name, _make_solver(method, on_nonconvergence, solve_options, SolverStat))
        names.append(name)
    return names


class UnusedBackwardSolverWarning(UserWarning):
    """torchdeq was given a deqkern backward solver (b_solver) that its configuration never calls."""


def _warn_when_backward_solver_is_unused(prefix):
    """torchdeq's `ift` defaults to False: a DEQ built with b_solver="deqkern_..." and without ift=True trains with
    one-step (phantom) gradients and never calls the backward solver, silently. Wraps torchdeq's DEQ base class once
    so that such a configuration warns when it is built."""
    from torchdeq import core

    if getattr(core.DEQBase.__init__, "_deqkern_checks_b_solver", False):
        return
    original = core.DEQBase.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        b_solver = self.args.get("b_solver", kwargs.get("b_solver"))
        ift = self.args.get("ift", kwargs.get("ift", False)) or self.args.get("hook_ift", False)
        if isinstance(b_solver, str) and b_solver.startswith(prefix) and not ift:
            warnings.warn(f"deqkern.register_torchdeq_solvers: b_solver={b_solver!r} is not used: torchdeq's ift "
                          "defaults to False (one-step gradients, no backward solve); pass ift=True to get the "
                          "implicit gradient through deqkern's solver", UnusedBackwardSolverWarning, stacklevel=3)

    __init__._deqkern_checks_b_solver = True
    core.DEQBase.__init__ = __init__

"""The one non-convergence policy of every deqkern solver: fixed-point solves (forward and implicit backward),
power iterations and the Jacobian tools.

The kernels flag a sample whose inputs are not finite as not converged (reference.py), so when every sample
converged the inputs were finite: the happy path costs one reduction and one host synchronisation, after the solve.
Otherwise, in this order: NaN/Inf in an input -> ValueError naming it; a non-finite result -> FloatingPointError;
samples above tol -> NonConvergenceWarning (or a subclass), or NonConvergenceError under "raise".
"ignore" checks nothing and never synchronises: read the returned info.
"""
import contextlib
import contextvars
import warnings

import torch

from .errors import NonConvergenceError, NonConvergenceWarning
from .validation import check_choice

NONCONVERGENCE_POLICIES = ("warn", "raise", "ignore")
# What fits an iteration that overflowed (it diverged: more iterations would not help).
DIVERGENCE_ADVICE = ("the iteration diverged: use a contractive f (deqkern's certified layers), damping (method='picard' "
                     "with alpha < 1), method='anderson', or Jacobian regularisation (jac_reg=) in training")

# The tensors a layer handed to the solve it calls (its x, its parameters), to name the user's tensor, not the
# internal one computed from it, when an input is not finite.
_CALLER_INPUTS = contextvars.ContextVar("deqkern_caller_inputs", default=None)


def caller_inputs(what, tensors):
    """A context: within it, a solve that fails on a non-finite input or result first scans these tensors of the
    calling layer `what` (name -> tensor, or a function returning that dict, called only on a failure) and names a
    non-finite one (and its samples, for x). While torch.compile traces, a null context: the checks are off there
    (checks_enabled), and a context variable would break the graph."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _caller_inputs(what, tensors)


@contextlib.contextmanager
def _caller_inputs(what, tensors):
    token = _CALLER_INPUTS.set((what, tensors))
    try:
        yield
    finally:
        _CALLER_INPUTS.reset(token)


def _non_finite_caller_input():
    """A ValueError naming the calling layer's first non-finite tensor, or None (see caller_inputs)."""
    caller = _CALLER_INPUTS.get()
    if caller is None:
        return None
    what, tensors = caller
    for name, t in (tensors() if callable(tensors) else tensors).items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        finite = torch.isfinite(t.detach())
        if bool(finite.all()):
            continue
        where = ""
        if name.startswith("x") and t.dim() >= 2:
            samples = (~finite).flatten(1).any(dim=1).nonzero().flatten()
            where = f" (samples {samples[:8].tolist()}{' ...' if samples.numel() > 8 else ''})"
        return ValueError(f"deqkern.{what}: {name} contains NaN or Inf{where}: the solve cannot start from it")
    return None


def check_policy(what, policy, name="on_nonconvergence"):
    return check_choice(what, name, policy, NONCONVERGENCE_POLICIES)


def checks_enabled(policy) -> bool:
    """Whether the host-side checks run: not under "ignore", and not while torch.compile traces (no data there)."""
    return policy != "ignore" and not torch.compiler.is_compiling()


def enforce_convergence(what, converged, values, policy, *, tol, max_iter, inputs=None, quantity="residual",
                        advice="", overflow_advice=None, warning=NonConvergenceWarning, stacklevel=3):
    """Applies the policy to one solve's per-sample `converged` (bool) and `values` (residuals or estimates).

    inputs: name -> tensor, scanned (only when something did not converge) to name a non-finite one; before them,
    the calling layer's tensors (caller_inputs). advice: for samples above tol; overflow_advice: for a result that
    overflowed (default: advice).
    """
    if not checks_enabled(policy) or converged.numel() == 0 or bool(converged.all()):
        return
    bad = [name for name, t in (inputs or {}).items() if t is not None and not bool(torch.isfinite(t).all())]
    finite = torch.isfinite(values)
    if bad or not bool(finite.all()):
        caller_error = _non_finite_caller_input()
        if caller_error is not None:
            raise caller_error
    if bad:
        raise ValueError(f"deqkern.{what}: {' and '.join(bad)} contain NaN or Inf")
    if not bool(finite.all()):
        samples = (~finite).nonzero().flatten()[:8].tolist()
        overflow_advice = advice if overflow_advice is None else overflow_advice
        raise FloatingPointError(
            f"deqkern.{what}: the iteration overflowed to NaN/Inf for samples {samples}"
            + (f"; {overflow_advice}" if overflow_advice else "")
        )
    n_bad = int((~converged).sum())
    message = (f"deqkern.{what}: {n_bad} of {converged.numel()} samples did not converge: they did not reach "
               f"tol={tol:g} within max_iter={max_iter} (largest {quantity} {float(values.abs().max()):.3e})"
               + (f"; {advice}" if advice else ""))
    if policy == "raise":
        raise NonConvergenceError(message)
    warnings.warn(message, warning, stacklevel=stacklevel + 1)

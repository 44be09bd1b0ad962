"""The one non-convergence policy of every deqkern solver: fixed-point solves (forward and implicit backward),
power iterations and the Jacobian tools.

The kernels flag a sample whose inputs are not finite as not converged (reference.py), so when every sample
converged the inputs were finite: the happy path costs one reduction and one host synchronisation, after the solve.
Otherwise, in this order: NaN/Inf in an input -> ValueError naming it; a non-finite result -> FloatingPointError;
samples above tol -> NonConvergenceWarning (or a subclass), or NonConvergenceError under "raise".
"ignore" checks nothing and never synchronises: read the returned info.
"""
import warnings

import torch

from .errors import NonConvergenceError, NonConvergenceWarning
from .validation import check_choice

NONCONVERGENCE_POLICIES = ("warn", "raise", "ignore")


def check_policy(what, policy, name="on_nonconvergence"):
    return check_choice(what, name, policy, NONCONVERGENCE_POLICIES)


def checks_enabled(policy) -> bool:
    """Whether the host-side checks run: not under "ignore", and not while torch.compile traces (no data there)."""
    return policy != "ignore" and not torch.compiler.is_compiling()


def enforce_convergence(what, converged, values, policy, *, tol, max_iter, inputs=None, quantity="residual",
                        advice="", warning=NonConvergenceWarning, stacklevel=3):
    """Applies the policy to one solve's per-sample `converged` (bool) and `values` (residuals or estimates).

    inputs: name -> tensor, scanned (only when something did not converge) to name a non-finite one.
    """
    if not checks_enabled(policy) or converged.numel() == 0 or bool(converged.all()):
        return
    bad = [name for name, t in (inputs or {}).items() if t is not None and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"deqkern.{what}: {' and '.join(bad)} contain NaN or Inf")
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        samples = (~finite).nonzero().flatten()[:8].tolist()
        raise FloatingPointError(
            f"deqkern.{what}: the iteration overflowed to NaN/Inf for samples {samples}"
            + (f"; {advice}" if advice else "")
        )
    n_bad = int((~converged).sum())
    message = (f"deqkern.{what}: {n_bad} of {converged.numel()} samples did not converge: they did not reach "
               f"tol={tol:g} within max_iter={max_iter} (largest {quantity} {float(values.abs().max()):.3e})"
               + (f"; {advice}" if advice else ""))
    if policy == "raise":
        raise NonConvergenceError(message)
    warnings.warn(message, warning, stacklevel=stacklevel + 1)

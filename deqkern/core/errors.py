"""The exceptions and warnings of every deqkern solver (fixed-point solves, power iterations, Jacobian tools)."""


class NonConvergenceError(RuntimeError):
    """A solve or an iteration stopped at max_iter with some samples above tol (on_nonconvergence="raise")."""


class NonConvergenceWarning(RuntimeWarning):
    """A solve or an iteration stopped at max_iter with some samples above tol (on_nonconvergence="warn")."""


class PowerIterationWarning(NonConvergenceWarning):
    """A power iteration stopped at max_iter before its value settled to tol: the value is a lower bound."""


class SkippedGradientWarning(RuntimeWarning):
    """An implicit backward gave a non-finite adjoint (an overflow, or NaN/Inf arriving in the incoming gradient) and
    on_backward_overflow="skip" replaced that solve's gradients by zeros (info.backward.gradient_skipped is True):
    skip the optimiser step for this batch."""

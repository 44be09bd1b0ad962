"""The exceptions and warnings of every deqkern solver (fixed-point solves, power iterations, Jacobian tools)."""


class NonConvergenceError(RuntimeError):
    """A solve or an iteration stopped at max_iter with some samples above tol (on_nonconvergence="raise")."""


class NonConvergenceWarning(RuntimeWarning):
    """A solve or an iteration stopped at max_iter with some samples above tol (on_nonconvergence="warn")."""


class PowerIterationWarning(NonConvergenceWarning):
    """A power iteration stopped at max_iter before its value settled to tol: the value is a lower bound."""

"""The solver options dict every certified layer keeps (`layer.solver_options`) and passes to
`deqkern.fixed_point_dense`, built and trimmed in one place."""


def solver_options(activation, alpha, tol, max_iter, backend, on_nonconvergence, backward_tol, backward_max_iter,
                   method="picard", m=5, beta=1.0, on_backward_overflow="raise"):
    """The keyword arguments of `fixed_point_dense` a certified layer fixes at construction."""
    return dict(activation=activation, alpha=alpha, tol=tol, max_iter=max_iter, backend=backend,
                on_nonconvergence=on_nonconvergence, backward_tol=backward_tol, backward_max_iter=backward_max_iter,
                method=method, m=m, beta=beta, on_backward_overflow=on_backward_overflow)


def without(options, *keys):
    """A copy of `options` less `keys` (for a callee that does not take them)."""
    return {k: v for k, v in options.items() if k not in keys}

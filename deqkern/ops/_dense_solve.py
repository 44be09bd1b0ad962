"""What the two dense solve ops (fixed_point_dense, fixed_point_dense_anderson) register alike: the fake kernels of
a solve `op`(W, c, z0, activation, *options) and of its implicit backward `op`_backward(W, c, z, grad_z, activation,
*options, jacobian_penalty), and their backends."""
import torch

from ..core.backends import register_kernel_backends
from ..core.dtypes import accumulation_dtype


def fake_solve_outputs(x_like, batch_like):
    """(x, iterations int32, residual in the accumulation dtype, converged bool) of a dense solve, metadata only."""
    batch = batch_like.shape[0]
    return (
        torch.empty_like(x_like, memory_format=torch.contiguous_format),
        batch_like.new_empty(batch, dtype=torch.int32),
        batch_like.new_empty(batch, dtype=accumulation_dtype(batch_like.dtype)),
        batch_like.new_empty(batch, dtype=torch.bool),
    )


def fake_penalty_outputs(W, batch_like, jacobian_penalty):
    """A backward's Jacobian penalty outputs, metadata only: its row term (d,) in W's dtype and its value (0-dim) in
    the accumulation dtype, or (0,) each without a penalty (deqkern/reference/common.py: with_jacobian_penalty)."""
    if jacobian_penalty == 0:
        return W.new_empty(0), batch_like.new_empty(0, dtype=accumulation_dtype(W.dtype))
    return W.new_empty(W.shape[0]), batch_like.new_empty((), dtype=accumulation_dtype(W.dtype))


def register_dense_solve(op, reference, backward_reference, check_options=lambda *options: None):
    """Fake kernels and backends of the dense solve `op` and of `op`_backward."""

    @torch.library.register_fake(f"deqkern::{op}")
    def _forward_fake(W, c, z0, activation, *options):
        torch._check(W.dim() == 2 and W.shape[0] == W.shape[1], lambda: "W must be square")
        torch._check(c.shape == z0.shape, lambda: "c and z0 must have the same shape")
        check_options(*options)
        return fake_solve_outputs(z0, c)

    # the backward's options, jacobian_penalty last (a caller may leave it out: it defaults to 0)
    n_options = len(getattr(torch.ops.deqkern, f"{op}_backward").default._schema.arguments) - 5

    @torch.library.register_fake(f"deqkern::{op}_backward")
    def _backward_fake(W, c, z, grad_z, activation, *options):
        *options, jacobian_penalty = options if len(options) == n_options else (*options, 0.0)
        torch._check(z.shape == grad_z.shape, lambda: "z and grad_z must have the same shape")
        check_options(*options)
        return (*fake_solve_outputs(grad_z, c), *fake_penalty_outputs(W, c, jacobian_penalty))

    register_kernel_backends(op, reference, triton_module=op)
    register_kernel_backends(f"{op}_backward", backward_reference, triton_module=op)

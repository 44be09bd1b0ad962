"""power_iteration: fake kernel and backends of the batched power iteration (schema:
csrc/power_iteration/power_iteration.cpp; public functions: deqkern/lipschitz/matrix_norms.py)."""
import torch

from ..core.backends import register_kernel_backends
from ..reference import power_iteration_ref


@torch.library.register_fake("deqkern::power_iteration")
def _power_iteration_fake(W, row_scale, u0, mode, shift, max_iter, tol):
    torch._check(W.dim() == 2, lambda: f"W must be (m, n), got {tuple(W.shape)}")
    torch._check(u0.dim() == 2 and u0.shape[1] == W.shape[1], lambda: f"u0 must be (batch, {W.shape[1]})")
    torch._check(mode != "symmetric" or W.shape[0] == W.shape[1], lambda: "mode 'symmetric' needs a square W")
    batch = u0.shape[0]
    return (
        u0.new_empty(batch),
        torch.empty_like(u0, memory_format=torch.contiguous_format),
        u0.new_empty(batch, dtype=torch.int32),
        u0.new_empty(batch, dtype=torch.bool),
    )


register_kernel_backends("power_iteration", power_iteration_ref, triton_module="power_iteration")

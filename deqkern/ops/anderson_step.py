"""anderson_step: fake kernel and backends of one Anderson iteration of deqkern.solve (schema:
csrc/anderson_step/anderson_step.cpp; the driver loop that calls it once per iteration: deqkern/solvers/generic.py)."""
import torch

from ..core.backends import register_kernel_backends
from ..reference import anderson_step_ref


@torch.library.register_fake("deqkern::anderson_step")
def _anderson_step_fake(X_hist, G_hist, H, x, fx, x_next, z_best, residual_best, residual, active, iterations,
                        k, beta, lam, tol):
    torch._check(X_hist.dim() == 3 and G_hist.shape == X_hist.shape, lambda: "X_hist, G_hist must be (B, m, n)")
    torch._check(H.shape == (X_hist.shape[0], X_hist.shape[1], X_hist.shape[1]), lambda: "H must be (B, m, m)")
    torch._check(x.shape == fx.shape == x_next.shape == z_best.shape, lambda: "x, fx, x_next, z_best: (B, n)")
    return None


register_kernel_backends("anderson_step", anderson_step_ref, triton_module="anderson_step")

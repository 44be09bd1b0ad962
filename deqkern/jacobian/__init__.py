"""Jacobian diagnostics and regularisation of an implicit layer at its fixed point.

- `jacobian_reg(f, z, x)`: the Hutchinson estimate of ||J_f(z)||_F^2 / z.numel() used as a training penalty
  (Bai, Kolter & Koltun 2021, "Stabilizing Equilibrium Models by Jacobian Regularization"); differentiable.
- `dense_jacobian_frobenius_sq(layer_or_W, z, c)`: the same quantity in closed form for the dense layer
  f(z) = act(z W^T + c), whose per-sample Jacobian is J_b = diag(act'(u_b)) W; differentiable.
- `jacobian_norm(layer_or_f, z, x, kind)`: per-sample spectral norm ||J_b||_2 or spectral radius rho(J_b)
  (the quantity that decides whether the Picard iteration z <- f(z) converges locally).

Conventions: z is (B, ...) and f treats the samples of a batch independently, so the Jacobian of the batch is
block diagonal with one block J_b per sample; J_b = d f(z, x)_b / d z_b at the given z (normally the fixed point).

Modules: regularization (jacobian_reg, dense_jacobian_frobenius_sq), norms (jacobian_norm), _layers (the checks
of z and the reading of a dense layer's W, c and activation, shared by both).
"""
# KINDS and PROBES (the accepted `kind` and `probe` values) stay reachable here, and out of `import *`, as before.
from .norms import KINDS, MAX_EXPLICIT_JACOBIAN, jacobian_norm  # noqa: F401
from .regularization import PROBES, dense_jacobian_frobenius_sq, jacobian_reg  # noqa: F401

__all__ = ["jacobian_reg", "dense_jacobian_frobenius_sq", "jacobian_norm", "MAX_EXPLICIT_JACOBIAN"]

"""Lipschitz constants and proven bounds: power iterations (the fused op on matrices, `gram_power_iteration` on
linear maps given as products), proven upper bounds of ||W||_2 and of a convolution's operator norm, one-sided
constants and l-infinity norms.

- matrix_norms.py: `power_iteration` (batched, one fused op), `spectral_norm`, `one_sided_l2`, `one_sided_linf`,
  `linf_norm`;
- spectral_bound.py: `spectral_norm_upper_bound` (a Cholesky proof of a Lanczos estimate);
- conv_norm.py: `conv_operator_norm` (a lower bound) and `conv_operator_norm_upper_bound` (proven) of a convolution
  as the linear map it is on a given input shape;
- common.py: what they share (options, result tuple, start vector, power-of-two scaling, `gram_power_iteration`).
"""
from ..core.errors import PowerIterationWarning
from .common import PowerIterationResult, gram_power_iteration
from .conv_norm import conv_operator_norm, conv_operator_norm_upper_bound
from .matrix_norms import MODES, linf_norm, one_sided_l2, one_sided_linf, power_iteration, spectral_norm
from .spectral_bound import SpectralBound, spectral_norm_upper_bound

__all__ = [
    "MODES",
    "PowerIterationResult",
    "PowerIterationWarning",
    "SpectralBound",
    "conv_operator_norm",
    "conv_operator_norm_upper_bound",
    "gram_power_iteration",
    "linf_norm",
    "one_sided_l2",
    "one_sided_linf",
    "power_iteration",
    "spectral_norm",
    "spectral_norm_upper_bound",
]

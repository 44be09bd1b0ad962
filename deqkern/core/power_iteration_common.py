"""What every power iteration of deqkern shares (deqkern.lipschitz's on matrices, deqkern.conv_norm's on
convolutions): the checks of its options, the result tuple, the deterministic default start vector, and the exact
power-of-two scaling that keeps float32 iterations of huge or tiny operators in range."""
import functools
from typing import NamedTuple

import torch

from . import validation


def check_iteration_options(what, max_iter, tol, name="max_iter"):
    """max_iter (under `name`) an integer >= 1, tol > 0."""
    validation.check_int(what, name, max_iter, 1)
    validation.check_positive(what, "tol", tol)


class PowerIterationResult(NamedTuple):
    """The result of a power iteration, a named tuple as PyTorch's own (torch.linalg.eigh):
    value: () or (B,); u: (n,) or (B, n) the last unit iterate (pass it back as u0 to warm-start; conv_operator_norm:
    of the input shape);
    iterations: int32; converged: bool; shift: the shift used (mode "symmetric").

    Unpacks as `value, u = result` (iteration yields those two); float(result) is float(result.value).
    """

    value: torch.Tensor
    u: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    shift: float = 0.0

    def __iter__(self):
        return iter((self.value, self.u))

    def __float__(self):
        return float(self.value)


@functools.lru_cache(maxsize=64)
def default_start(n, dtype, device):
    """ones / sqrt(n) plus a fixed non-constant perturbation, so that it is not orthogonal to the top vector of
    common structured matrices (zero row sums, alternating signs); deterministic."""
    j = torch.arange(n, dtype=torch.float64)
    u = 1.0 + 0.5 * torch.cos(2.399963229728653 * j + 0.5)  # golden angle: no short period
    return (u / u.norm()).to(dtype=dtype, device=device)


def power_of_two_exponent(x, dim=None):
    """The exponents e with max|x| in [2^(e-1), 2^e) (over `dim`, or all of x): x * 2^-e is exact and its largest
    entry lies in [0.5, 1); e = 0 for a zero (or non-finite) x."""
    peak = x.abs().amax() if dim is None else x.abs().amax(dim=dim)
    exponent = torch.frexp(peak).exponent
    return torch.where(torch.isfinite(peak) & (peak > 0), exponent, torch.zeros_like(exponent))

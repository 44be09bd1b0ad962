"""What every power iteration of deqkern shares (the fused op's on matrices, and the one by products on linear maps
given as functions: convolutions, autograd Jacobians): the checks of its options, the result tuple, the deterministic
default start vector, the exact power-of-two scaling that keeps float32 iterations of huge or tiny operators in
range, and `gram_power_iteration` itself."""
import functools
from typing import NamedTuple

import torch

from ..core import validation


def check_iteration_options(what, max_iter, tol):
    """max_iter an integer >= 1, tol > 0."""
    validation.check_int(what, "max_iter", max_iter, 1)
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


def times_power_of_two(x, exponent):
    """x 2^exponent for an integer `exponent` tensor broadcastable to x, such as -power_of_two_exponent(x): what
    torch.ldexp(x, exponent) gives, as two multiplications by powers of two of x's dtype (the exponent split in
    halves, so that each factor is representable for every exponent power_of_two_exponent returns: float32's
    range spans 2^-149 to 2^128). Exact wherever the result and the intermediate are normal numbers; torch.ldexp
    computes 2^exponent per element, about 20x slower on a 512 x 512 matrix."""
    half = torch.div(exponent, 2, rounding_mode="floor")
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return x * torch.ldexp(one, half.to(x.dtype)) * torch.ldexp(one, (exponent - half).to(x.dtype))


def _unit_rows(v, previous):
    """v / ||v|| per row; a row whose norm is 0 or not finite keeps `previous` (the operator maps it to 0)."""
    norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    usable = (norm > 0) & torch.isfinite(norm)
    return torch.where(usable, v / torch.where(usable, norm, torch.ones_like(norm)), previous)


def gram_power_iteration(apply, adjoint, v, max_iter, tol):
    """The largest singular value of each of B linear maps A_b given as batched products, by power iteration on
    A_b^T A_b: apply(v) = A v (B, m) and adjoint(w) = A^T w (B, n), rows independent (a convolution and its
    transpose, autograd's Jacobian-vector and vector-Jacobian products). v: (B, n) nonzero starts.

    The stop rule of the fused op's "gram" mode (deqkern/reference/power_iteration.py): value_k = ||A_b v_k|| of the
    k-th unit iterate (a lower bound of ||A_b||_2 that rises to it); a sample stops once |value_k - value_{k-1}| <=
    tol value_k (converged) or value_k is not finite, and is frozen from then on; an iterate mapped to 0 is kept
    (value 0). One host read per iteration ("all stopped?"). Call it under torch.no_grad.
    Returns (value (B,), v (B, n) the last unit iterates, iterations (B,) int32, converged (B,) bool)."""
    batch = v.shape[0]
    v = _unit_rows(v, v)
    value = torch.full((batch,), float("nan"), dtype=v.dtype, device=v.device)
    active = torch.ones(batch, dtype=torch.bool, device=v.device)
    converged = torch.zeros_like(active)
    iterations = torch.zeros(batch, dtype=torch.int32, device=v.device)
    for k in range(1, max_iter + 1):
        w = apply(v)
        estimate = torch.linalg.vector_norm(w, dim=1)
        settled = (estimate - value).abs() <= tol * estimate.abs()  # False at k = 1 (value is NaN)
        converged = torch.where(active, settled, converged)
        value = torch.where(active, estimate, value)
        iterations = torch.where(active, torch.full_like(iterations, k), iterations)
        v = torch.where(active[:, None], _unit_rows(adjoint(w), v), v)
        active = active & ~settled & torch.isfinite(estimate)
        if not bool(active.any()):
            break
    return value, v, iterations, converged

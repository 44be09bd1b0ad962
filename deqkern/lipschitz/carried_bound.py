"""A proof of ||W||_2 carried forward from an earlier one with no factorisation: ||W||_2 <= sigma_bar(W0) +
||W - W0||_F, rounded up. What lets LipschitzDEQ skip the Gram matrix and the Cholesky factorisation of
`spectral_bound.py` while its weight has moved little since its last proof."""
import math
from typing import NamedTuple, Tuple

import torch


@torch.no_grad()
def carried_spectral_bound(W: torch.Tensor, proven_at: torch.Tensor, proven_bound: torch.Tensor) -> torch.Tensor:
    """A certified upper bound of ||W||_2 carried forward from an earlier proof, with no factorisation: W0 =
    `proven_at` with ||W0||_2 <= `proven_bound` gives ||W||_2 <= ||W0||_2 + ||W - W0||_2 <= proven_bound + ||W -
    W0||_F (0-dim float64, no host read; inf or NaN when W is not finite, so that no comparison accepts it). What lets
    a layer skip the Gram matrix and the Cholesky factorisation while its weight has moved little since the last
    proof: O(mn) instead of O(mn min(m, n)).

    Rounded up, in W's dtype where W0 has it and it is float32 or float64 (else in float64): the difference's
    entries are each within one rounding u of their exact values (|fl(a - b) - (a - b)| <= u |a - b|), the sum of
    their N squares (one BLAS dot product: 4x faster than vector_norm at 256 x 256, which is slower still summing in
    float64) within gamma_{N+2} = (N + 2) u / (1 - (N + 2) u) of its exact value in any order of summation (Higham,
    Accuracy and Stability, eq. 3.5), plus the smallest normal number per square and per difference that underflows
    (what each loses, denormals flushed to zero or not). A float32
    sum whose gamma would exceed 10% (above 1.6e6 entries: 0.1% of sigma_bar at most, the carried drift being
    within a 1% budget) is made in float64."""
    square_sum, rounding = carried_square_sum(W, proven_at)
    return rounding.bound(square_sum, proven_bound.double())


class CarriedRounding(NamedTuple):
    """How the carried bound rounds up the sum of squares of W - W0 it was computed from (see
    carried_spectral_bound): the arithmetic of `bound` is the same IEEE double arithmetic on 0-dim float64 tensors
    (no host read) and on Python floats (for a layer that reads the sum once with its other host values)."""

    count: int
    unit: float  # the unit roundoff u of the dtype the difference and its squares were formed in
    tiny: float  # that dtype's smallest normal number

    def bound(self, square_sum, proven_bound):
        """proven_bound + ||W - W0||_F, rounded up, from the computed sum of squares."""
        count, unit, tiny = self.count, self.unit, self.tiny
        gamma = (count + 2) * unit / (1.0 - (count + 2) * unit)
        eps = torch.finfo(torch.float64).eps
        # a square or a difference below the normal range loses less than the smallest normal number, even with
        # denormals flushed to zero (torch.set_flush_denormal)
        widened = square_sum * ((1.0 + gamma) * (1.0 + unit) ** 2 * (1.0 + 4.0 * eps)) + count * tiny
        root = math.sqrt(widened) if isinstance(widened, float) else widened.sqrt()
        return (proven_bound + (root + math.sqrt(count) * tiny) * (1.0 + 4.0 * eps)) * (1.0 + 4.0 * eps)


def carried_square_sum(W: torch.Tensor, proven_at: torch.Tensor) -> Tuple[torch.Tensor, CarriedRounding]:
    """The sum of squares of W - W0 (0-dim, float64, no host read) as carried_spectral_bound forms it, and how to
    round it up."""
    W, proven_at = W.detach(), proven_at.detach()
    dtype = W.dtype if W.dtype == proven_at.dtype and W.dtype in (torch.float32, torch.float64) else torch.float64
    count = W.numel()
    if dtype == torch.float32 and (count + 2) * 2.0**-24 > 0.1:
        dtype = torch.float64
    info = torch.finfo(dtype)
    difference = (W.to(dtype) - proven_at.to(dtype)).reshape(-1)
    square_sum = torch.dot(difference, difference).double()
    return square_sum, CarriedRounding(count, info.eps / 2, info.smallest_normal)

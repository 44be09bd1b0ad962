"""The iteration-count maths of the certificates: how many steps a geometric error bound needs to reach tol."""
import math
from typing import Optional


def geometric_steps_to_tol(q: float, a: float, tol: float) -> int:
    """Smallest integer k >= 1 with q**(k - 1) * a <= tol (0 <= q < 1, a > 0)."""
    if a <= tol:
        return 1
    if q <= 0.0:
        return 2
    k = 1 + max(0, math.ceil(math.log(tol / a) / math.log(q)))
    while k > 1 and q ** (k - 2) * a <= tol:  # guard the rounding of log/ceil in both directions
        k -= 1
    while q ** (k - 1) * a > tol:
        k += 1
    return k


def picard_iteration_bound(q: float, tol: float) -> Optional[int]:
    """Iterations (layer evaluations) after which a deqkern solve of a q-contraction started at 0 has stopped.

    For z_k = T(z_{k-1}), z_0 = 0, T a q-contraction (q < 1) in a norm ||.|| with fixed point z*:
    ||z_k - z*|| <= q^k ||z*||, so ||z_k - z_{k-1}|| <= (q^k + q^(k-1)) ||z*|| and ||z_k|| >= (1 - q^k) ||z*||.
    Evaluation k reports r_k = ||z_k - z_{k-1}|| / (||z_k|| + 1e-12) <= q^(k-1) (1 + q) / (1 - q^k), and the solve
    stops at the first k with r_k <= tol; this returns the smallest k with q^(k-1) (1 + q) / (1 - q^k) <= tol,
    i.e. q^(k-1) (1 + q + tol q) <= tol. In exact arithmetic; None when q >= 1 (no bound).
    """
    if not (0.0 <= q < 1.0) or not tol > 0:
        return None
    return geometric_steps_to_tol(q, 1.0 + q + tol * q, tol)

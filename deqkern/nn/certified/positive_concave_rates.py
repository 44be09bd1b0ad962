"""The per-sample rates a positive concave DEQ can prove, for any nonnegative linear part (a dense W >= 0 or a
convolution with a kernel K >= 0): the certificate(x) computation of PositiveConcaveDEQ and PositiveConcaveConvDEQ.

T(z) = act(L z + c) with L a nonnegative linear map, act positive, concave, nondecreasing and bounded by sup on
[0, inf), c > 0 (>= 0 for sigmoid). Every quantity is per sample (dim 0), the minima and maxima run over the rest.

- The theorem's rate (Piotrowski and Cavalcante 2022, "The fixed point iteration of positive concave mappings
  converges geometrically if a fixed point exists"): with delta = min_i T(0)_i / z*_i, concavity gives
  T(lambda z*) >= (lambda + (1 - lambda) delta) z*, so from z0 = 0: 0 <= z* - z_k <= q^k z* with q = 1 - delta.
  z* is replaced by zbar = T^K(sup 1), the iteration from above (T is monotone and T(sup 1) <= sup 1, so it
  decreases to z* and bounds it after any K): q is proven, and tends to the theorem's sharpest as K grows.
- The tail rate: for k >= j, e_k = z* - z_k >= 0 satisfies e_(k+1) <= J_j e_k with J_j = diag(act'(L z_j + c)) L
  >= 0 (concavity: act(b) - act(a) <= act'(a) (b - a) for b >= a; act' is nonincreasing while the iterates
  increase). For any v > 0, ||e_(k+1)||_v <= q_j ||e_k||_v with ||e||_v = max_i e_i / v_i and
  q_j = max_i (J_j v)_i / v_i (Collatz-Wielandt; v close to a Perron vector of J_j makes q_j its spectral radius).
  With e_j <= zbar - z_j, the solver's step ||z_k - z_(k-1)||_2 <= ||e_(k-1)||_2 <= ||v||_2 ||e_(k-1)||_v and
  ||z_k||_2 >= ||z_max(j,1)||_2: the solve has stopped by the first k > j with
  ||v||_2 q_j^(k-1-j) ||zbar - z_j||_v <= tol ||z_max(j,1)||_2. The best over the steps j in TAIL_STEPS.
- The iteration bound: the smaller of the theorem's (smallest k with q^(k-1) (1 + tol q) <= tol, from the
  monotone error bound and the relative stop rule) and the tail bound; -1 where neither proves anything.
- The measured rate: the geometric mean contraction (e_k / e_0)^(1/k) of the error of the plain iteration from 0
  against its limit, at the last k with e_k > 1e-10 ||z*||_inf (float64).
All in exact arithmetic: zbar is inflated by 1e-12 for the rounding of its steps.
"""
import math
from typing import Callable, NamedTuple

import torch

from ...activations import get_activation
from .bounds import geometric_steps_to_tol

TAIL_STEPS = (0, 1, 2, 3, 5, 8, 13, 21, 34)  # the steps j after which a tail rate is proven
PERRON_STEPS = 100
_NO_BOUND = 2 ** 62


class PositiveConcaveRates(NamedTuple):
    sample_rate_bound: torch.Tensor         # the theorem's q per sample (float64)
    tail_rate_bound: torch.Tensor           # q_j at the step j of the best tail bound (1 where none)
    tail_rate_from_step: torch.Tensor       # that j (int64)
    forward_iterations_bound: torch.Tensor  # int64, -1 where nothing is proven
    measured_rate: torch.Tensor             # float64
    tail_norm_weights: torch.Tensor         # v (c's shape): the tail rate holds in ||e||_v = max_i |e_i| / v_i


def _per_sample_max(t):
    return t.flatten(1).amax(dim=1)


def _per_sample_min(t):
    return t.flatten(1).amin(dim=1)


def positive_concave_rates(linear: Callable[[torch.Tensor], torch.Tensor], c: torch.Tensor, activation: str,
                           sup: float, tol: float, max_iter: int) -> PositiveConcaveRates:
    """The rates and bounds above for T(z) = act(linear(z) + c), c (batch, ...) in float64, `linear` a
    nonnegative linear map on tensors of c's shape, sup = sup(act) on [0, inf), the layer's tol and max_iter."""
    act_fns = get_activation(activation)
    act, derivative = act_fns.fn, act_fns.derivative

    def step(z):
        return act(linear(z) + c)

    z_upper = torch.full_like(c, sup)
    for _ in range(max_iter):  # the iteration from above, stopped once it no longer moves
        nxt = step(z_upper)
        moved = (z_upper - nxt).abs().max() > 1e-13 * z_upper.abs().max()
        z_upper = torch.minimum(nxt, z_upper)  # monotone in exact arithmetic: keep it so under rounding
        if not bool(moved):
            break
    z_upper = z_upper * (1 + 1e-12)
    t0 = act(c)
    rate = (1.0 - _per_sample_min(t0 / z_upper)).clamp(0, 1)
    theorem = torch.tensor([geometric_steps_to_tol(q, 1.0 + tol * q, tol) if q < 1 else _NO_BOUND
                            for q in rate.tolist()], dtype=torch.int64)
    tail, tail_rate, tail_step, tail_weights = _tail_bound(act, linear, derivative, c, z_upper, tol, max_iter)
    bound = torch.minimum(theorem, tail)
    return PositiveConcaveRates(rate, tail_rate, tail_step, torch.where(bound == _NO_BOUND, -1, bound),
                                _measured_rate(step, c, max_iter), tail_weights)


def _tail_bound(act, linear, derivative, c, z_upper, tol, max_iter):
    batch = c.shape[0]
    best = torch.full((batch,), _NO_BOUND, dtype=torch.int64)
    best_rate = torch.ones(batch, dtype=torch.float64)
    best_step = torch.zeros(batch, dtype=torch.int64)
    best_weights = torch.ones_like(c)
    tiny = torch.finfo(c.dtype).tiny
    z = torch.zeros_like(c)
    z_first = act(c)  # z_1 = T(0)
    for j in range(min(max(TAIL_STEPS), max_iter) + 1):
        u = linear(z) + c  # the iterate's pre-activation: J_j's diagonal, and the next iterate act(u)
        if j in TAIL_STEPS:
            s = derivative(u)
            v = z_upper.clone()  # a positive start; power iteration on the nonnegative J_j
            for _ in range(PERRON_STEPS):
                v = s * linear(v)
                v = v / _per_sample_max(v).clamp_min(tiny).reshape(-1, *([1] * (v.dim() - 1)))
            v = v + 1e-6  # strictly positive: any v > 0 proves, this one is nearly the Perron vector
            q = _per_sample_max(s * linear(v) / v)
            err = _per_sample_max((z_upper - z).clamp_min(0) / v)
            floor = (z if j >= 1 else z_first).flatten(1).norm(dim=1)
            need = tol * floor / (v.flatten(1).norm(dim=1) * err).clamp_min(tiny)
            for b, (qb, nb) in enumerate(zip(q.tolist(), need.tolist())):
                if nb >= 1.0:
                    k = j + 1
                elif 0.0 < qb < 1.0 and nb > 0.0:
                    k = j + 1 + math.ceil(math.log(nb) / math.log(qb))
                elif qb == 0.0:
                    k = j + 2
                else:
                    continue
                if k < best[b]:
                    best[b], best_rate[b], best_step[b], best_weights[b] = k, qb, j, v[b]
        z = act(u)
    return best, best_rate, best_step, best_weights


def _measured_rate(step, c, max_iter):
    """(e_k / e_0)^(1/k) per sample; the limit is found first, so that no iterate is stored."""
    cap = 20 * max_iter
    z_star = torch.zeros_like(c)
    for _ in range(cap):
        nxt = step(z_star)
        done = bool((_per_sample_max((nxt - z_star).abs()) <= 1e-15 * _per_sample_max(nxt.abs())).all())
        z_star = nxt
        if done:
            break
    e0 = _per_sample_max(z_star.abs())
    last_k, last_e = torch.zeros_like(e0), e0.clone()
    z = torch.zeros_like(c)
    for k in range(1, cap + 1):
        z = step(z)
        e = _per_sample_max((z_star - z).abs())
        above = e > 1e-10 * e0
        if not bool(above.any()):
            break
        last_k = torch.where(above, float(k), last_k)
        last_e = torch.where(above, e, last_e)
    tiny = torch.finfo(e0.dtype).tiny
    ratio = (last_e / e0.clamp_min(tiny)).clamp_min(tiny)
    return torch.where(last_k > 0, ratio ** (1.0 / last_k.clamp_min(1)), torch.zeros_like(e0))

"""A certified upper bound of ||W||_2 from a power-iteration estimate (public as
deqkern.lipschitz.spectral_norm_upper_bound): what lets a LipschitzDEQ keep ||W||_2 <= gamma / Lip(act) at every
training step, not only once its power iteration has converged.

A power iteration gives a lower bound sigma_est of ||W||_2 and nothing above it. The upper bound here is a
proof: t >= lambda_max(W^T W) exactly when t I - W^T W is positive semidefinite, and a Cholesky factorisation
that completes proves that (Rump 2006, "Verification of positive definiteness", with the rounding shift below).
So t = (sigma_est (1 + delta))^2 is tried for a ladder of deltas, smallest first, and the first that factorises
gives sigma_bar = sigma_est (1 + delta) >= ||W||_2. When the estimate is more than 1% low (a first step from a
random vector, a large optimiser step), the bound falls back to ||(W^T W)^k||_F^(1 / 2k), k = 2^SQUARINGS: always
valid (lambda_max^k <= ||G^k||_F), at most rank^(1 / 4k) above ||W||_2 (1.0068 for rank 1024, equal singular
values; with a gap at the top it is far tighter: 1 + 1e-9 on 128 x 128 Gaussian matrices).
"""
from typing import NamedTuple

import torch

# Relative slack tried above the estimate, smallest first: a converged estimate certifies within 1e-8.
CERTIFICATE_LADDER = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2)
SQUARINGS = 8


class SpectralBound(NamedTuple):
    """value: sigma_bar >= ||W||_2 (0-dim float64, no grad); method: "cholesky" (value = estimate (1 + slack),
    proven by a Cholesky factorisation), "squaring" (the fallback) or "zero" (W = 0, value 0 exactly)."""

    value: torch.Tensor
    method: str
    slack: float


def _rounding_shift(m: int, n: int, t: torch.Tensor, frobenius_sq: torch.Tensor) -> torch.Tensor:
    """The shift c with: fl-Cholesky of (t - c) I - fl(G) completes => lambda_max(G) < t, in float64 (n x n Gram
    of inner size m). It covers forming G (|fl(G) - G| <= gamma_m |V|^T |V|, so ||fl(G) - G||_2 <= gamma_m
    ||V||_F^2) and the Cholesky itself (Rump 2006: completing on A - c' I with c' about gamma_{n+1} tr(A), here
    tr(A) <= n t, proves A positive definite). Taken 4x generously: 4 (m + n + 2) eps (n t + ||V||_F^2).
    Underflow is not covered (entries near 1e-300)."""
    eps = torch.finfo(torch.float64).eps
    return 4.0 * (m + n + 2) * eps * (n * t + frobenius_sq)


def _squaring_bound(G: torch.Tensor) -> torch.Tensor:
    """||G^k||_F^(1/2k) for k = 2^SQUARINGS, kept in range by normalising each square (log domain)."""
    log_scale = torch.zeros((), dtype=G.dtype, device=G.device)
    A = G
    for _ in range(SQUARINGS):
        norm = torch.linalg.matrix_norm(A)
        log_scale = 2.0 * (log_scale + torch.log(norm))
        A = A / norm
        A = A @ A
    log_scale = log_scale + torch.log(torch.linalg.matrix_norm(A))
    # ||G^k||_F = exp(log_scale), k = 2^SQUARINGS; sigma^2k <= that, so sigma <= exp(log_scale / 2k).
    return torch.exp(log_scale / (2 ** (SQUARINGS + 1))) * (1.0 + 1e-9)  # 1e-9: rounding of the squarings


@torch.no_grad()
def spectral_norm_upper_bound(W: torch.Tensor, sigma_estimate) -> SpectralBound:
    """A certified sigma_bar >= ||W||_2 for W (m, n), from any estimate (a float or 0-dim tensor, ideally the
    power iteration's lower bound). Computed in float64. The slacks are tried smallest first and the first proof
    ends the search (one Cholesky of the smaller Gram matrix and one host synchronisation each, so a converged
    estimate costs one). Raises FloatingPointError when W is not finite."""
    V = W.detach().double()
    G = V.T @ V if V.shape[0] >= V.shape[1] else V @ V.T
    G = 0.5 * (G + G.T)
    n, m = G.shape[0], max(V.shape)
    frobenius_sq = G.diagonal().sum()
    finite, zero = torch.stack([torch.isfinite(frobenius_sq), frobenius_sq == 0]).tolist()
    if not finite:
        raise FloatingPointError("deqkern.spectral_norm_upper_bound: the weight has NaN or Inf entries")
    if zero:
        return SpectralBound(frobenius_sq.new_zeros(()), "zero", 0.0)
    estimate = torch.as_tensor(sigma_estimate, dtype=torch.float64, device=G.device).detach().reshape(())
    eye = torch.eye(n, dtype=torch.float64, device=G.device)
    if bool(torch.isfinite(estimate) & (estimate > 0)):
        for slack in CERTIFICATE_LADDER:
            candidate = estimate * (1.0 + slack)
            t = candidate.square()
            factor, info = torch.linalg.cholesky_ex((t - _rounding_shift(m, n, t, frobenius_sq)) * eye - G)
            if bool((info == 0) & torch.isfinite(factor).all()):
                return SpectralBound(candidate, "cholesky", slack)
    return SpectralBound(_squaring_bound(G), "squaring", float("nan"))

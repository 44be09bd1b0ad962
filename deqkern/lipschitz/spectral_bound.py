"""A certified upper bound of ||W||_2 from a power-iteration estimate (public as
deqkern.lipschitz.spectral_norm_upper_bound): what lets a LipschitzDEQ keep ||W||_2 <= gamma / Lip(act) at every
training step, not only once its power iteration has converged.

A power iteration gives a lower bound sigma_est of ||W||_2 and nothing above it. The upper bound here is a proof: t
>= lambda_max(W^T W) exactly when t I - W^T W is positive semidefinite, and a Cholesky factorisation that completes
proves that (Rump 2006, "Verification of positive definiteness", with the rounding shift below). The estimate comes
from a short Lanczos run on the Gram matrix (warm-started from the power iteration's vector when there is one), far
sharper than a few power steps when the top singular values are close. Then t = (sigma_est (1 + delta))^2 is tried
for a ladder of deltas, smallest first, and the first that factorises gives sigma_bar = sigma_est (1 + delta) >=
||W||_2. When the estimate is more than 1% low, the bound falls back to ||(W^T W)^k||_F^(1 / 2k), k = 2^SQUARINGS:
always valid (lambda_max^k <= ||G^k||_F), at most rank^(1 / 4k) above ||W||_2 (1.0068 for rank 1024, equal singular
values; with a gap at the top it is far tighter: 1 + 1e-9 on 128 x 128 Gaussian matrices).
"""
from typing import NamedTuple, Optional

import torch

from .common import default_start

# Relative slack tried above the estimate, smallest first: a converged estimate certifies within 1e-8.
CERTIFICATE_LADDER = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2)
SQUARINGS = 8


class SpectralBound(NamedTuple):
    """value: sigma_bar >= ||W||_2 (0-dim float64, no grad); method: "cholesky" (value = estimate (1 + slack),
    proven by a Cholesky factorisation), "squaring" (the fallback) or "zero" (W = 0, value 0 exactly); vector: the
    Lanczos Ritz vector (unit, float64) of the smaller Gram matrix (W^T W when W has at least as many rows as
    columns: a right singular vector estimate), a better warm start than the power iteration's."""

    value: torch.Tensor
    method: str
    slack: float
    vector: Optional[torch.Tensor] = None


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


def _lanczos_top(G: torch.Tensor, start: torch.Tensor, steps: int):
    """(the largest Ritz value, its unit Ritz vector) of `steps` Lanczos steps on the symmetric G from `start` (full
    reorthogonalisation, float64): an estimate of lambda_max(G) and of its eigenvector that a few dozen matrix-
    vector products make far closer than as many power steps when the top eigenvalues are close (Chebyshev
    acceleration). Only an estimate: the proof is the Cholesky factorisation that follows, which a wrong estimate
    cannot fool."""
    n = G.shape[0]
    steps = max(1, min(steps, n))
    Q = G.new_zeros(steps, n)
    alphas, betas = G.new_zeros(steps), G.new_zeros(steps)
    q = start / torch.linalg.vector_norm(start).clamp_min(torch.finfo(G.dtype).tiny)
    # an invariant subspace is found when the new direction is rounding noise: from there on q = 0 (the remaining
    # Ritz values are 0 <= lambda_max(G)), instead of amplified noise
    negligible = 1e-10 * torch.linalg.matrix_norm(G)
    for j in range(steps):
        Q[j] = q
        w = G @ q
        alphas[j] = q @ w
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)  # full reorthogonalisation (twice is enough)
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        betas[j] = torch.linalg.vector_norm(w)
        betas[j] = torch.where(betas[j] > negligible, betas[j], torch.zeros_like(betas[j]))
        q = torch.where(betas[j] > 0, w / betas[j].clamp_min(torch.finfo(G.dtype).tiny), torch.zeros_like(w))
    T = torch.diag(alphas) + torch.diag(betas[:-1], 1) + torch.diag(betas[:-1], -1)
    values, vectors = torch.linalg.eigh(T)
    ritz = Q.T @ vectors[:, -1]
    return values[-1], ritz / torch.linalg.vector_norm(ritz).clamp_min(torch.finfo(G.dtype).tiny)


LANCZOS_STEPS = 24


@torch.no_grad()
def spectral_norm_upper_bound(W: torch.Tensor, sigma_estimate=None, start: Optional[torch.Tensor] = None
                              ) -> SpectralBound:
    """A certified sigma_bar >= ||W||_2 for W (m, n). Computed in float64. The estimate proven is the larger of
    `sigma_estimate` (a float or 0-dim tensor, e.g. a power iteration's lower bound; optional) and the square root
    of the top Ritz value of LANCZOS_STEPS Lanczos steps on the smaller Gram matrix from `start` (a vector of its
    size, e.g. the power iteration's; default a fixed one). The slacks are tried smallest first and the first proof
    ends the search (one Cholesky and one host synchronisation each; a good estimate costs one). Raises
    FloatingPointError when W is not finite."""
    V = W.detach().double()
    tall = V.shape[0] >= V.shape[1]
    G = V.T @ V if tall else V @ V.T
    G = 0.5 * (G + G.T)
    n, m = G.shape[0], max(V.shape)
    frobenius_sq = G.diagonal().sum()
    finite, zero = torch.stack([torch.isfinite(frobenius_sq), frobenius_sq == 0]).tolist()
    if not finite:
        raise FloatingPointError("deqkern.spectral_norm_upper_bound: the weight has NaN or Inf entries")
    if zero:
        return SpectralBound(frobenius_sq.new_zeros(()), "zero", 0.0, None)
    if start is None or start.numel() != n:
        start = default_start(n, torch.float64, G.device)
    ritz, vector = _lanczos_top(G, start.detach().double().reshape(n), LANCZOS_STEPS)
    estimate = ritz.clamp_min(0).sqrt()
    if sigma_estimate is not None:
        given = torch.as_tensor(sigma_estimate, dtype=torch.float64, device=G.device).detach().reshape(())
        estimate = torch.where(torch.isfinite(given), torch.maximum(estimate, given), estimate)
    if bool(torch.isfinite(estimate) & (estimate > 0)):
        for slack in CERTIFICATE_LADDER:
            candidate = estimate * (1.0 + slack)
            t = candidate.square()
            trial = -G
            trial.diagonal().add_(t - _rounding_shift(m, n, t, frobenius_sq))
            factor, info = torch.linalg.cholesky_ex(trial)
            if bool((info == 0) & torch.isfinite(factor).all()):
                return SpectralBound(candidate, "cholesky", slack, vector)
    return SpectralBound(_squaring_bound(G), "squaring", float("nan"), vector)

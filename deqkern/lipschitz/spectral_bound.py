"""A certified upper bound of ||W||_2 from a power-iteration estimate (public as
deqkern.lipschitz.spectral_norm_upper_bound): what lets a LipschitzDEQ keep ||W||_2 <= gamma / Lip(act) at every
training step, not only once its power iteration has converged.

A power iteration gives a lower bound sigma_est of ||W||_2 and nothing above it. The upper bound here is a proof: t
>= lambda_max(W^T W) exactly when t I - W^T W is positive semidefinite, and a Cholesky factorisation that completes
proves that (Rump 2006, "Verification of positive definiteness", with the rounding shift below). The estimate comes
from a short Lanczos run on the Gram matrix (warm-started from the power iteration's vector when there is one; up to
EXACT_EIGEN_MAX columns, its exact top eigenpair by LAPACK instead), or, given the Ritz block of an earlier proof,
from one block power step and a Rayleigh-Ritz projection: far sharper than a few power steps when the top singular
values are close. Then t = (sigma_est (1 + delta))^2 is tried for a ladder of deltas, smallest first, and the first
that factorises (blocked from BLOCKED_CHOLESKY_MIN rows) gives sigma_bar = sigma_est (1 + delta) >= ||W||_2. When the
estimate is more than 1% low, the bound falls back to ||(W^T W)^k||_F^(1 / 2k), k = 2^SQUARINGS: always valid
(lambda_max^k <= ||G^k||_F), at most rank^(1 / 4k) above ||W||_2 (1.0068 for rank 1024, equal singular values; with
a gap at the top it is far tighter: 1 + 1e-9 on 128 x 128 Gaussian matrices). Between proofs, one can be carried:
sigma_bar(W0) + ||W - W0||_F bounds ||W||_2 with no factorisation (`carried_bound.py`).
"""
import math
import os
from typing import NamedTuple, Optional, Tuple

import torch

from .common import default_start

# Relative slack tried above the estimate, smallest first: a converged estimate certifies within 1e-8.
CERTIFICATE_LADDER = (1e-8, 1e-6, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
SQUARINGS = 8
# A warm block of this many vectors (a layer keeps it between its proofs) gives the estimate in one block power step
# and a Rayleigh-Ritz projection: measured under Adam's steps (d = 64 to 512) 1e-3 to 1e-5 relatively low, as good as
# the 24 Lanczos steps at 128 and 256, in 0.06 to 0.27 ms against 0.65 to 1.2 ms (four small products against 77
# Python-level operations)
RITZ_BLOCK = 16


class SpectralBound(NamedTuple):
    """value: sigma_bar >= ||W||_2 (0-dim float64, no grad); method: "cholesky" (value = estimate (1 + slack),
    proven by a Cholesky factorisation), "squaring" (the fallback), "zero" (W = 0, value 0 exactly) or "carried" (an
    earlier proof plus the Frobenius norm of the change since, `carried_bound.py`); vector: the top Ritz
    vector of the estimate (Lanczos's, the Ritz block's, or up to EXACT_EIGEN_MAX rows the exact top eigenvector;
    unit, float64) of the smaller Gram matrix (W^T W when W has at least as many rows as columns: a right singular
    vector estimate), a better warm start than the power iteration's."""

    value: torch.Tensor
    method: str
    slack: float
    vector: Optional[torch.Tensor] = None
    ritz_block: Optional[torch.Tensor] = None  # the top Ritz vectors (n, k <= RITZ_BLOCK), best first: a warm block
    # the part of slack that a float32 Gram matrix's rounding bound adds (`float32_gram=True`; 0 in float64)
    gram_rounding: float = 0.0


def _rounding_shift(m: int, n: int, t: float, frobenius_sq: float) -> float:
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


def _lanczos_steps(G, q, steps, negligible=None):
    """(alphas, betas, Q) of `steps` Lanczos steps from the unit q, fully reorthogonalised (twice is enough). With
    `negligible`, a new direction shorter than it is rounding noise of an invariant subspace and becomes 0 (the
    remaining Ritz values are then 0 <= lambda_max); without, the test is left out (it is a third of the operations
    of a step, and on small matrices their launch is the cost)."""
    tiny = torch.finfo(G.dtype).tiny
    Q = G.new_zeros(steps, G.shape[0])
    alphas, betas = [], []
    for j in range(steps):
        Q[j] = q
        w = G @ q
        alphas.append(q @ w)
        basis = Q[: j + 1]
        w = w.addmv(basis.T, basis @ w, alpha=-1.0)
        w = w.addmv(basis.T, basis @ w, alpha=-1.0)
        beta = torch.linalg.vector_norm(w)
        if negligible is not None:
            beta = torch.where(beta > negligible, beta, torch.zeros_like(beta))
        betas.append(beta)
        q = w / beta.clamp_min(tiny) if negligible is None else torch.where(beta > 0, w / beta.clamp_min(tiny), 0.0)
    return torch.stack(alphas), torch.stack(betas), Q


def _lanczos_top(G: torch.Tensor, start: torch.Tensor, steps: int):
    """(the largest Ritz value, its unit Ritz vector, an estimate of the value's error, the top RITZ_BLOCK Ritz
    vectors (n, k <= RITZ_BLOCK), best first) of `steps` Lanczos steps on
    the symmetric G from `start` (full reorthogonalisation, float64): an estimate of lambda_max(G) and of its
    eigenvector that a few dozen matrix-vector products make far closer than as many power steps when the top
    eigenvalues are close (Chebyshev acceleration). Only an estimate: the proof is the Cholesky factorisation that
    follows, which a wrong estimate cannot fool."""
    steps = max(1, min(steps, G.shape[0]))
    q = start / torch.linalg.vector_norm(start).clamp_min(torch.finfo(G.dtype).tiny)
    alphas, betas, Q = _lanczos_steps(G, q, steps)
    # an invariant subspace met on the way (a beta at rounding level) would have amplified noise into the basis:
    # then the steps are redone with the test (rare: a rank-deficient G, or one of size about `steps`)
    negligible = 1e-10 * torch.linalg.matrix_norm(G)
    if bool((betas[:-1] <= negligible).any()):
        alphas, betas, Q = _lanczos_steps(G, q, steps, negligible)
    T = torch.diag(alphas) + torch.diag(betas[:-1], 1) + torch.diag(betas[:-1], -1)
    values, vectors = torch.linalg.eigh(T)
    ritz_block = Q.T @ vectors[:, -RITZ_BLOCK:].flip(-1)
    ritz = ritz_block[:, 0]
    # the top Ritz value's error, estimated: r = ||G y - theta y|| (the last beta times the last entry of T's
    # eigenvector) bounds it by r, and by r^2 / gap once the gap to the next Ritz value is the larger
    residual = betas[-1] * vectors[-1, -1].abs()
    gap = (values[-1] - values[-2]) if steps > 1 else residual
    error = torch.minimum(residual, residual.square() / gap.clamp_min(torch.finfo(G.dtype).tiny))
    return values[-1], ritz / torch.linalg.vector_norm(ritz).clamp_min(torch.finfo(G.dtype).tiny), error, ritz_block


LANCZOS_STEPS = 24
# Up to this size the estimate is the Gram matrix's exact top eigenpair (LAPACK's eigh) instead of the Lanczos run:
# one call against about 24 x 25 small operations (measured on a 2-core Xeon, one thread: 0.25 ms against 0.74 ms
# at 64, equal at 128, 3.4x slower at 256)
EXACT_EIGEN_MAX = 96


def _top_eigenpair(G: torch.Tensor, start: torch.Tensor):
    """(the estimate of lambda_max(G), its unit vector, an estimate of its error, the top RITZ_BLOCK Ritz vectors
    (n, k <= RITZ_BLOCK), best first: a warm block for the next proof): the exact eigenpairs for a small G, else
    `_lanczos_top` from start. Only an estimate either way: the Cholesky factorisation proves."""
    if G.shape[0] > EXACT_EIGEN_MAX:
        return _lanczos_top(G, start, LANCZOS_STEPS)
    values, vectors = torch.linalg.eigh(G)  # reads the lower triangle, as the factorisation does
    error = 8.0 * G.shape[0] * torch.finfo(G.dtype).eps * values.abs().amax()  # eigh's backward error, generously
    return values[-1], vectors[:, -1], error, vectors[:, -RITZ_BLOCK:].flip(-1)


def _block_top(G: torch.Tensor, block: torch.Tensor):
    """(the largest Ritz value, its unit vector, an estimate of its error, the new Ritz block (n, k), best first) of
    one block power step on G from `block` (n, k) and a Rayleigh-Ritz projection. Only an estimate, like
    `_top_eigenpair`'s."""
    Q = torch.linalg.qr(G @ block).Q
    GQ = G @ Q
    values, vectors = torch.linalg.eigh(Q.T @ GQ)
    ritz_block = Q @ vectors.flip(-1)
    top = ritz_block[:, 0]
    residual = torch.linalg.vector_norm(GQ @ vectors[:, -1] - values[-1] * top)
    gap = values[-1] - values[-2]
    error = torch.minimum(residual, residual.square() / gap.clamp_min(torch.finfo(G.dtype).tiny))
    return values[-1], top, error, ritz_block


class Gram(NamedTuple):
    """The smaller Gram matrix G of W (float64 values, n x n, inner size m), its trace (||W||_F^2; rounded up when G
    was formed in float32), and `error`, a bound of ||G - W^T W||_2 beyond what `_rounding_shift` covers (None for a
    float64 product)."""

    G: torch.Tensor
    m: int
    n: int
    frobenius_sq: torch.Tensor
    error: Optional[torch.Tensor]


# From this many columns (of the smaller Gram matrix) float32_gram applies: below, the float64 product is faster than
# the float32 one with its rounding bound's two extra products (measured on a 2-core Xeon, 64 x 64: 19 us against
# 53; 192: 111 against 121; 256: 228 against 183; 512: 1.75 ms against 0.95)
FLOAT32_GRAM_MIN = 224


def float32_products_are_ieee(device: torch.device) -> bool:
    """Whether torch multiplies float32 matrices on `device` in float32 with float32 sums, as the rounding bound of a
    float32 Gram matrix assumes: on the CPU only (cuBLAS may emulate float32), with every float32 matmul precision
    setting at full precision (a user's "medium" or "bf16" lets oneDNN multiply in bfloat16)."""
    if device.type != "cpu":
        return False
    # oneDNN's own switch, which torch does not see: anything but strict lets it multiply float32 in bfloat16
    if any(os.environ.get(name, "STRICT").upper() not in ("", "STRICT")
           for name in ("ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE")):
        return False
    flags = [getattr(torch.backends, "fp32_precision", "none"),
             getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")]
    if any(flag not in ("none", "ieee") for flag in flags):
        return False
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:  # legacy and new precision settings mixed: the new ones, checked above, decide
        return True


def _gram(W: torch.Tensor, float32_gram: bool = False) -> Gram:
    """The smaller Gram matrix of W: in float64, or (float32_gram, which spectral_norm_upper_bound sets only for a
    float32 W on a device whose float32 products are IEEE) in float32, 1.8x faster at 512 x 512 on a 2-core Xeon
    (0.95 ms against 1.75), with its rounding bounded: each entry |fl(G)_ij - G_ij| <= gamma_m (|W|^T |W|)_ij for
    any order of the m products' sum (Higham, Accuracy and Stability, eq. 3.5; gamma_m = m u / (1 - m u), u =
    2^-24), so ||fl(G) - G||_2 <= gamma_m || |W|^T |W| ||_2, and that Perron root is at most max_i (M x)_i / x_i for
    any positive x (Collatz-Wielandt; x = M 1, two products of |W| each): about 0.26% of ||W||_2^2 for a Gaussian
    512 x 512 W, 1% at 1024 (measured; it grows as m n). Underflow is covered: m n (1 + max|W|) times the smallest
    normal number."""
    V = W.detach()
    rows_ge_cols = V.shape[0] >= V.shape[1]
    m, n = max(V.shape), min(V.shape)
    if not float32_gram:
        V = V.double()
        # not symmetrised: the Cholesky factorisation reads the lower triangle only (each entry fl(G_ij), within the
        # rounding shift's analysis), and Lanczos needs only an estimate
        G = V.T @ V if rows_ge_cols else V @ V.T
        return Gram(G, m, n, G.diagonal().sum(), None)
    G = (V.T @ V if rows_ge_cols else V @ V.T).double()
    A = V.abs() if rows_ge_cols else V.abs().T  # G = A^T A up to signs: M = A^T A, A (m, n)
    unit = 2.0**-24
    gamma = m * unit / (1.0 - m * unit)
    x = A.T @ A.sum(dim=1)
    x = x + (x.amax() * 1e-3 + torch.finfo(torch.float32).tiny)  # positive everywhere (a zero column gives 0 / x)
    # M x for this x summed in float32 too: nonnegative terms, each of the two products at least (1 - gamma_m) of
    # its exact value, so the exact one is at most the computed one / (1 - gamma_m)^2
    perron = (A.T @ (A @ x)).double().div(x.double()).amax() / (1.0 - gamma) ** 2 * (1.0 + 1e-12)
    # underflow: a product or a partial sum that underflows loses less than the smallest normal number s (denormals
    # flushed or not), and a denormal entry read as 0 (torch.set_flush_denormal also sets DAZ) loses less than s
    # max|W| in each product: m (1 + max|W|) s per entry, n times that bounds the error matrix's norm
    underflow = m * n * torch.finfo(torch.float32).smallest_normal * (1.0 + A.amax().double())
    trace = G.diagonal().sum() * (1.0 + gamma) * (1.0 + 1e-12) + underflow
    return Gram(G, m, n, trace, gamma * perron + underflow)


# From this size the factorisation is blocked here (LAPACK's on the diagonal blocks, a triangular solve and one
# product per panel): measured on a 2-core Xeon, 1.4 ms against LAPACK's 2.4 ms at 512 (equal at 256). A reordering of
# the same operations (as LAPACK's own blocked potrf is), so the same rounding analysis covers it.
BLOCKED_CHOLESKY_MIN = 384
CHOLESKY_BLOCK = 128


def _cholesky_completes(A: torch.Tensor) -> bool:
    """Whether the Cholesky factorisation of the symmetric A (its lower triangle read; A is overwritten) completes:
    every pivot positive and finite (LAPACK rejects a pivot that is <= 0 or NaN, and a NaN or Inf anywhere below
    the diagonal reaches a later pivot). One host read."""
    n = A.shape[0]
    if n < BLOCKED_CHOLESKY_MIN:
        return int(torch.linalg.cholesky_ex(A)[1]) == 0
    infos = []
    for k in range(0, n, CHOLESKY_BLOCK):
        end = min(k + CHOLESKY_BLOCK, n)
        L, info = torch.linalg.cholesky_ex(A[k:end, k:end])
        infos.append(info)
        if end < n:  # a failed block leaves garbage that only later pivots read: its info already rejects
            panel = torch.linalg.solve_triangular(L, A[end:, k:end].mT, upper=False).mT  # A21 L11^-T
            A[end:, end:].addmm_(panel, panel.mT, alpha=-1.0)
    return int(torch.stack(infos).abs().amax()) == 0


def _prove(gram: Gram, frobenius_sq: float, error: Optional[float], estimate: float, slacks):
    """The first (sigma_bar, slack) for the slacks of `slacks` that a Cholesky factorisation of t I - G (less the
    rounding shift) proves, t = (estimate (1 + slack))^2 plus the Gram matrix's own error bound (None in float64,
    where sigma_bar = estimate (1 + slack)), or None. frobenius_sq and error: the Gram's, read on the host. The
    scalars are Python floats: the same IEEE double arithmetic as 0-dim float64 tensors, without an operation
    launched for each. One factorisation and one host read per slack."""
    G, m, n = gram.G, gram.m, gram.n
    for slack in slacks:
        candidate = estimate * (1.0 + slack)
        t = candidate * candidate
        gram_error = 0.0
        if error is not None:  # lambda_max(fl(G)) <= t - error proves lambda_max(W^T W) <= t
            candidate = math.sqrt(t + error) * (1.0 + 4.0 * torch.finfo(torch.float64).eps)
            t = candidate * candidate
            gram_error = error
        trial = -G
        trial.diagonal().add_(t - (_rounding_shift(m, n, t, frobenius_sq) + gram_error))
        # G and t are finite here (checked before), so a factorisation that completes is finite
        if _cholesky_completes(trial):
            return candidate, slack
    return None


@torch.no_grad()
def spectral_norm_upper_bound(W: torch.Tensor, sigma_estimate=None, start: Optional[torch.Tensor] = None, *,
                              refine: bool = True, slacks=CERTIFICATE_LADDER,
                              block: Optional[torch.Tensor] = None, float32_gram: bool = False) -> SpectralBound:
    """A certified sigma_bar >= ||W||_2 for W (m, n). Computed in float64 (the Gram matrix in float32 with
    float32_gram). The estimate proven is the larger of
    `sigma_estimate` (a float or 0-dim tensor, e.g. a power iteration's lower bound; optional) and the square root
    of the top Ritz value of LANCZOS_STEPS Lanczos steps on the smaller Gram matrix from `start` (a vector of its
    size, e.g. the power iteration's; default a fixed one), or of its top eigenvalue when it has at most
    EXACT_EIGEN_MAX rows. The slacks are tried smallest first and the first proof
    ends the search (one Cholesky and one host synchronisation each; a good estimate costs one).

    refine=False (with sigma_estimate): first try to prove sigma_estimate itself at `slacks` (a warm-started power
    iteration's estimate usually proves at the first), and run Lanczos and the full ladder only if none does: the
    proof without the Lanczos steps' two dozen products (vector None then). block (n, k), k >= 2, n > 2k: the
    first estimate is one block power step and a Rayleigh-Ritz projection from it (`_block_top`), far cheaper than
    Lanczos when warm; Lanczos (or the exact eigenpair) from its top vector follows only where it proves nothing.
    The top Ritz vectors come back as ritz_block. float32_gram: a float32 W's Gram matrix (from FLOAT32_GRAM_MIN
    columns) is formed in float32 on the CPU (`_gram`), the factorisation still in float64, and its rounding bound
    added to sigma_bar^2 (`gram_rounding` says how much that adds: about 0.13% at 512 x 512); where that proves
    nothing, or the float32 product overflows, the float64 Gram matrix is used instead. Raises FloatingPointError
    when W is not finite."""
    if float32_gram and W.dtype == torch.float32 and min(W.shape) >= FLOAT32_GRAM_MIN and \
            max(W.shape) * 2.0**-24 <= 1e-2 and float32_products_are_ieee(W.device):  # gamma_m below 1%
        bound = _bound_from_gram(_gram(W, float32_gram=True), sigma_estimate, start, refine, slacks, block)
        if bound is not None:
            return bound
    return _bound_from_gram(_gram(W), sigma_estimate, start, refine, slacks, block)


def _bound_from_gram(gram: Gram, sigma_estimate, start, refine, slacks, block) -> Optional[SpectralBound]:
    """spectral_norm_upper_bound from the Gram matrix; None where a float32 Gram matrix (one with an `error`) is not
    finite or proves nothing before the squaring bound, which assumes exact entries. Its scalars are read on the host
    once (the trace, the error bound and a tensor estimate together) and handled as Python floats."""
    G, n = gram.G, gram.n
    given_is_tensor = isinstance(sigma_estimate, torch.Tensor)
    read = [gram.frobenius_sq] + ([gram.error] if gram.error is not None else []) + (
        [sigma_estimate.detach().reshape(()).to(gram.frobenius_sq)] if given_is_tensor else [])
    values = torch.stack(read).tolist() if len(read) > 1 else [read[0].item()]
    frobenius_sq = values[0]
    error = values[1] if gram.error is not None else None
    given = values[-1] if given_is_tensor else (None if sigma_estimate is None else float(sigma_estimate))
    if given is not None and not (math.isfinite(given) and given > 0):
        given = None  # not an estimate to prove, nor to take the larger of
    if error is not None and not (math.isfinite(frobenius_sq) and frobenius_sq > 0 and math.isfinite(error)):
        return None  # a float32 overflow (or W = 0): the float64 product decides
    if not math.isfinite(frobenius_sq):
        raise FloatingPointError("deqkern.spectral_norm_upper_bound: the weight has NaN or Inf entries")
    if frobenius_sq == 0:
        return SpectralBound(G.new_zeros(()), "zero", 0.0, None)

    def proven_bound(estimate, ladder, vector=None, ritz_block=None):
        proven = _prove(gram, frobenius_sq, error, estimate, ladder)
        if proven is None:
            return None
        value, slack = proven
        # the slack the rounding bound added, on top of the ladder's
        rounding = value / (estimate * (1.0 + slack)) - 1.0 if error is not None else 0.0
        return SpectralBound(torch.tensor(value, dtype=torch.float64, device=G.device), "cholesky",
                             (1.0 + slack) * (1.0 + rounding) - 1.0, vector, ritz_block, rounding)

    if not refine and given is not None:
        bound = proven_bound(given, slacks)
        if bound is not None:
            return bound
    if start is None or start.numel() != n:
        start = default_start(n, torch.float64, G.device)
    # the block's estimate first where there is a block; where it proves nothing within the ladder (a block gone
    # stale while the matrix moved fast, measured early in training), Lanczos or the exact eigenpair from its top
    # vector before the squaring bound
    usable_block = block is not None and block.dim() == 2 and block.shape[0] == n and 2 <= block.shape[1] < n / 2
    vector = ritz_block = None
    for from_block in ((True, False) if usable_block else (False,)):
        if from_block:
            ritz, vector, ritz_error, ritz_block = _block_top(G, block.detach().double())
        else:
            first_start = start if vector is None else vector
            ritz, vector, ritz_error, ritz_block = _top_eigenpair(G, first_start.detach().double().reshape(n))
        ritz, ritz_error = torch.stack([ritz, ritz_error]).tolist()
        estimate = math.sqrt(ritz) if ritz > 0 else (0.0 if ritz <= 0 else math.nan)
        if given is not None:
            estimate = max(estimate, given) if math.isfinite(estimate) else estimate
        if math.isfinite(estimate) and estimate > 0:
            # the ladder starts at the first slack above a tenth of the Ritz value's estimated error (relative,
            # halved for sigma): a guess that saves factorisations bound to fail (measured: 3 for a Gaussian 512 x
            # 512 W), a tenth so that a pessimistic guess costs little tightness; the proof does not depend on it
            guess = ritz_error / max(2.0 * estimate * estimate, torch.finfo(torch.float64).tiny)
            first = next((i for i, slack in enumerate(CERTIFICATE_LADDER) if slack >= 0.1 * guess),
                         len(CERTIFICATE_LADDER) - 1)
            bound = proven_bound(estimate, CERTIFICATE_LADDER[first:], vector, ritz_block)
            if bound is not None:
                return bound
    if gram.error is not None:
        return None
    return SpectralBound(_squaring_bound(G), "squaring", float("nan"), vector, ritz_block)


def prove_with_vector(W: torch.Tensor, start: torch.Tensor, refine: bool, block: Optional[torch.Tensor] = None,
                      float32_gram: bool = False) -> Tuple[SpectralBound, torch.Tensor]:
    """spectral_norm_upper_bound of the estimate ||W start|| (W square, start (n,) of W's dtype), and the unit
    vector to keep: the Ritz vector where it is the sharper direction, else start. block: the previous proof's
    ritz_block, refined from [start, its first k - 1 columns] (start always in it: the power iteration follows the
    top direction between proofs). What a layer that proves its weight's norm at every forward (LipschitzDEQ)
    calls, eagerly or through the op below."""
    with torch.no_grad():
        W = W.detach()
        if block is not None:
            block = torch.cat([start.double()[:, None], block[:, :-1]], dim=1)
        # the estimate in W's dtype (summed in float64): an estimate only, which the proof checks
        estimate = torch.linalg.vector_norm(W @ start.to(W.dtype), dtype=torch.float64)
        bound = spectral_norm_upper_bound(W, estimate, start=start, refine=refine, block=block,
                                          float32_gram=float32_gram)
        if bound.vector is None:
            return bound, start
        ritz = bound.vector.to(W.dtype)
        return bound, torch.where(torch.linalg.vector_norm(W @ ritz) > torch.linalg.vector_norm(W @ start), ritz,
                                  start)


@torch.library.custom_op("deqkern::proven_spectral_bound", mutates_args=())
def proven_spectral_bound(W: torch.Tensor, start: torch.Tensor, refine: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """prove_with_vector as one opaque op, for a layer that proves its weight's norm inside a torch.compile graph (the
    proof's decisions read the host; inside an op that is the op's business): (sigma_bar, 0-dim float64; the unit
    vector to keep)."""
    bound, u = prove_with_vector(W, start, refine)
    return bound.value.clone(), u.clone()


@proven_spectral_bound.register_fake
def _proven_spectral_bound_fake(W, start, refine):
    return W.new_empty((), dtype=torch.float64), torch.empty_like(start)

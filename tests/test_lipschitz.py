"""deqkern.lipschitz (spectral_norm, one_sided_l2, power_iteration, one_sided_linf, linf_norm) on every backend
against torch.linalg; the power_iteration op itself is tested against its reference in test_power_iteration.py."""
import warnings

import pytest
import torch

import deqkern
from deqkern import lipschitz

import kit

BACKENDS = kit.backend_names(("cpu", "reference", "cuda", "triton"))
device_of = kit.device_of


# ---------------------------------------------------------------- test matrices (built in float64 on the CPU)
def random_matrix(m, n, seed=0):
    return torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def conditioned_matrix(m, n, seed=0):
    """Singular values 1, then 0.5 down to 1e-6 (a clear top gap, condition number 1e6)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g))[0]
    sigma = torch.cat([torch.ones(1, dtype=torch.float64), torch.logspace(-0.3, -6, k - 1, dtype=torch.float64)])
    return U @ torch.diag(sigma[:k]) @ V.T


def nonnormal_matrix(d, seed=0):
    """Upper triangular with off-diagonal entries 10x the diagonal: ||W||_2 far above the spectral radius."""
    g = torch.Generator().manual_seed(seed)
    return torch.triu(10 * torch.randn(d, d, dtype=torch.float64, generator=g), 1) + torch.diag(
        torch.rand(d, dtype=torch.float64, generator=g))


def symmetric_gap_matrix(d, seed=0):
    """Symmetric part with eigenvalues 1 (top), then in [-1, 0.3]; plus a skew part that mu_2 ignores."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))[0]
    lam = torch.cat([torch.ones(1, dtype=torch.float64), -1 + 1.3 * torch.rand(d - 1, dtype=torch.float64, generator=g)])
    K = torch.randn(d, d, dtype=torch.float64, generator=g)
    return Q @ torch.diag(lam[:d]) @ Q.T + (K - K.T)


def mu2(W):
    return torch.linalg.eigvalsh(0.5 * (W + W.T))[-1]


KINDS = {"random": random_matrix, "conditioned": conditioned_matrix}
GRAM_SHAPES = [(1, 1), (3, 3), (17, 17), (64, 64), (130, 130), (17, 3), (3, 17), (130, 64), (37, 130)]
SMALL_GRAM = [(1, 1), (3, 3), (17, 17), (17, 3), (3, 17)]


GRAM_CASES = kit.backend_params(
    [(f"{m}x{n}-{kind}", (m, n, kind)) for m, n in GRAM_SHAPES for kind in KINDS]
    + [(f"{d}x{d}-nonnormal", (d, d, "nonnormal")) for d in (3, 17, 64)],
    backends=("cpu", "reference", "cuda", "triton"),
    small={f"{m}x{n}-conditioned" for m, n in SMALL_GRAM} | {"3x3-nonnormal"})


@pytest.mark.parametrize("backend,m,n,kind", GRAM_CASES)
def test_spectral_norm_matches_svdvals(backend, m, n, kind):
    W = nonnormal_matrix(n) if kind == "nonnormal" else KINDS[kind](m, n)
    expected = torch.linalg.svdvals(W)[0]
    result = lipschitz.spectral_norm(W.to(device_of(backend)), n_iter=20000, tol=1e-13, backend=backend)
    value, u = result  # unpacks as (value, u)
    print(f"{backend} {m}x{n} {kind}: {value.item():.12g} vs {expected.item():.12g}, {result.iterations.item()} it")
    assert value.dim() == 0 and u.shape == (n,) and result.converged.item()
    torch.testing.assert_close(value.cpu(), expected, rtol=1e-4, atol=0)
    assert abs(u.norm().item() - 1) < 1e-12
    # u is a top right singular vector: ||W u|| = ||W||_2
    torch.testing.assert_close((W @ u.cpu()).norm(), expected, rtol=1e-4, atol=0)


ONE_SIDED_CASES = kit.backend_params(
    [(f"{d}-{kind}", (d, kind)) for d in (1, 3, 17, 64, 130) for kind in ("gap", "random", "nonnormal")
     if kind == "gap" or d > 1],
    backends=("cpu", "reference", "cuda", "triton"), small={"1-gap", "3-gap", "17-gap"})


@pytest.mark.parametrize("backend,d,kind", ONE_SIDED_CASES)
def test_one_sided_l2_matches_eigvalsh(backend, d, kind):
    W = random_matrix(d, d) if kind == "random" else {"gap": symmetric_gap_matrix, "nonnormal": nonnormal_matrix}[kind](d)
    expected = mu2(W)
    result = lipschitz.one_sided_l2(W.to(device_of(backend)), n_iter=20000, tol=1e-13, backend=backend)
    print(f"{backend} d={d} {kind}: {result.value.item():.12g} vs {expected.item():.12g}, "
          f"{result.iterations.item()} it, shift {result.shift:.4g}")
    assert result.converged.item() and result.u.shape == (d,)
    torch.testing.assert_close(result.value.cpu(), expected, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_float32_and_float64(dtype):
    W = conditioned_matrix(70, 50).to(dtype)
    value, u = lipschitz.spectral_norm(W)
    assert value.dtype == dtype and u.dtype == dtype
    torch.testing.assert_close(value.double(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)
    W = symmetric_gap_matrix(40).to(dtype)
    torch.testing.assert_close(lipschitz.one_sided_l2(W).value.double(), mu2(W.double()), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- warm start, non-convergence, zeros, NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_warm_start_converges_in_a_few_iterations(backend):
    W = conditioned_matrix(17, 13).to(device_of(backend))
    first = lipschitz.spectral_norm(W, tol=1e-10, backend=backend)
    again = lipschitz.spectral_norm(W, tol=1e-10, u0=first.u, backend=backend)
    print(first.iterations.item(), again.iterations.item())
    assert first.iterations.item() > 5 and again.iterations.item() <= 3 and again.converged.item()
    torch.testing.assert_close(again.value, first.value, rtol=1e-9, atol=0)
    S = symmetric_gap_matrix(13).to(device_of(backend))
    first = lipschitz.one_sided_l2(S, tol=1e-10, backend=backend)
    again = lipschitz.one_sided_l2(S, tol=1e-10, u0=first.u, backend=backend, shift=first.shift)
    assert again.iterations.item() <= 3 and again.converged.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonconvergence_is_reported(backend):
    sigma = torch.tensor([1.0, 0.999, 0.5, 0.1], dtype=torch.float64)  # tiny top gap
    Q = torch.linalg.qr(random_matrix(4, 4, seed=3))[0]
    W = (Q @ torch.diag(sigma) @ Q.T).to(device_of(backend))
    with pytest.warns(lipschitz.PowerIterationWarning, match="did not converge"):
        result = lipschitz.spectral_norm(W, n_iter=5, tol=1e-12, backend=backend)
    assert not result.converged.item() and result.iterations.item() == 5
    assert result.value.item() <= 1.0 + 1e-12  # an unconverged power iteration value is a lower bound
    with pytest.warns(lipschitz.PowerIterationWarning):
        lipschitz.one_sided_l2(W, n_iter=3, tol=1e-12, backend=backend)
    with pytest.raises(deqkern.NonConvergenceError):
        lipschitz.power_iteration(W, torch.ones(2, 4, dtype=W.dtype, device=W.device), max_iter=3, tol=1e-12,
                                  backend=backend, on_nonconvergence="raise")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_matrix_gives_zero(backend):
    device = device_of(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        for W in (torch.zeros(5, 3, dtype=torch.float64, device=device), torch.zeros(4, 4, device=device)):
            value, u = lipschitz.spectral_norm(W, backend=backend)
            assert value.item() == 0 and torch.isfinite(u).all() and abs(u.norm().item() - 1) < 1e-6
        result = lipschitz.one_sided_l2(torch.zeros(4, 4, device=device), backend=backend)
        assert result.value.item() == 0 and result.converged.item() and torch.isfinite(result.u).all()


def test_public_api_rejects_nan_and_inf():
    W = random_matrix(4, 4)
    W[2, 1] = float("nan")
    for fn in (lipschitz.spectral_norm, lipschitz.one_sided_l2, lipschitz.one_sided_linf, lipschitz.linf_norm):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn(W)
    W[2, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        lipschitz.spectral_norm(W)
    with pytest.raises(ValueError, match="u0"):
        lipschitz.spectral_norm(random_matrix(4, 4), u0=torch.tensor([1.0, float("nan"), 0, 0], dtype=torch.float64))


# ---------------------------------------------------------------- one_sided_linf, linf_norm
def test_linf_norm_and_one_sided_linf_match_formulas():
    for m, n in ((1, 1), (3, 3), (17, 17), (5, 9)):
        W = random_matrix(m, n, seed=m)
        expected = max(sum(abs(W[i, j].item()) for j in range(n)) for i in range(m))
        torch.testing.assert_close(lipschitz.linf_norm(W).item(), expected, rtol=1e-12, atol=0)
        if m == n:
            expected = max(W[i, i].item() + sum(abs(W[i, j].item()) for j in range(n) if j != i) for i in range(n))
            torch.testing.assert_close(lipschitz.one_sided_linf(W).item(), expected, rtol=1e-12, atol=0)
    assert lipschitz.one_sided_linf(-torch.eye(3)).item() == -1  # mu can be negative, unlike a norm


def test_weighted_one_sided_linf():
    W = random_matrix(17, 17, seed=4)
    d = torch.rand(17, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.1
    D = torch.diag(d)
    expected = lipschitz.one_sided_linf(D @ W @ torch.linalg.inv(D))
    torch.testing.assert_close(lipschitz.one_sided_linf(W, weights=d), expected, rtol=1e-12, atol=1e-12)
    # mu_inf of any similarity D W D^-1 bounds the spectral abscissa, and mu_2 does too
    abscissa = torch.linalg.eigvals(W).real.max()
    assert lipschitz.one_sided_linf(W, weights=d) >= abscissa and mu2(W) >= abscissa - 1e-12
    torch.testing.assert_close(lipschitz.one_sided_linf(W, weights=torch.ones(17, dtype=torch.float64)),
                               lipschitz.one_sided_linf(W))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: lipschitz.spectral_norm(torch.ones(3)), ValueError, "2-D"),
        (lambda: lipschitz.spectral_norm(torch.ones(2, 3, 3)), ValueError, "2-D"),
        (lambda: lipschitz.spectral_norm(torch.ones(3, 3, dtype=torch.int64)), TypeError, "float32 or float64"),
        (lambda: lipschitz.spectral_norm(torch.ones(3, 3), u0=torch.ones(4)), ValueError, "u0 must be"),
        (lambda: lipschitz.spectral_norm(torch.ones(3, 3), u0=torch.zeros(3)), ValueError, "nonzero"),
        (lambda: lipschitz.spectral_norm(torch.ones(3, 3), u0=torch.ones(3, dtype=torch.float64)), TypeError, "dtype"),
        (lambda: lipschitz.spectral_norm(torch.ones(3, 3), n_iter=0), ValueError, "max_iter"),
        (lambda: lipschitz.spectral_norm(torch.ones(3, 3), tol=0.0), ValueError, "tol"),
        (lambda: lipschitz.spectral_norm(torch.ones(3, 3), tol=-1e-3), ValueError, "tol"),
        (lambda: lipschitz.spectral_norm(torch.ones(3, 3), backend="gpu"), ValueError, "backend"),
        (lambda: lipschitz.one_sided_l2(torch.ones(3, 4)), ValueError, "square"),
        (lambda: lipschitz.one_sided_l2(torch.ones(3, 3), n_iter=0), ValueError, "n_iter"),
        (lambda: lipschitz.one_sided_linf(torch.ones(3, 4)), ValueError, "square"),
        (lambda: lipschitz.one_sided_linf(torch.ones(3, 3), weights=torch.tensor([1.0, 0.0, 1.0])), ValueError, "> 0"),
        (lambda: lipschitz.one_sided_linf(torch.ones(3, 3), weights=torch.ones(4)), ValueError, "weights must be"),
        (lambda: lipschitz.linf_norm(torch.ones(3, dtype=torch.int32)), TypeError, "float32 or float64"),
        (lambda: lipschitz.power_iteration(torch.ones(3, 3), torch.ones(2, 3), mode="eig"), ValueError, "mode"),
        (lambda: lipschitz.power_iteration(torch.ones(3, 4), torch.ones(2, 4), mode="symmetric"), ValueError, "square"),
        (lambda: lipschitz.power_iteration(torch.ones(3, 4), torch.ones(2, 4), row_scale=torch.ones(2, 4)),
         ValueError, "row_scale"),
        (lambda: lipschitz.power_iteration(torch.ones(3, 3), torch.ones(2, 3), shift=float("inf")), ValueError, "shift"),
    ],
)
def test_bad_input_raises(call, error, message):
    with pytest.raises(error, match=message):
        call()

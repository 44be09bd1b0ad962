"""deqkern.solve and its fused op deqkern::anderson_step (CPU C++, Triton under the interpreter, CUDA) against
anderson_step_ref."""
import math
import warnings

import pytest
import torch

import deqkern
from deqkern import _extension
from deqkern.reference import anderson_step_ref
from problems import contractive_matrix, dense_problem, report

STEP_SHAPES = [(1, 1, 1), (3, 5, 2), (7, 37, 5), (5, 130, 3), (4, 33, 8)]  # (B, n, m)


def _backends():
    out = ["cpu"]
    if _extension.triton_available() and (torch.cuda.is_available() or _extension.triton_interpreter_on()):
        out.append("triton")
    if torch.cuda.is_available() and _extension.CUDA_EXTENSION_BUILT:
        out.append("cuda")
    return out


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _step_state(B, n, m, dtype, device, seed=0):
    """A mid-solve state: random histories with a consistent Gram matrix, strided x, some inactive samples."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    X = torch.randn(B, m, n, generator=g, dtype=torch.float64).to(dtype)
    G = (0.3 * torch.randn(B, m, n, generator=g, dtype=torch.float64)).to(dtype)
    H = (G.to(acc) @ G.to(acc).transpose(1, 2))
    wide = torch.randn(B, 2 * n, generator=g, dtype=torch.float64).to(dtype)
    x = wide[:, ::2]  # non-contiguous
    fx = (x.double() + 0.2 * torch.randn(B, n, generator=g, dtype=torch.float64)).to(dtype)
    state = dict(
        X_hist=X, G_hist=G, H=H, x=x, fx=fx, x_next=torch.zeros(B, n, dtype=dtype),
        z_best=torch.zeros(B, n, dtype=dtype),
        residual_best=torch.where(torch.arange(B) % 3 == 0, math.nan, 0.5 + torch.rand(B, generator=g)).to(acc),
        residual=torch.full((B,), 7.0, dtype=acc),
        active=torch.arange(B) % 4 != 1, iterations=torch.full((B,), 3, dtype=torch.int32),
    )
    return {k: v.to(device) for k, v in state.items()}


def _run_step(op, state, k, beta, lam, tol):
    s = {key: (v.clone() if key not in ("x",) else v) for key, v in state.items()}
    op(s["X_hist"], s["G_hist"], s["H"], s["x"], s["fx"], s["x_next"], s["z_best"], s["residual_best"],
       s["residual"], s["active"], s["iterations"], k, beta, lam, tol)
    return s


def _step_op(backend):
    return deqkern.solvers._step_op(backend)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("k", [0, 2, 11])
@pytest.mark.parametrize("B,n,m", STEP_SHAPES, ids=[f"B{b}-N{n}-M{m}" for b, n, m in STEP_SHAPES])
def test_anderson_step_matches_reference(B, n, m, k, backend):
    if backend == "triton" and n > 64 and not torch.cuda.is_available():
        pytest.skip("interpreter: small sizes only")
    state = _step_state(B, n, m, torch.float64, _device(backend))
    tol = 1e-3 if k != 2 else 1.0  # k == 2: some samples converge in this step
    out = _run_step(_step_op(backend), state, k, 0.8, 1e-6, tol)
    ref = _run_step(anderson_step_ref, {key: v.cpu() for key, v in state.items()}, k, 0.8, 1e-6, tol)
    nh = min(k + 1, m)
    for key in ("X_hist", "G_hist", "x_next", "z_best", "residual_best", "residual", "active", "iterations"):
        report(key, out[key].cpu(), ref[key])
        torch.testing.assert_close(out[key].cpu(), ref[key], rtol=1e-9, atol=1e-11, equal_nan=True)
    go_on = ref["active"]
    torch.testing.assert_close(out["H"].cpu()[go_on][:, :nh, :nh], ref["H"][go_on][:, :nh, :nh], rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_anderson_step_low_precision(backend, dtype):
    state = _step_state(6, 40, 4, dtype, _device(backend))
    out = _run_step(_step_op(backend), state, 5, 1.0, 1e-6, 1e-3)
    ref = _run_step(anderson_step_ref, {key: v.cpu() for key, v in state.items()}, 5, 1.0, 1e-6, 1e-3)
    assert out["H"].dtype == torch.float32 and out["residual"].dtype == torch.float32
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    report("x_next", out["x_next"].cpu(), ref["x_next"])
    torch.testing.assert_close(out["x_next"].cpu().float(), ref["x_next"].float(), rtol=tol, atol=tol)
    torch.testing.assert_close(out["residual"].cpu(), ref["residual"], rtol=tol, atol=tol)
    assert torch.equal(out["active"].cpu(), ref["active"])


def test_anderson_step_opcheck():
    state = _step_state(5, 17, 3, torch.float64, "cpu")
    args = [state[key] for key in ("X_hist", "G_hist", "H", "x", "fx", "x_next", "z_best", "residual_best",
                                   "residual", "active", "iterations")]
    torch.library.opcheck(torch.ops.deqkern.anderson_step.default, (*args, 3, 1.0, 1e-6, 1e-3))


# ---------------------------------------------------------------- solve()
def tanh_layer(B, d, dtype=torch.float64, seed=0, norm=0.9):
    W, c, z0 = dense_problem(B, d, dtype, seed=seed, norm=norm)
    return W, c, (lambda z: torch.tanh(z @ W.T + c))


def slow_layer(B, d, dtype=torch.float64, seed=0):
    """W symmetric with eigenvalues spread over [0, 0.9], c = 0.1 N(0, 1): slowly contracting."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    W = ((Q * torch.linspace(0, 0.9, d, dtype=torch.float64)) @ Q.T).to(dtype)
    c = (0.1 * torch.randn(B, d, dtype=torch.float64, generator=g)).to(dtype)
    return lambda z: torch.tanh(z @ W.T + c)


SOLVE_BACKENDS = ["cpu", "reference"] + [b for b in _backends() if b != "cpu"]


@pytest.mark.parametrize("backend", SOLVE_BACKENDS)
@pytest.mark.parametrize("method", ["anderson", "picard", "broyden"])
def test_solve_reaches_the_fixed_point(method, backend):
    if method == "broyden" and backend != "cpu":
        pytest.skip("broyden has no kernel")
    W, c, f = tanh_layer(3 if backend == "triton" else 9, 24)  # the interpreter runs one program at a time
    z_ref, info_ref = deqkern.fixed_point_dense(W, c, tol=1e-12, max_iter=1000)
    z0 = torch.zeros_like(c).to(_device(backend))
    W_, c_ = W.to(z0.device), c.to(z0.device)
    z, info = deqkern.solve(lambda z: torch.tanh(z @ W_.T + c_), z0, method, tol=1e-10, max_iter=500,
                            backend=backend)
    assert info.converged.all() and (info.residual <= 1e-10).all()
    torch.testing.assert_close(z.cpu(), z_ref, rtol=1e-8, atol=1e-9)
    if method == "anderson" and backend != "triton":
        picard = deqkern.solve(lambda z: torch.tanh(z @ W_.T + c_), z0, "picard", tol=1e-10, max_iter=500,
                               backend=backend)[1]
        assert info.iterations.sum() < picard.iterations.sum()


def test_samples_stop_independently():
    """Samples converge at different speeds; each result does not depend on the rest of the batch."""
    W, c, f = tanh_layer(12, 20)
    z, info = deqkern.solve(f, torch.zeros_like(c), tol=1e-9, max_iter=300, check_every=1)
    assert info.iterations.unique().numel() > 2, info.iterations
    for row in (0, 5, 11):
        z1, info1 = deqkern.solve(lambda y: torch.tanh(y @ W.T + c[row:row + 1]), torch.zeros_like(c[row:row + 1]),
                                  tol=1e-9, max_iter=300, check_every=1)
        torch.testing.assert_close(z1[0], z[row], rtol=1e-12, atol=1e-12)  # f itself: BLAS by batch size
        assert info1.iterations[0] == info.iterations[row]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_history_buffers_reused_safely(backend):
    """CPU solves reuse the last solve's history buffers. A solve nested inside f (same shapes, so it would find the
    outer solve's live buffers), a solve under inference mode followed by one outside it, and repeated solves must
    all be bit-for-bit the fresh solve, with the same iteration counts."""
    W, c, f = tanh_layer(5, 16)
    z0 = torch.zeros_like(c)
    solve = lambda fn: deqkern.solve(fn, z0, tol=1e-11, max_iter=300, check_every=1, backend=backend)
    first, info = solve(f)
    assert info.converged.all()

    def assert_same(out):
        torch.testing.assert_close(out[0], first, rtol=0, atol=0)
        assert torch.equal(out[1].iterations, info.iterations)

    assert_same(solve(f))
    from deqkern import solvers

    kept = solvers._HISTORY_CACHE.entry[1][0].data_ptr()  # the buffers are kept, and the next solve reuses them
    assert_same(solve(f))
    assert solvers._HISTORY_CACHE.entry[1][0].data_ptr() == kept
    solvers.release_cached_buffers()
    assert solvers._HISTORY_CACHE.entry is None
    assert_same(solve(f))

    def outer(y):
        assert_same(solve(f))
        return f(y)

    assert_same(solve(outer))
    # Another shape evicts the cached buffers: the next solve makes its own.
    deqkern.solve(lambda y: torch.tanh(y @ W.T + c[:2]), z0[:2], backend=backend)
    with torch.inference_mode():
        assert_same(solve(f))
    assert_same(solve(f))  # the reference's in-place writes raise on an inference-mode buffer


def test_multidimensional_states():
    W, c, f = tanh_layer(6, 24)
    z, info = deqkern.solve(lambda y: f(y.reshape(6, 24)).reshape(6, 2, 3, 4), torch.zeros(6, 2, 3, 4,
                            dtype=torch.float64), tol=1e-10)
    assert z.shape == (6, 2, 3, 4) and info.converged.all()


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_lowest_residual_iterate_is_returned(method):
    """f(z) = -1.5 z + c diverges from z0 = 0 under m = 1: residuals 1, 3, ... so the first iterate is the best."""
    c = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(deqkern.NonConvergenceWarning):
        z, info = deqkern.solve(lambda z: -1.5 * z + c, torch.zeros_like(c), method, m=1, max_iter=5,
                                return_trace=True)
    torch.testing.assert_close(z, c)  # f(x0) of the best iterate x0
    torch.testing.assert_close(info.residual, info.trace.nan_to_num(math.inf).min(dim=0).values)
    torch.testing.assert_close(info.residual, torch.ones(4, dtype=torch.float64))
    assert (info.iterations == 5).all()


def test_trace_and_check_every():
    W, c, f = tanh_layer(8, 16)
    calls = []

    def counted(z):
        calls.append(1)
        return f(z)

    z, info = deqkern.solve(counted, torch.zeros_like(c), tol=1e-8, max_iter=200, check_every=5, return_trace=True)
    n = int(info.iterations.max())
    assert len(calls) == math.ceil(n / 5) * 5  # the batch stops at the first check after its last sample
    assert info.trace.shape == (len(calls), 8)
    for b in range(8):
        row = info.trace[:, b]
        k = int(info.iterations[b])
        assert torch.isfinite(row[:k]).all() and torch.isnan(row[k:]).all()
    calls.clear()
    deqkern.solve(counted, torch.zeros_like(c), tol=1e-8, max_iter=200, check_every=1)
    assert len(calls) == n
    calls.clear()
    deqkern.solve(counted, torch.zeros_like(c), tol=1e-8, max_iter=200)  # CPU default: check every iteration
    assert len(calls) == n
    assert deqkern.solve(f, torch.zeros_like(c))[1].trace is None


def test_nonconvergence_policies():
    W, c, f = tanh_layer(4, 16, norm=0.99)
    with pytest.warns(deqkern.NonConvergenceWarning):
        deqkern.solve(f, torch.zeros_like(c), "picard", tol=1e-12, max_iter=3)
    with pytest.raises(deqkern.NonConvergenceError):
        deqkern.solve(f, torch.zeros_like(c), tol=1e-12, max_iter=3, on_nonconvergence="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, info = deqkern.solve(f, torch.zeros_like(c), tol=1e-12, max_iter=3, on_nonconvergence="ignore")
    assert not info.converged.any() and (info.iterations == 3).all()


def test_bad_input_and_options():
    W, c, f = tanh_layer(4, 8)
    z0 = torch.zeros_like(c)
    z0[1, 2] = math.nan
    with pytest.raises(ValueError, match="z0"):
        deqkern.solve(f, z0)
    with pytest.raises(FloatingPointError):
        deqkern.solve(lambda z: 10.0 * z + 1.0, torch.zeros_like(c), "picard", max_iter=400)
    with pytest.raises(TypeError):
        deqkern.solve(f, torch.zeros_like(c), tau=0.5)
    with pytest.raises(ValueError, match="shape"):
        deqkern.solve(lambda z: z[:, :4], torch.zeros_like(c))
    with pytest.raises(ValueError, match="method"):
        deqkern.solve(f, torch.zeros_like(c), "newton")
    for bad in (dict(m=0), dict(m=33), dict(beta=0.0), dict(lam=-1.0), dict(tol=0.0), dict(check_every=0)):
        with pytest.raises(ValueError):
            deqkern.solve(f, torch.zeros_like(c), **bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_states(dtype):
    W, c, _ = tanh_layer(8, 32, dtype=torch.float32)
    Wh, ch = W.to(dtype), c.to(dtype)
    tol = 1e-3 if dtype == torch.float16 else 1e-2
    z, info = deqkern.solve(lambda z: torch.tanh(z @ Wh.T + ch), torch.zeros_like(ch), tol=tol, max_iter=100)
    assert z.dtype == dtype and info.residual.dtype == torch.float32
    assert info.converged.all(), info.residual
    z_ref = deqkern.fixed_point_dense(W, c, tol=1e-7)[0]
    assert ((z.float() - z_ref).norm() / z_ref.norm()) < 10 * tol


@pytest.mark.parametrize("B,d", [(32, 64)])
def test_anderson_slowly_contracting_layer(B, d):
    """The issue's target: <= 16 evaluations of f at tol 1e-4 (the benchmark covers the larger sizes)."""
    f = slow_layer(B, d, torch.float32)
    z, info = deqkern.solve(f, torch.zeros(B, d), tol=1e-4, max_iter=100)
    assert info.converged.all()
    assert int(info.iterations.max()) <= 16, info.iterations

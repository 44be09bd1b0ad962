"""CUDA kernels of fixed_point_dense / fixed_point_dense_backward against deqkern.reference (skipped without a GPU)."""
import pytest
import torch

try:
    import deqkern  # noqa: F401  loads deqkern._C (schemas) and tries deqkern._C_cuda
    import deqkern._C_cuda  # noqa: F401  the CUDA kernels
    from deqkern.activations import ACTIVATIONS
    from deqkern.reference import fixed_point_dense_backward_ref, fixed_point_dense_ref

    _SKIP_REASON = None if torch.cuda.is_available() else "no CUDA device"
except Exception as e:  # CPU-only torch or a build without the CUDA extension
    ACTIVATIONS = {}
    _SKIP_REASON = f"deqkern._C_cuda unavailable: {e}"

pytestmark = pytest.mark.skipif(_SKIP_REASON is not None, reason=str(_SKIP_REASON))

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
MAX_ITER = 1000
BATCHES = [1, 3, 37, 130]
WIDTHS = [1, 5, 33, 64, 129, 300]


def make_problem(B, d, dtype, activation="tanh", seed=0):
    """W with spectral norm 0.9, c ~ N(0, 1) (relu6: N(0, 9), to reach both kinks), z0 and grad_z ~ N(0, 1); CPU."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, dtype=torch.float64, generator=g)
    norm_device = "cuda" if torch.cuda.is_available() else "cpu"  # an SVD of d = 3700 is slow on a CPU
    W = 0.9 * A / torch.linalg.matrix_norm(A.to(norm_device), ord=2).cpu()
    c = (3.0 if activation == "relu6" else 1.0) * torch.randn(B, d, dtype=torch.float64, generator=g)
    z0 = torch.randn(B, d, dtype=torch.float64, generator=g)
    grad_z = torch.randn(B, d, dtype=torch.float64, generator=g)
    return tuple(t.to(dtype) for t in (W, c, z0, grad_z))


def cuda(*tensors):
    return tuple(t.cuda() for t in tensors)


def run_forward(W, c, z0, activation, alpha, tol, max_iter):
    out = torch.ops.deqkern.fixed_point_dense(*cuda(W, c, z0), activation, alpha, tol, max_iter)
    return tuple(t.cpu() for t in out)


def run_backward(W, c, z, grad_z, activation, alpha, tol, max_iter):
    out = torch.ops.deqkern.fixed_point_dense_backward(*cuda(W, c, z, grad_z), activation, alpha, tol, max_iter)
    return tuple(t.cpu() for t in out)


def assert_matches(out, ref, dtype, tol):
    """(x, iterations, residual, converged) of a kernel against the reference, with a per-dtype tolerance."""
    x, it, res, conv = out
    x_ref, it_ref, res_ref, conv_ref = ref
    assert (x.dtype, it.dtype, res.dtype, conv.dtype) == (dtype, torch.int32, dtype, torch.bool)
    assert x.shape == x_ref.shape and it.shape == res.shape == conv.shape == it_ref.shape
    dx = (x - x_ref).abs().nan_to_num().max().item() if x.numel() else 0.0
    di = (it - it_ref).abs().max().item() if it.numel() else 0
    print(f"max |dx| = {dx:.3e}, max |d iterations| = {di}")
    if dtype == torch.float64:
        torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-10, equal_nan=True)
        assert torch.equal(it, it_ref)
        torch.testing.assert_close(res, res_ref, rtol=1e-5, atol=1e-14, equal_nan=True)
    else:
        torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-4, equal_nan=True)
        assert di <= 1
        torch.testing.assert_close(res, res_ref, rtol=0.5, atol=tol, equal_nan=True)
    assert torch.equal(conv, conv_ref)


def check_forward(B, d, dtype, activation, alpha, tol=None, max_iter=MAX_ITER):
    tol = TOL[dtype] if tol is None else tol
    W, c, z0, _ = make_problem(B, d, dtype, activation)
    ref = fixed_point_dense_ref(W, c, z0, activation, alpha, tol, max_iter)
    out = run_forward(W, c, z0, activation, alpha, tol, max_iter)
    assert_matches(out, ref, dtype, tol)
    return out


def check_backward(B, d, dtype, activation, alpha, tol=None, max_iter=MAX_ITER):
    tol = TOL[dtype] if tol is None else tol
    W, c, z0, grad_z = make_problem(B, d, dtype, activation)
    z = fixed_point_dense_ref(W, c, z0, activation, alpha, tol, MAX_ITER)[0]
    ref = fixed_point_dense_backward_ref(W, c, z, grad_z, activation, alpha, tol, max_iter)
    out = run_backward(W, c, z, grad_z, activation, alpha, tol, max_iter)
    assert_matches(out, ref, dtype, tol)
    return out


@pytest.mark.parametrize("check", [check_forward, check_backward], ids=["fwd", "bwd"])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes(dtype, B, d, alpha, check):
    assert check(B, d, dtype, "tanh", alpha)[3].all()


@pytest.mark.parametrize("check", [check_forward, check_backward], ids=["fwd", "bwd"])
@pytest.mark.parametrize("B, d", [(1, 33), (37, 129), (130, 300)], ids=lambda v: str(v))
@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activations(dtype, activation, alpha, B, d, check):
    check(B, d, dtype, activation, alpha)


@pytest.mark.parametrize("check", [check_forward, check_backward], ids=["fwd", "bwd"])
@pytest.mark.parametrize("B, d, dtype", [(5, 3700, torch.float64), (3, 2500, torch.float64)], ids=str)
def test_wide_rows_tile_of_one(B, d, dtype, check):
    """d so large that a 4-row tile does not fit in shared memory: the one-row fallback."""
    check(B, d, dtype, "tanh", 0.6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_iter_reached(dtype):
    for check in (check_forward, check_backward):
        x, it, res, conv = check(37, 33, dtype, "tanh", 0.6, tol=1e-30, max_iter=5)
        assert (it == 5).all() and not conv.any()


def solve_rows_alone(solve, args, rows):
    """Each row solved in a batch of its own, stacked: the per-sample stopping rule makes it equal the batch."""
    W, *batched = args
    outs = [solve(W, *(t[b : b + 1] for t in batched)) for b in rows]
    return tuple(torch.cat(parts) for parts in zip(*outs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_sample_stopping(dtype):
    B, d, tol = 37, 64, TOL[dtype]
    W, c, z0, grad_z = make_problem(B, d, dtype)
    c = c * torch.logspace(-2, 1.3, B, dtype=dtype)[:, None]  # saturated rows converge faster
    z = fixed_point_dense_ref(W, c, z0, "tanh", 0.6, tol, MAX_ITER)[0]
    forward = lambda W, c, z0: run_forward(W, c, z0, "tanh", 0.6, tol, MAX_ITER)  # noqa: E731
    backward = lambda W, c, z, g: run_backward(W, c, z, g, "tanh", 0.6, tol, MAX_ITER)  # noqa: E731
    for solve, ref, args in [
        (forward, fixed_point_dense_ref, (W, c, z0)),
        (backward, fixed_point_dense_backward_ref, (W, c, z, grad_z)),
    ]:
        out = solve(*args)
        assert_matches(out, ref(*args, "tanh", 0.6, tol, MAX_ITER), dtype, tol)
        assert out[1].unique().numel() > 1 and out[3].all()
        for a, b in zip(out, solve_rows_alone(solve, args, range(B))):
            assert torch.equal(a, b)


def assert_not_iterated(out, rows, start):
    """The rows of a sample with a non-finite input: never iterated, x is its start (NaN included), residual NaN."""
    x, it, res, conv = out
    assert (it[rows] == 0).all() and res[rows].isnan().all() and not conv[rows].any()
    torch.testing.assert_close(x[rows], start[rows], rtol=0, atol=0, equal_nan=True)


def check_bad_rows(dtype, d, bad_inputs, activation, B=9):
    """bad_inputs: (input name, row, column, value). Forward and backward against the reference; the bad rows are
    never iterated and the others are bit-identical to solving them alone."""
    tol = TOL[dtype]
    W, c, z0, grad_z = make_problem(B, d, dtype, activation)
    z = fixed_point_dense_ref(W, c, z0, activation, 0.6, tol, MAX_ITER)[0]
    inputs = dict(W=W, c=c, z0=z0, z=z, grad_z=grad_z)
    for name, row, col, value in bad_inputs:
        inputs[name][row, col] = value
    forward = lambda W, c, z0: run_forward(W, c, z0, activation, 0.6, tol, MAX_ITER)  # noqa: E731
    backward = lambda W, c, z, g: run_backward(W, c, z, g, activation, 0.6, tol, MAX_ITER)  # noqa: E731
    results = []
    for solve, ref, args, start in [
        (forward, fixed_point_dense_ref, (W, c, z0), z0),
        (backward, fixed_point_dense_backward_ref, (W, c, z, grad_z), torch.zeros_like(z)),
    ]:
        out = solve(*args)
        expected = ref(*args, activation, 0.6, tol, MAX_ITER)
        assert_matches(out, expected, dtype, tol)
        bad = (expected[1] == 0).nonzero().flatten().tolist()
        good = [b for b in range(B) if b not in bad]
        assert_not_iterated(out, bad, start)
        assert out[3][good].all() and out[0][good].isfinite().all()
        if good:
            for a, b in zip(out, solve_rows_alone(solve, args, good)):
                assert torch.equal(a[good], b)
        results.append(bad)
    return results


# d = 33: 4-row tiles with W in shared memory; 300: 4-row tiles reading W from global memory (float64).
@pytest.mark.parametrize("d", [33, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_row_not_iterated(dtype, d):
    """A NaN in a row of c: that sample alone is flagged, in the forward and in the backward."""
    fwd_bad, bwd_bad = check_bad_rows(dtype, d, [("c", 4, 2, float("nan"))], "tanh")
    assert fwd_bad == bwd_bad == [4]


@pytest.mark.parametrize("d", [33, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inf_in_c_with_tanh_is_flagged(dtype, d):
    """tanh(inf) = 1 would hide it from the residual: the kernel flags the row from its input."""
    fwd_bad, bwd_bad = check_bad_rows(dtype, d, [("c", 1, d - 1, float("inf")), ("c", 6, 0, -float("inf"))], "tanh")
    assert fwd_bad == bwd_bad == [1, 6]


@pytest.mark.parametrize("d", [33, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_z0_flags_forward_only(dtype, d):
    fwd_bad, bwd_bad = check_bad_rows(dtype, d, [("z0", 3, 5, float("nan")), ("z0", 8, 0, float("inf"))], "relu")
    assert fwd_bad == [3, 8] and bwd_bad == []


@pytest.mark.parametrize("d", [33, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_nan_in_grad_z_or_z(dtype, d):
    """The backward also checks its own inputs z and grad_z; the forward (which reads neither) is unaffected."""
    bad_inputs = [("grad_z", 2, 7, float("nan")), ("z", 5, d - 1, float("nan")), ("grad_z", 7, 0, float("inf"))]
    fwd_bad, bwd_bad = check_bad_rows(dtype, d, bad_inputs, "tanh")
    assert fwd_bad == [] and bwd_bad == [2, 5, 7]


@pytest.mark.parametrize("d", [33, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tile_of_only_bad_rows(dtype, d):
    """Rows 0-3 (the whole first 4-row tile) flagged: that block exits without iterating, the others solve."""
    bad_inputs = [("c", 0, 0, float("nan")), ("c", 1, 1, float("inf")), ("z0", 2, 2, float("nan")),
                  ("z0", 3, 3, -float("inf")), ("grad_z", 0, 0, float("nan")), ("z", 1, 2, float("nan")),
                  ("grad_z", 2, 3, float("inf")), ("z", 3, 4, float("inf"))]
    fwd_bad, bwd_bad = check_bad_rows(dtype, d, bad_inputs, "tanh")
    assert fwd_bad == bwd_bad == [0, 1, 2, 3]


@pytest.mark.parametrize("d", [1, 33, 300, 2500])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_W_flags_every_row(dtype, d):
    """One NaN in W, in its last row: every sample of both solves is flagged (W in shared memory, in global
    memory, and in float64 with d = 2500 the one-row tiles)."""
    fwd_bad, bwd_bad = check_bad_rows(dtype, d, [("W", d - 1, d // 2, float("nan"))], "tanh", B=5)
    assert fwd_bad == bwd_bad == list(range(5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch(dtype):
    W, c, z0, grad_z = cuda(*make_problem(0, 5, dtype))
    for out in [
        torch.ops.deqkern.fixed_point_dense(W, c, z0, "tanh", 1.0, 1e-6, 10),
        torch.ops.deqkern.fixed_point_dense_backward(W, c, z0, grad_z, "tanh", 1.0, 1e-6, 10),
    ]:
        assert [tuple(t.shape) for t in out] == [(0, 5), (0,), (0,), (0,)]
        assert [t.dtype for t in out] == [dtype, torch.int32, dtype, torch.bool]
        assert all(t.is_cuda for t in out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    W, c, z0, grad_z = make_problem(5, 33, dtype)
    z = fixed_point_dense_ref(W, c, z0, "tanh", 0.6, TOL[dtype], MAX_ITER)[0]
    W, c, z0, grad_z, z = cuda(W, c, z0, grad_z, z)
    torch.library.opcheck(torch.ops.deqkern.fixed_point_dense.default, (W, c, z0, "tanh", 0.6, 1e-6, 200))
    torch.library.opcheck(
        torch.ops.deqkern.fixed_point_dense_backward.default, (W, c, z, grad_z, "tanh", 0.6, 1e-6, 200)
    )

"""Triton fixed_point_dense (forward and adjoint) against deqkern.reference.

Without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1, so the sizes stay small.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the import of the kernels

from deqkern.activations import ACTIVATIONS  # noqa: E402
from deqkern.reference import fixed_point_dense_backward_ref, fixed_point_dense_ref  # noqa: E402
from deqkern.triton_kernels.fixed_point_dense import (  # noqa: E402
    _launch,
    fixed_point_dense_backward_triton,
    fixed_point_dense_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}          # solver tolerance
ATOL = {torch.float64: 1e-10, torch.float32: 1e-4}        # comparison tolerance
MAX_ITER = 300


def make_problem(batch, d, dtype, seed=0, spread=True):
    """W with spectral norm 0.9; rows of c scaled over 3 decades so that rows converge at different speeds."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    W = 0.9 * A / torch.linalg.matrix_norm(A, 2)
    c = torch.randn(batch, d, generator=g, dtype=torch.float64)
    if spread:
        c = c * torch.logspace(-2, 1, batch, dtype=torch.float64)[:, None]
    z0 = 0.1 * torch.randn(batch, d, generator=g, dtype=torch.float64)
    grad_z = torch.randn(batch, d, generator=g, dtype=torch.float64)
    return [t.to(device=DEVICE, dtype=dtype) for t in (W, c, z0, grad_z)]


def assert_matches(out, ref, dtype, exact_iterations=None):
    z, iters, residual, converged = out
    z_ref, iters_ref, residual_ref, converged_ref = ref
    diff = (z.double() - z_ref.double()).abs()
    print(f"max |dz| {diff.max().item() if diff.numel() else 0:.3e}, iterations {iters.tolist()} vs {iters_ref.tolist()}")
    assert z.dtype == dtype and residual.dtype == dtype
    assert iters.dtype == torch.int32 and converged.dtype == torch.bool
    assert z.shape == z_ref.shape and iters.shape == residual.shape == converged.shape == iters_ref.shape
    torch.testing.assert_close(z, z_ref, atol=ATOL[dtype], rtol=ATOL[dtype], equal_nan=True)
    if exact_iterations if exact_iterations is not None else dtype == torch.float64:
        assert torch.equal(iters, iters_ref)
        assert torch.equal(converged, converged_ref)
    else:
        # float32 residuals near tol differ in the last bits, which can move the stop by an iteration or two.
        assert (iters - iters_ref).abs().max().item() <= 2
    # Once stopped, the residual is tiny, so compare it absolutely.
    torch.testing.assert_close(residual, residual_ref, atol=ATOL[dtype], rtol=1e-3, equal_nan=True)


# (batch, d, activation, alpha, dtype): every activation in both dtypes, every batch size, width and alpha.
# float64 with d > 32 goes through the scratch (column-block) path, the rest keeps rows in registers.
CASES = [
    (1, 1, "identity", 1.0, torch.float64),
    (3, 5, "relu", 0.6, torch.float64),
    (17, 5, "tanh", 1.0, torch.float64),
    (17, 33, "sigmoid", 0.6, torch.float64),
    (3, 70, "softsign", 1.0, torch.float64),
    (17, 1, "relu6", 0.6, torch.float64),
    (17, 1, "relu6", 1.0, torch.float32),
    (1, 5, "softsign", 0.6, torch.float32),
    (3, 33, "identity", 0.6, torch.float32),
    (17, 33, "relu", 1.0, torch.float32),
    (17, 70, "tanh", 0.6, torch.float32),
    (3, 70, "sigmoid", 1.0, torch.float32),
]
IDS = [f"B{b}-D{d}-{a}-alpha{al}-{str(t)[6:]}" for b, d, a, al, t in CASES]


def test_cases_cover_every_activation():
    for dtype in (torch.float32, torch.float64):
        assert {a for _, _, a, _, t in CASES if t == dtype} == set(ACTIVATIONS)


@pytest.mark.parametrize("batch,d,activation,alpha,dtype", CASES, ids=IDS)
def test_forward_matches_reference(batch, d, activation, alpha, dtype):
    W, c, z0, _ = make_problem(batch, d, dtype)
    args = (activation, alpha, TOL[dtype], MAX_ITER)
    out = fixed_point_dense_triton(W, c, z0, *args)
    ref = fixed_point_dense_ref(W, c, z0, *args)
    assert ref[3].all()
    assert_matches(out, ref, dtype)


@pytest.mark.parametrize("batch,d,activation,alpha,dtype", CASES[::2], ids=IDS[::2])
def test_backward_matches_reference(batch, d, activation, alpha, dtype):
    W, c, z0, grad_z = make_problem(batch, d, dtype)
    z = fixed_point_dense_ref(W, c, z0, activation, alpha, TOL[dtype], MAX_ITER)[0]
    args = (activation, alpha, TOL[dtype], MAX_ITER)
    out = fixed_point_dense_backward_triton(W, c, z, grad_z, *args)
    ref = fixed_point_dense_backward_ref(W, c, z, grad_z, *args)
    assert_matches(out, ref, dtype)


@pytest.mark.parametrize("adjoint", [False, True], ids=["forward", "adjoint"])
def test_scratch_path_float32(adjoint):
    """The column-block path with a scratch buffer, forced on a width whose blocks do not divide it."""
    batch, d, dtype = 17, 70, torch.float32
    W, c, z0, grad_z = make_problem(batch, d, dtype)
    config = dict(IN_REGISTERS=False, BLOCK_B=16, BLOCK_N=32, BLOCK_K=16)
    args = ("tanh", 0.6, TOL[dtype], MAX_ITER)
    if adjoint:
        z = fixed_point_dense_ref(W, c, z0, *args)[0]
        out = _launch(W, c, z, grad_z, *args, adjoint=True, config=config)
        ref = fixed_point_dense_backward_ref(W, c, z, grad_z, *args)
    else:
        out = _launch(W, c, z0, None, *args, adjoint=False, config=config)
        ref = fixed_point_dense_ref(W, c, z0, *args)
    assert_matches(out, ref, dtype)


@pytest.mark.parametrize("d", [5, 33], ids=["registers", "scratch"])
def test_per_sample_stopping(d):
    """Rows stop at different iterations, and each row's result is that of solving it alone."""
    dtype = torch.float64
    W, c, z0, _ = make_problem(5, d, dtype)
    c[2] *= 30  # saturates tanh: this row converges in a few iterations
    args = ("tanh", 0.6, 1e-8, MAX_ITER)
    out = fixed_point_dense_triton(W, c, z0, *args)
    assert_matches(out, fixed_point_dense_ref(W, c, z0, *args), dtype)
    assert len(set(out[1].tolist())) > 1
    for row in (0, 2):
        alone = fixed_point_dense_triton(W, c[row:row + 1], z0[row:row + 1], *args)
        assert torch.equal(alone[0][0], out[0][row]) and alone[1][0] == out[1][row]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_max_iter_reached(dtype):
    W, c, z0, grad_z = make_problem(3, 5, dtype)
    args = ("sigmoid", 1.0, 0.0, 4)
    out = fixed_point_dense_triton(W, c, z0, *args)
    ref = fixed_point_dense_ref(W, c, z0, *args)
    assert_matches(out, ref, dtype, exact_iterations=True)
    assert not out[3].any() and (out[1] == 4).all()
    back = fixed_point_dense_backward_triton(W, c, ref[0], grad_z, *args)
    assert_matches(back, fixed_point_dense_backward_ref(W, c, ref[0], grad_z, *args), dtype, exact_iterations=True)


def test_zero_iterations_and_empty_batch():
    W, c, z0, _ = make_problem(3, 5, torch.float64)
    z, iters, residual, converged = fixed_point_dense_triton(W, c, z0, "relu", 1.0, 1e-6, 0)
    assert torch.equal(z, z0) and (iters == 0).all() and torch.isnan(residual).all() and not converged.any()
    for out in (fixed_point_dense_triton(W, c[:0], z0[:0], "relu", 1.0, 1e-6, 10),
                fixed_point_dense_backward_triton(W, c[:0], z0[:0], z0[:0], "relu", 1.0, 1e-6, 10)):
        assert [tuple(t.shape) for t in out] == [(0, 5), (0,), (0,), (0,)]
        assert [t.dtype for t in out] == [torch.float64, torch.int32, torch.float64, torch.bool]


def assert_not_iterated(out, rows, start):
    """The rows of a non-finite sample: never iterated, x is its start (NaN included), residual NaN."""
    x, iters, residual, converged = out
    assert (iters[rows] == 0).all() and torch.isnan(residual[rows]).all() and not converged[rows].any()
    torch.testing.assert_close(x[rows], start[rows], rtol=0, atol=0, equal_nan=True)


def assert_rows_alone(solve, args, out, good):
    """The finite rows: converged, and bit-identical to a batch of only them (the bad rows left no trace)."""
    assert out[3][good].all() and out[0][good].isfinite().all()
    W, *batched = args
    alone = solve(W, *(t[good] for t in batched))
    for a, b in zip(out, alone):
        assert torch.equal(a[good], b)


# (input, value, activation): NaN anywhere, and an Inf that tanh would hide (tanh(inf) = 1).
FORWARD_BAD_INPUTS = [("c", float("nan"), "relu"), ("c", float("inf"), "tanh"), ("c", -float("inf"), "sigmoid"),
                      ("z0", float("nan"), "tanh"), ("z0", float("inf"), "relu")]
BACKWARD_BAD_INPUTS = [("grad_z", float("nan"), "tanh"), ("grad_z", float("inf"), "relu"),
                       ("z", float("nan"), "tanh"), ("c", float("inf"), "tanh"), ("c", float("nan"), "sigmoid")]


@pytest.mark.parametrize("d", [5, 33], ids=["registers", "scratch"])
@pytest.mark.parametrize("name,value,activation", FORWARD_BAD_INPUTS, ids=lambda v: str(v))
def test_nonfinite_row_not_iterated(d, name, value, activation):
    dtype, bad, good = torch.float64, 1, [0, 2, 3]
    W, c, z0, _ = make_problem(4, d, dtype)
    inputs = dict(c=c, z0=z0)
    inputs[name][bad, 2] = value
    args = (activation, 0.6, 1e-8, MAX_ITER)
    out = fixed_point_dense_triton(W, c, z0, *args)
    assert_matches(out, fixed_point_dense_ref(W, c, z0, *args), dtype)
    assert_not_iterated(out, [bad], z0)
    assert_rows_alone(lambda *a: fixed_point_dense_triton(*a, *args), (W, c, z0), out, good)


@pytest.mark.parametrize("d", [5, 33], ids=["registers", "scratch"])
@pytest.mark.parametrize("name,value,activation", BACKWARD_BAD_INPUTS, ids=lambda v: str(v))
def test_backward_nonfinite_row_not_iterated(d, name, value, activation):
    dtype, bad, good = torch.float64, 2, [0, 1, 3]
    W, c, z0, grad_z = make_problem(4, d, dtype)
    args = (activation, 0.6, 1e-8, MAX_ITER)
    z = fixed_point_dense_ref(W, c, z0, *args)[0]
    inputs = dict(c=c, z=z, grad_z=grad_z)
    inputs[name][bad, 0] = value
    out = fixed_point_dense_backward_triton(W, c, z, grad_z, *args)
    assert_matches(out, fixed_point_dense_backward_ref(W, c, z, grad_z, *args), dtype)
    assert_not_iterated(out, [bad], torch.zeros_like(z))
    assert_rows_alone(lambda *a: fixed_point_dense_backward_triton(*a, *args), (W, c, z, grad_z), out, good)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("d", [5, 33, 70], ids=["D5", "D33", "D70"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_W_flags_every_row(value, d, dtype):
    """One bad entry of W, far from the first block: no row is iterated, in either solve."""
    W, c, z0, grad_z = make_problem(17, d, dtype)
    W[d - 1, d // 2] = value
    args = ("tanh", 0.6, TOL[dtype], MAX_ITER)
    out = fixed_point_dense_triton(W, c, z0, *args)
    assert_matches(out, fixed_point_dense_ref(W, c, z0, *args), dtype, exact_iterations=True)
    assert_not_iterated(out, slice(None), z0)
    back = fixed_point_dense_backward_triton(W, c, z0, grad_z, *args)
    assert_matches(back, fixed_point_dense_backward_ref(W, c, z0, grad_z, *args), dtype, exact_iterations=True)
    assert_not_iterated(back, slice(None), torch.zeros_like(z0))


@pytest.mark.parametrize("adjoint", [False, True], ids=["forward", "adjoint"])
@pytest.mark.parametrize("in_registers", [True, False], ids=["registers", "scratch"])
def test_tile_of_only_bad_rows(in_registers, adjoint):
    """BLOCK_B = 2 with rows 0 and 1 bad: a program whose rows are all flagged, next to programs that iterate."""
    dtype = torch.float64
    W, c, z0, grad_z = make_problem(5, 5, dtype)
    c[0, 1] = float("nan")
    (grad_z if adjoint else z0)[1, 4] = float("inf")
    config = dict(IN_REGISTERS=in_registers, BLOCK_B=2, BLOCK_N=16, BLOCK_K=16 if in_registers else 8)
    args = ("tanh", 0.6, 1e-9, MAX_ITER)
    if adjoint:
        out = _launch(W, c, z0, grad_z, *args, adjoint=True, config=config)
        ref = fixed_point_dense_backward_ref(W, c, z0, grad_z, *args)
        start = torch.zeros_like(z0)
    else:
        out = _launch(W, c, z0, None, *args, adjoint=False, config=config)
        ref = fixed_point_dense_ref(W, c, z0, *args)
        start = z0
    assert_matches(out, ref, dtype)
    assert_not_iterated(out, [0, 1], start)
    assert out[3][2:].all()


def test_nonfinite_rows_float32_scratch():
    """float32 (tl.dot) through the scratch path: a NaN in z0 and an Inf in c (tanh) in two rows."""
    batch, d, dtype = 17, 70, torch.float32
    W, c, z0, grad_z = make_problem(batch, d, dtype)
    z0[3, 69] = float("nan")
    c[16, 0] = float("inf")
    args = ("tanh", 0.6, TOL[dtype], MAX_ITER)
    out = fixed_point_dense_triton(W, c, z0, *args)
    assert_matches(out, fixed_point_dense_ref(W, c, z0, *args), dtype)
    assert_not_iterated(out, [3, 16], z0)
    good = [b for b in range(batch) if b not in (3, 16)]
    assert out[3][good].all()


def test_unknown_activation_and_bad_shapes():
    W, c, z0, _ = make_problem(2, 5, torch.float64)
    with pytest.raises(ValueError, match="unknown activation"):
        fixed_point_dense_triton(W, c, z0, "gelu", 1.0, 1e-6, 10)
    with pytest.raises(RuntimeError):
        fixed_point_dense_triton(W[:4], c, z0, "relu", 1.0, 1e-6, 10)


def test_opcheck():
    W, c, z0, grad_z = make_problem(3, 5, torch.float64)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.deqkern.fixed_point_dense_triton.default,
                          (W, c, z0, "tanh", 0.6, 1e-8, 50), test_utils=tests)
    torch.library.opcheck(torch.ops.deqkern.fixed_point_dense_backward_triton.default,
                          (W, c, z0, grad_z, "tanh", 0.6, 1e-8, 50), test_utils=tests)


def test_torch_compile_fullgraph():
    W, c, z0, _ = make_problem(3, 5, torch.float64)

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=False)
    def solve(W, c, z0):
        z, iters, residual, converged = fixed_point_dense_triton(W, c, z0, "tanh", 1.0, 1e-9, 100)
        return 2 * z, converged

    z2, converged = solve(W, c, z0)
    ref = fixed_point_dense_ref(W, c, z0, "tanh", 1.0, 1e-9, 100)
    torch.testing.assert_close(z2, 2 * ref[0], atol=1e-10, rtol=1e-10)
    assert torch.equal(converged, ref[3])

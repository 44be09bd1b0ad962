"""fixed_point_dense and fixed_point_dense_backward on every backend (cpu, cuda, triton) against
deqkern/reference/fixed_point_dense.py, then the public deqkern.fixed_point_dense: checks, the non-convergence policy,
implicit gradients and torch.compile."""
import warnings

import pytest
import torch

import deqkern
from deqkern.activations import ACTIVATIONS
from deqkern.core.backends import kernel
from deqkern.reference import fixed_point_dense_backward_ref, fixed_point_dense_ref

import kit

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
MAX_ITER = 300
NAN, INF = float("nan"), float("inf")


def forward(backend):
    return kernel("fixed_point_dense", backend)


def backward(backend):
    return kernel("fixed_point_dense_backward", backend)


def reference_fixed_point(W, c, z0, activation, alpha=1.0):
    return fixed_point_dense_ref(W, c, z0, activation, alpha, 1e-10, 500)[0]


# ---------------------------------------------------------------- every backend against the reference
# (batch, d, activation, alpha, dtype). The compiled backends run the whole grid; the Triton interpreter runs
# SMALL, which still covers every activation in both dtypes, rows in registers (float64 d <= 32, float32 d <= 64) and
# the scratch path.
GRID = [(b, d, a, al, t) for b, d in [(1, 1), (3, 5), (37, 33), (130, 129), (5, 300), (64, 64)]
        for a in sorted(ACTIVATIONS) for al in (1.0, 0.6) for t in (torch.float64, torch.float32)]
SMALL = [(1, 1, "identity", 1.0, torch.float64), (3, 5, "relu", 0.6, torch.float64),
         (17, 5, "tanh", 1.0, torch.float64), (17, 33, "sigmoid", 0.6, torch.float64),
         (3, 70, "softsign", 1.0, torch.float64), (17, 1, "relu6", 0.6, torch.float64),
         (17, 1, "relu6", 1.0, torch.float32), (1, 5, "softsign", 0.6, torch.float32),
         (3, 33, "identity", 0.6, torch.float32), (17, 33, "relu", 1.0, torch.float32),
         (17, 70, "tanh", 0.6, torch.float32), (3, 70, "sigmoid", 1.0, torch.float32)]


def case_id(case):
    b, d, a, al, t = case
    return f"B{b}-D{d}-{a}-alpha{al}-{kit.dtype_id(t)}"


CASES = kit.backend_params([(case_id(c), c) for c in dict.fromkeys(GRID + SMALL)],
                           small={case_id(c) for c in SMALL})


def test_small_cases_cover_every_activation():
    for dtype in (torch.float32, torch.float64):
        assert {a for _, _, a, _, t in SMALL if t == dtype} == set(ACTIVATIONS)


@pytest.mark.parametrize("backend,batch,d,activation,alpha,dtype", CASES)
def test_forward_matches_reference(backend, batch, d, activation, alpha, dtype):
    W, c, z0 = kit.dense_problem(batch, d, dtype, kit.device_of(backend))
    out = forward(backend)(W, c, z0, activation, alpha, TOL[dtype], MAX_ITER)
    ref = fixed_point_dense_ref(W.cpu(), c.cpu(), z0.cpu(), activation, alpha, TOL[dtype], MAX_ITER)
    kit.assert_solve_matches(out, ref, dtype)


@pytest.mark.parametrize("backend,batch,d,activation,alpha,dtype", CASES)
def test_backward_matches_reference(backend, batch, d, activation, alpha, dtype):
    W, c, z0 = kit.dense_problem(batch, d, dtype, seed=1)
    z = reference_fixed_point(W, c, z0, activation)
    grad_z = kit.random_like(z)
    args = (activation, alpha, TOL[dtype], MAX_ITER)
    out = backward(backend)(*kit.to_device(kit.device_of(backend), W, c, z, grad_z), *args)
    kit.assert_solve_matches(out, fixed_point_dense_backward_ref(W, c, z, grad_z, *args), dtype)


# (batch, d, activation, alpha, dtype) of the backward with the Jacobian penalty: activations with and without
# curvature; on Triton rows in registers and the scratch path (float64 d > 32, float32 d > 64); an empty batch.
PENALTY_CASES = [(3, 5, "tanh", 1.0, torch.float64), (17, 33, "sigmoid", 0.6, torch.float64),
                 (5, 70, "softsign", 1.0, torch.float32), (17, 20, "relu", 0.6, torch.float32),
                 (0, 7, "tanh", 1.0, torch.float64)]


@pytest.mark.parametrize("backend,batch,d,activation,alpha,dtype",
                         kit.backend_params([(case_id(c), c) for c in PENALTY_CASES]))
def test_backward_with_jacobian_penalty_matches_reference(backend, batch, d, activation, alpha, dtype):
    """jacobian_penalty = w: grad_u gains w dP/du, and the penalty's row term and value P come back, as the
    reference's (with_jacobian_penalty); the solve's own outputs do not change."""
    W, c, z0 = kit.dense_problem(batch, d, dtype, seed=2)
    z = reference_fixed_point(W, c, z0, activation)
    grad_z = kit.random_like(z)
    args = (activation, alpha, TOL[dtype], MAX_ITER)
    inputs = kit.to_device(kit.device_of(backend), W, c, z, grad_z)
    out = backward(backend)(*inputs, *args, 0.7)
    ref = fixed_point_dense_backward_ref(W, c, z, grad_z, *args, 0.7)
    kit.assert_solve_matches(out, ref, dtype)
    assert out[4].shape == (d,) and out[5].shape == ()
    plain = backward(backend)(*inputs, *args)
    assert [tuple(t.shape) for t in plain[4:]] == [(0,), (0,)]
    for with_penalty, without in zip(out[1:4], plain[1:4]):
        assert torch.equal(with_penalty, without)
    if batch and activation != "relu":  # relu has no curvature: its term is 0
        assert not torch.allclose(out[0], plain[0])


def test_jacobian_penalty_with_flagged_rows(backend):
    """Rows with a non-finite input are not iterated, and the penalty's terms are the reference's all the same: NaN
    where u = z W^T + c is (and in the column sums it enters), finite where only grad_z was bad."""
    W, c, z0 = kit.dense_problem(5, 6, seed=4)
    z = reference_fixed_point(W, c, z0, "tanh")
    grad_z = kit.random_like(z)
    c[1, 2], grad_z[3, 0] = NAN, INF
    args = ("tanh", 1.0, 1e-10, MAX_ITER, 0.5)
    out = backward(backend)(*kit.to_device(kit.device_of(backend), W, c, z, grad_z), *args)
    ref = fixed_point_dense_backward_ref(W, c, z, grad_z, *args)
    kit.assert_solve_matches(out, ref, torch.float64)
    assert out[1].tolist() == [out[1][0], 0, out[1][2], 0, out[1][4]] and out[0][3].isfinite().all()


@pytest.mark.parametrize("layout", ["strided", "transposed", "broadcast"])
def test_any_strides(backend, layout):
    """The one contiguity rule: every input may have any strides (stride 0 included)."""
    device = kit.device_of(backend)
    W, c, z0 = kit.dense_problem(5, 12, device=device)
    z0 = z0[:1].expand(5, 12).contiguous()
    if layout == "strided":
        args = (kit.strided(W), kit.strided(c), kit.strided(z0))
    elif layout == "transposed":
        args = (W.T.contiguous().T, c.T.contiguous().T, z0.T.contiguous().T)
    else:
        args = (W, c, z0[:1].expand(5, 12))
    out = forward(backend)(*args, "tanh", 0.7, 1e-10, MAX_ITER)
    kit.assert_solve_matches(out, fixed_point_dense_ref(W.cpu(), c.cpu(), z0.cpu(), "tanh", 0.7, 1e-10, MAX_ITER),
                             torch.float64)
    z = reference_fixed_point(W.cpu(), c.cpu(), z0.cpu(), "tanh").to(device)
    grad_z = kit.random_like(z)
    back = backward(backend)(W.T.contiguous().T, kit.strided(c), kit.strided(z), grad_z[:1].expand(5, 12),
                             "tanh", 1.0, 1e-10, MAX_ITER)
    ref = fixed_point_dense_backward_ref(W.cpu(), c.cpu(), z.cpu(), grad_z[:1].expand(5, 12).cpu(), "tanh", 1.0,
                                         1e-10, MAX_ITER)
    kit.assert_solve_matches(back, ref, torch.float64)
    # and with the Jacobian penalty, which reads W, c and z again
    back = backward(backend)(W.T.contiguous().T, kit.strided(c), kit.strided(z), grad_z[:1].expand(5, 12),
                             "tanh", 1.0, 1e-10, MAX_ITER, 0.5)
    ref = fixed_point_dense_backward_ref(W.cpu(), c.cpu(), z.cpu(), grad_z[:1].expand(5, 12).cpu(), "tanh", 1.0,
                                         1e-10, MAX_ITER, 0.5)
    kit.assert_solve_matches(back, ref, torch.float64)


@pytest.mark.parametrize("d", [5, 33])
def test_samples_stop_independently(backend, d):
    """Rows stop at different iterations, and each row's result is that of solving it alone."""
    W, c, z0 = kit.dense_problem(6, d, device=kit.device_of(backend))
    c[2] *= 30  # saturates tanh: this row converges in a few iterations
    z = reference_fixed_point(W, c, z0, "tanh")
    for solve, args in ((forward(backend), (W, c, z0)), (backward(backend), (W, c, z, kit.random_like(z)))):
        out = solve(*args, "tanh", 0.6, 1e-8, MAX_ITER)
        assert out[3].all() and out[1].unique().numel() > 1, out[1]
        for row in (0, 2, 5):
            alone = solve(args[0], *(t[row:row + 1] for t in args[1:]), "tanh", 0.6, 1e-8, MAX_ITER)
            torch.testing.assert_close(alone[0][0], out[0][row], rtol=1e-12, atol=1e-12)
            assert alone[1][0] == out[1][row]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=kit.dtype_id)
def test_max_iter_reached(backend, dtype):
    W, c, z0 = kit.dense_problem(3, 5, dtype, kit.device_of(backend), norm=0.99)
    args = ("sigmoid", 1.0, 1e-30, 4)
    out = forward(backend)(W, c, z0, *args)
    ref = fixed_point_dense_ref(W.cpu(), c.cpu(), z0.cpu(), *args)
    assert not out[3].any() and (out[1] == 4).all()
    torch.testing.assert_close(out[0].cpu(), ref[0], rtol=kit.TOLERANCES[dtype].rtol, atol=kit.TOLERANCES[dtype].atol)
    back = backward(backend)(W, c, out[0], kit.random_like(c), *args)
    assert not back[3].any() and (back[1] == 4).all()


def test_empty_batch(backend):
    W, c, z0 = kit.dense_problem(0, 5, device=kit.device_of(backend))
    for out in (forward(backend)(W, c, z0, "relu", 1.0, 1e-6, 10),
                backward(backend)(W, c, z0, z0, "relu", 1.0, 1e-6, 10)[:4]):
        assert [tuple(t.shape) for t in out] == [(0, 5), (0,), (0,), (0,)]
        assert [t.dtype for t in out] == [torch.float64, torch.int32, torch.float64, torch.bool]


# ---------------------------------------------------------------- non-finite input: flagged per sample by the kernel
def assert_not_iterated(out, rows, start):
    """The rows of a sample with a non-finite input: never iterated, x is its start (NaN included), residual NaN."""
    x, iterations, residual, converged = (t.cpu() for t in out[:4])
    assert (iterations[rows] == 0).all() and residual[rows].isnan().all() and not converged[rows].any()
    torch.testing.assert_close(x[rows], start.cpu()[rows], rtol=0, atol=0, equal_nan=True)


def check_bad_rows(backend, d, bad_inputs, activation, batch=9, dtype=torch.float64):
    """bad_inputs: (input, row, column, value). Both solves against the reference; the bad rows are never iterated
    and the others equal a batch of only them. Returns the bad rows (forward, backward)."""
    W, c, z0 = kit.dense_problem(batch, d, dtype)
    z = reference_fixed_point(W, c, z0, activation)
    grad_z = kit.random_like(z)
    inputs = dict(W=W, c=c, z0=z0, z=z, grad_z=grad_z)
    for name, row, col, value in bad_inputs:
        inputs[name][row, col] = value
    device = kit.device_of(backend)
    bad_rows = []
    for solve, ref, args, start in ((forward(backend), fixed_point_dense_ref, (W, c, z0), z0),
                                    (backward(backend), fixed_point_dense_backward_ref, (W, c, z, grad_z),
                                     torch.zeros_like(z))):
        out = solve(*kit.to_device(device, *args), activation, 0.6, TOL[dtype], MAX_ITER)
        expected = ref(*args, activation, 0.6, TOL[dtype], MAX_ITER)
        kit.assert_solve_matches(out, expected, dtype)
        bad = (expected[1] == 0).nonzero().flatten().tolist()
        good = [b for b in range(batch) if b not in bad]
        assert_not_iterated(out, bad, start)
        if good:
            alone = solve(*kit.to_device(device, args[0], *(t[good] for t in args[1:])), activation, 0.6,
                          TOL[dtype], MAX_ITER)
            for a, b in zip(out[:4], alone[:4]):
                torch.testing.assert_close(a[good], b, rtol=1e-12, atol=1e-12)
        bad_rows.append(bad)
    return bad_rows


# d = 5: rows in registers (Triton), W in shared memory (CUDA); 33: the scratch path (Triton float64); 300: W read
# from global memory (CUDA float64).
BAD_WIDTHS = kit.backend_params([(f"D{d}", (d,)) for d in (5, 33, 300)], small={"D5", "D33"})


@pytest.mark.parametrize("backend,d", BAD_WIDTHS)
def test_nan_row_not_iterated(backend, d):
    """A NaN in a row of c: that sample alone is flagged, in the forward and in the backward."""
    assert check_bad_rows(backend, d, [("c", 4, 2, NAN)], "relu") == [[4], [4]]


@pytest.mark.parametrize("backend,d", BAD_WIDTHS)
def test_inf_in_c_with_tanh_is_flagged(backend, d):
    """tanh(inf) = 1 would hide it from the residual: the kernel flags the row from its input."""
    assert check_bad_rows(backend, d, [("c", 1, d - 1, INF), ("c", 6, 0, -INF)], "tanh") == [[1, 6], [1, 6]]


@pytest.mark.parametrize("backend,d", BAD_WIDTHS)
def test_nonfinite_z0_flags_forward_only(backend, d):
    assert check_bad_rows(backend, d, [("z0", 3, 1, NAN), ("z0", 8, 0, INF)], "relu") == [[3, 8], []]


@pytest.mark.parametrize("backend,d", BAD_WIDTHS)
def test_backward_checks_grad_z_and_z(backend, d):
    """The backward also checks its own inputs z and grad_z; the forward (which reads neither) is unaffected."""
    bad = [("grad_z", 2, 3, NAN), ("z", 5, d - 1, NAN), ("grad_z", 7, 0, INF)]
    assert check_bad_rows(backend, d, bad, "sigmoid") == [[], [2, 5, 7]]


@pytest.mark.parametrize("backend,d", BAD_WIDTHS)
def test_tile_of_only_bad_rows(backend, d):
    """Rows 0-3 flagged (the whole first tile of the CUDA kernel): that tile exits without iterating."""
    bad = [("c", 0, 0, NAN), ("c", 1, 1, INF), ("z0", 2, 2, NAN), ("z0", 3, 3, -INF), ("grad_z", 0, 0, NAN),
           ("z", 1, 2, NAN), ("grad_z", 2, 3, INF), ("z", 3, 4, INF)]
    assert check_bad_rows(backend, d, bad, "tanh") == [[0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize("backend,d", kit.backend_params([(f"D{d}", (d,)) for d in (1, 33, 70, 300)],
                                                         small={"D1", "D33", "D70"}))
def test_nonfinite_W_flags_every_row(backend, d):
    """One NaN in W, far from the first block: no row of either solve is iterated."""
    assert check_bad_rows(backend, d, [("W", d - 1, d // 2, NAN)], "tanh", batch=5) == [list(range(5))] * 2


@pytest.mark.parametrize("position", [(0, 0), (31, 32), (32, 31), (69, 69), (40, 5)])
def test_nan_in_W_across_the_cpu_packing_tiles(position):
    """The CPU packs W in 32 x 32 tiles (transposed for the forward): a NaN anywhere, tile edges and the ragged last
    tile included, flags every sample of the forward and backward solves, Picard and Anderson."""
    W, c, z0 = kit.dense_problem(4, 70)
    W[position] = NAN
    outs = {
        "picard": forward("cpu")(W, c, z0, "tanh", 1.0, 1e-10, 300),
        "anderson": torch.ops.deqkern.fixed_point_dense_anderson(W, c, z0, "tanh", 5, 1.0, 1e-4, 1e-10, 300),
        "picard-backward": backward("cpu")(W, c, torch.zeros_like(c), torch.ones_like(c), "tanh", 1.0, 1e-10, 300),
    }
    for name, (_, iterations, residual, converged, *_) in outs.items():
        assert not converged.any() and (iterations == 0).all() and residual.isnan().all(), name


# ---------------------------------------------------------------- backend-specific paths
@pytest.mark.parametrize("in_registers", [True, False], ids=["registers", "scratch"])
@pytest.mark.parametrize("adjoint", [False, True], ids=["forward", "adjoint"])
def test_triton_configurations(adjoint, in_registers):
    """The Triton launcher's two paths with block sizes that do not divide the width, and a program whose rows are
    all flagged (BLOCK_B = 2, rows 0 and 1 bad) next to programs that iterate."""
    if kit.unavailable("triton"):
        pytest.skip(kit.unavailable("triton"))
    from deqkern.triton_kernels.fixed_point_dense import launch

    W, c, z0 = kit.dense_problem(5, 5 if in_registers else 20, device=kit.device_of("triton"))
    grad_z = kit.random_like(c)
    c[0, 1] = NAN
    (grad_z if adjoint else z0)[1, 4] = INF
    config = dict(IN_REGISTERS=in_registers, BLOCK_B=2, BLOCK_N=16, BLOCK_K=16 if in_registers else 8)
    args = ("tanh", 0.6, 1e-9, MAX_ITER)
    if adjoint:
        out = launch(W, c, z0, grad_z, *args, adjoint=True, config=config)
        ref, start = fixed_point_dense_backward_ref(W, c, z0, grad_z, *args), torch.zeros_like(z0)
    else:
        out = launch(W, c, z0, None, *args, adjoint=False, config=config)
        ref, start = fixed_point_dense_ref(W, c, z0, *args), z0
    kit.assert_solve_matches(out, ref, torch.float64)
    assert_not_iterated(out, [0, 1], start)
    assert out[3][2:].all()


@pytest.mark.parametrize("d", [2500, 3700])
def test_cuda_wide_rows_tile_of_one(d):
    """d so large that a 4-row float64 tile does not fit in shared memory: the CUDA kernel's one-row fallback."""
    if kit.unavailable("cuda"):
        pytest.skip(kit.unavailable("cuda"))
    W, c, z0 = kit.dense_problem(3, d)
    z = reference_fixed_point(W, c, z0, "tanh", 0.6)
    kit.assert_solve_matches(forward("cuda")(*kit.to_device("cuda", W, c, z0), "tanh", 0.6, 1e-9, MAX_ITER),
                             fixed_point_dense_ref(W, c, z0, "tanh", 0.6, 1e-9, MAX_ITER), torch.float64)
    grad_z = kit.random_like(z)
    kit.assert_solve_matches(backward("cuda")(*kit.to_device("cuda", W, c, z, grad_z), "tanh", 0.6, 1e-9, MAX_ITER),
                             fixed_point_dense_backward_ref(W, c, z, grad_z, "tanh", 0.6, 1e-9, MAX_ITER),
                             torch.float64)


# ---------------------------------------------------------------- the raw ops' argument checks and registration
@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.ones(3, 4), torch.ones(2, 4), torch.ones(2, 4), "tanh", 1.0, 1e-4, 10), "square"),
        ((torch.eye(4), torch.ones(2, 3), torch.ones(2, 3), "tanh", 1.0, 1e-4, 10), "expected"),
        ((torch.eye(4), torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 4), "tanh", 1.0, 1e-4, 10), "dtype"),
        ((torch.eye(4), torch.ones(2, 4), torch.ones(2, 4), "gelu", 1.0, 1e-4, 10), "unknown activation"),
        ((torch.eye(4), torch.ones(2, 4), torch.ones(2, 4), "tanh", 0.0, 1e-4, 10), "alpha"),
        ((torch.eye(4), torch.ones(2, 4), torch.ones(2, 4), "tanh", 1.0, 0.0, 10), "tol"),
        ((torch.eye(4), torch.ones(2, 4), torch.ones(2, 4), "tanh", 1.0, 1e-4, 0), "max_iter"),
        ((torch.eye(4).int(), torch.ones(2, 4).int(), torch.ones(2, 4).int(), "tanh", 1.0, 1e-4, 5), "float32"),
    ],
)
def test_raw_op_rejects_bad_arguments(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.deqkern.fixed_point_dense(*args)


def test_opcheck(backend):
    W, c, z0 = kit.dense_problem(5, 7, device=kit.device_of(backend))
    z = reference_fixed_point(W, c, z0, "tanh")
    suffix = "_triton" if backend == "triton" else ""
    if backend == "triton":  # the Triton ops are registered when their module is first imported (on first use)
        kernel("fixed_point_dense", "triton")
    tests = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(torch.ops.deqkern, "fixed_point_dense" + suffix).default,
                          (W, c, z0, "tanh", 0.8, 1e-8, 100), test_utils=tests)
    torch.library.opcheck(getattr(torch.ops.deqkern, "fixed_point_dense_backward" + suffix).default,
                          (W, c, z, kit.random_like(z), "softsign", 1.0, 1e-8, 100), test_utils=tests)


# ---------------------------------------------------------------- the public function
def test_solution_is_a_fixed_point_and_info_is_per_sample():
    W, c, _ = kit.dense_problem(9, 17)
    z, info = deqkern.fixed_point_dense(W, c, activation="tanh", tol=1e-10, max_iter=200)
    torch.testing.assert_close(z, torch.tanh(z @ W.T + c), rtol=1e-8, atol=1e-9)
    assert info.iterations.shape == info.residual.shape == info.converged.shape == (9,)
    assert info.converged.all() and (info.residual <= 1e-10).all()


def test_default_start_is_zero_and_z0_is_used():
    W, c, z0 = kit.dense_problem(4, 8)
    z_default, _ = deqkern.fixed_point_dense(W, c, tol=1e-3, max_iter=50)
    torch.testing.assert_close(z_default, fixed_point_dense_ref(W, c, torch.zeros_like(c), "tanh", 1.0, 1e-3, 50)[0])
    z_start, _ = deqkern.fixed_point_dense(W, c, tol=1e-3, max_iter=50, z0=z0)
    torch.testing.assert_close(z_start, fixed_point_dense_ref(W, c, z0, "tanh", 1.0, 1e-3, 50)[0])


# The Triton interpreter is slow on a CPU, so it gradchecks one activation there.
GRADCHECK = kit.backend_params([(a, (a,)) for a in ("tanh", "softsign", "sigmoid", "identity")],
                               backends=("cpu", "cuda", "triton", "reference"), small={"tanh"})


@pytest.mark.parametrize("backend,activation", GRADCHECK)
def test_gradcheck(backend, activation):
    W, c, _ = kit.dense_problem(3, 5, seed=3, device=kit.device_of(backend))
    W.requires_grad_(True)
    c.requires_grad_(True)

    def solve(W, c):
        return deqkern.fixed_point_dense(W, c, activation=activation, tol=1e-13, max_iter=1000, backend=backend)[0]

    assert torch.autograd.gradcheck(solve, (W, c), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_implicit_gradient_matches_unrolled_autograd(alpha):
    """At the fixed point the implicit gradient equals backpropagation through a long unrolled solve."""
    W, c, _ = kit.dense_problem(4, 10, seed=4)
    W1, c1 = W.clone().requires_grad_(), c.clone().requires_grad_()
    z, info = deqkern.fixed_point_dense(W1, c1, alpha=alpha, tol=1e-13, max_iter=2000)
    (z.sin().sum()).backward()
    W2, c2 = W.clone().requires_grad_(), c.clone().requires_grad_()
    z2 = torch.zeros_like(c)
    for _ in range(400):
        z2 = (1 - alpha) * z2 + alpha * torch.tanh(z2 @ W2.T + c2)
    (z2.sin().sum()).backward()
    torch.testing.assert_close(W1.grad, W2.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-8, atol=1e-10)
    assert info.backward is not None and info.backward.converged.all()


def test_nonconvergence_policy():
    W, c, _ = kit.dense_problem(5, 12, norm=0.99)
    with pytest.warns(deqkern.NonConvergenceWarning, match="did not reach tol"):
        _, info = deqkern.fixed_point_dense(W, c, activation="identity", tol=1e-12, max_iter=2)
    assert not info.converged.any()
    with pytest.raises(deqkern.NonConvergenceError, match="5 of 5 samples"):
        deqkern.fixed_point_dense(W, c, activation="identity", tol=1e-12, max_iter=2, on_nonconvergence="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = deqkern.fixed_point_dense(W, c, activation="identity", tol=1e-12, max_iter=2,
                                            on_nonconvergence="ignore")
    assert not info.converged.any() and (info.iterations == 2).all()


def test_backward_nonconvergence_is_not_silent():
    W, c, _ = kit.dense_problem(3, 6, seed=5)
    W.requires_grad_(True)
    z, _ = deqkern.fixed_point_dense(W, c, tol=1e-10, max_iter=500, backward_tol=1e-14, backward_max_iter=1,
                                     on_nonconvergence="raise")
    with pytest.raises(deqkern.NonConvergenceError, match="backward"):
        z.sum().backward()


def test_divergence_raises_floating_point_error():
    W = torch.eye(4, dtype=torch.float64) * 1e30
    c = torch.ones(2, 4, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="overflowed"):
        deqkern.fixed_point_dense(W, c, activation="identity", tol=1e-6, max_iter=100)


@pytest.mark.parametrize("where", ["W", "c", "z0"])
def test_nan_or_inf_input_is_named(where):
    W, c, z0 = kit.dense_problem(3, 4)
    {"W": W, "c": c, "z0": z0}[where][1, 1] = NAN if where != "c" else INF
    with pytest.raises(ValueError, match=f"{where} contain NaN or Inf"):
        deqkern.fixed_point_dense(W, c, z0=z0, tol=1e-6)


def test_nan_in_grad_is_named():
    W, c, _ = kit.dense_problem(3, 4)
    c.requires_grad_(True)
    z, _ = deqkern.fixed_point_dense(W, c, tol=1e-8)
    with pytest.raises(ValueError, match="grad_z contain NaN"):
        z.backward(torch.full_like(z, NAN))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(W=torch.ones(3, 4)), ValueError, "square"),
        (dict(W=torch.eye(3)[None]), ValueError, "square"),
        (dict(c=torch.ones(2, 5)), ValueError, r"\(batch, 4\)"),
        (dict(c=torch.ones(4)), ValueError, r"\(batch, 4\)"),
        (dict(W=torch.eye(4, dtype=torch.int64)), TypeError, "float32 or float64"),
        (dict(c=torch.ones(2, 4, dtype=torch.float64)), TypeError, "one dtype"),
        (dict(W=torch.eye(4).bfloat16()), TypeError, "one dtype"),
        (dict(z0=torch.ones(3, 4)), ValueError, "z0 must have the shape"),
        (dict(c=[[1.0] * 4]), TypeError, "torch.Tensor"),
        (dict(activation="gelu"), ValueError, "unknown activation"),
        (dict(tol=0.0), ValueError, "tol"),
        (dict(tol=float("nan")), ValueError, "tol"),
        (dict(tol=True), ValueError, "tol"),
        (dict(max_iter=0), ValueError, "max_iter"),
        (dict(max_iter=2.5), ValueError, "max_iter"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(backward_tol=-1.0), ValueError, "backward_tol"),
        (dict(backend="tpu"), ValueError, "unknown backend"),
        (dict(backend="cuda"), ValueError, "CUDA tensors"),
        (dict(on_nonconvergence="silent"), ValueError, "on_nonconvergence"),
    ],
)
def test_bad_input_is_named(kwargs, error, message):
    args = dict(W=torch.eye(4) * 0.5, c=torch.ones(2, 4))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        deqkern.fixed_point_dense(**args)


def test_mixed_devices_are_named():
    other = "cuda" if kit.HAS_GPU else "meta"
    with pytest.raises(ValueError, match="one device"):
        deqkern.fixed_point_dense(torch.eye(4) * 0.5, torch.ones(2, 4, device=other))


def test_torch_compile_fullgraph_forward_and_backward():
    W, c, _ = kit.dense_problem(8, 16, dtype=torch.float32)
    W.requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(W, c):
        z, info = deqkern.fixed_point_dense(W, c, tol=1e-6, max_iter=200, on_nonconvergence="ignore")
        return (z**2).sum(), info.iterations

    loss, iterations = loss_fn(W, c)
    loss.backward()
    W_ref = W.detach().clone().requires_grad_(True)
    z_ref, _ = deqkern.fixed_point_dense(W_ref, c, tol=1e-6, max_iter=200)
    (z_ref**2).sum().backward()
    torch.testing.assert_close(loss, (z_ref**2).sum())
    torch.testing.assert_close(W.grad, W_ref.grad, rtol=1e-4, atol=1e-5)
    assert iterations.shape == (8,)


# ---------------------------------------------------------------- reproducibility (CPU)
@pytest.mark.parametrize("op", ["fixed_point_dense", "fixed_point_dense_backward", "fixed_point_dense_anderson",
                                "fixed_point_dense_anderson_backward"])
def test_cpu_results_do_not_depend_on_threads_or_batch(op):
    """Bitwise: the same sample gives the same result with 1 and 2 threads and in any batch (every row's products
    run the same micro-kernel in the same order; the backward's act'(z W^T + c) too, not a BLAS call whose blocking
    follows the thread count: 4 of 39 float64 cases differed before)."""
    options = ((5, 1.0, 1e-4) if "anderson" in op else (0.7,)) + (1e-10, 300)
    backward_op = op.endswith("backward")
    problems = []  # made once: the SVD that scales W depends on the thread count itself
    for batch, d in ((7, 300), (37, 300), (130, 129), (37, 33)):
        W, c, z0 = kit.dense_problem(batch, d, seed=5)
        problems.append((W, c, z0, kit.random_like(z0)) if backward_op else (W, c, z0))
    results = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for inputs in problems:
                W = inputs[0]
                whole = kernel(op, "cpu")(*inputs, "tanh", *options)
                alone = kernel(op, "cpu")(W, *(t[3:4] for t in inputs[1:]), "tanh", *options)
                assert torch.equal(whole[0][3:4], alone[0]) and torch.equal(whole[1][3:4], alone[1])
                results.append(whole)
        finally:
            torch.set_num_threads(previous)
    for one, two in zip(results[:4], results[4:]):
        for a, b in zip(one, two):
            assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_kernel_penalty_gradient_equals_the_closed_form_in_python(method):
    """fixed_point_dense(..., jacobian_penalty=w): the gradients the backward op's kernel gives equal the solve's
    gradients plus the closed form computed in Python after it (dense_penalty.jacobian_penalty_gradient, the
    create_graph path's), float64 to 1e-10; the reported penalty too."""
    from deqkern.solvers.dense_penalty import jacobian_penalty_gradient

    W, c, _ = kit.dense_problem(9, 13, seed=3)
    grads, penalties = {}, {}
    for weight in (0.0, 0.8):
        W_, c_ = W.clone().requires_grad_(), c.clone().requires_grad_()
        z, info = deqkern.fixed_point_dense(W_, c_, activation="sigmoid", method=method, tol=1e-12, max_iter=500,
                                            jacobian_penalty=weight)
        (z * torch.linspace(-1, 1, 13, dtype=z.dtype)).sum().backward()
        grads[weight], penalties[weight] = (W_.grad, c_.grad), info.jacobian_penalty
    z = z.detach()
    grad_u, row_term, value = jacobian_penalty_gradient(W, c, z, "sigmoid", 0.8)
    torch.testing.assert_close(grads[0.8][1], grads[0.0][1] + grad_u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0.8][0], grads[0.0][0] + grad_u.T @ z + row_term[:, None] * W, rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(penalties[0.8], value, rtol=1e-12, atol=0)
    assert penalties[0.0] is None

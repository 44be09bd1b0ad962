"""fixed_point_dense(method="anderson"): the CPU C++ and Triton kernels against deqkern.reference, the public API
(validation, implicit gradients through the Anderson adjoint, torch.compile) and the iteration-count targets."""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the import of the Triton kernels

import deqkern  # noqa: E402
from deqkern.reference import (  # noqa: E402
    fixed_point_dense_anderson_backward_ref,
    fixed_point_dense_anderson_ref,
    fixed_point_dense_ref,
)
from problems import dense_problem, report  # noqa: E402

forward_op = torch.ops.deqkern.fixed_point_dense_anderson
backward_op = torch.ops.deqkern.fixed_point_dense_anderson_backward
LAM = 1e-4
SHAPES = [(1, 1), (3, 5), (37, 33), (130, 129), (5, 300)]
ACTIVATIONS = sorted(deqkern.ACTIVATIONS)
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def slow_problem(batch, d, dtype=torch.float64, seed=0):
    """The slowly contracting layer: W = Q diag(linspace(0, 0.9)) Q^T (symmetric), c = 0.1 N(0, 1), z0 = 0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))[0]
    W = q @ torch.diag(torch.linspace(0, 0.9, d, dtype=torch.float64)) @ q.T
    c = 0.1 * torch.randn(batch, d, dtype=torch.float64, generator=g)
    return W.to(dtype), c.to(dtype), torch.zeros(batch, d, dtype=dtype)


def assert_solves_match(out, ref, dtype):
    z, iterations, residual, converged = out
    z_ref, iterations_ref, residual_ref, converged_ref = ref
    report("z", z, z_ref)
    assert z.dtype == dtype and residual.dtype == dtype
    assert iterations.dtype == torch.int32 and converged.dtype == torch.bool
    if dtype == torch.float64:
        # Anderson amplifies rounding through the small solve (LDL^T here, LU in the reference): ~tol / 10 at m=16.
        torch.testing.assert_close(z, z_ref, rtol=1e-8, atol=1e-9, equal_nan=True)
        torch.testing.assert_close(residual, residual_ref, rtol=1e-5, atol=1e-10, equal_nan=True)
        assert torch.equal(iterations, iterations_ref)
        assert torch.equal(converged, converged_ref)
    else:
        # float32 rounding can move a sample across tol by an iteration; the results then differ by ~tol.
        assert (iterations - iterations_ref).abs().max() <= 2
        assert ((z - z_ref).norm() / z_ref.norm().clamp_min(1e-30)) < 2e-3
        assert converged.all() == converged_ref.all()


# ---------------------------------------------------------------- CPU kernels against the reference
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch,d", SHAPES, ids=[f"B{b}-D{d}" for b, d in SHAPES])
def test_forward_matches_reference(batch, d, activation, dtype):
    W, c, z0 = dense_problem(batch, d, dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    out = forward_op(W, c, z0, activation, 5, 1.0, LAM, tol, 300)
    ref = fixed_point_dense_anderson_ref(W, c, z0, activation, 5, 1.0, LAM, tol, 300)
    assert_solves_match(out, ref, dtype)
    assert out[3].all()


@pytest.mark.parametrize("m,beta,lam", [(1, 1.0, LAM), (3, 0.5, 0.0), (16, 0.8, 1e-2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_options_match_reference(m, beta, lam, dtype):
    W, c, z0 = dense_problem(19, 23, dtype, seed=3)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    out = forward_op(W, c, z0, "tanh", m, beta, lam, tol, 300)
    assert_solves_match(out, fixed_point_dense_anderson_ref(W, c, z0, "tanh", m, beta, lam, tol, 300), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch,d", [(3, 5), (37, 33), (6, 130)], ids=["B3-D5", "B37-D33", "B6-D130"])
def test_backward_matches_reference(batch, d, activation, dtype):
    W, c, z0 = dense_problem(batch, d, dtype, seed=1)
    z = fixed_point_dense_ref(W, c, z0, activation, 1.0, 1e-10, 500)[0]
    grad_z = torch.randn(batch, d, dtype=dtype, generator=torch.Generator().manual_seed(2))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    out = backward_op(W, c, z, grad_z, activation, 5, 1.0, LAM, tol, 300)
    ref = fixed_point_dense_anderson_backward_ref(W, c, z, grad_z, activation, 5, 1.0, LAM, tol, 300)
    assert_solves_match(out, ref, dtype)


def test_non_contiguous_W_through_the_api():
    W, c, _ = dense_problem(9, 12)
    wide = torch.zeros(12, 24, dtype=W.dtype)
    wide[:, ::2] = W
    z, _ = deqkern.fixed_point_dense(wide[:, ::2], c, method="anderson", tol=1e-10)
    z_ref = fixed_point_dense_anderson_ref(W, c, torch.zeros_like(c), "tanh", 5, 1.0, LAM, 1e-10, 100)[0]
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)


def test_samples_stop_independently():
    W, c, z0 = dense_problem(40, 24)
    z, iterations, residual, converged = forward_op(W, c, z0, "tanh", 5, 1.0, LAM, 1e-10, 500)
    assert converged.all() and (residual <= 1e-10).all()
    assert iterations.unique().numel() > 2, iterations
    for row in (0, 17, 39):
        alone = forward_op(W, c[row : row + 1], z0[row : row + 1], "tanh", 5, 1.0, LAM, 1e-10, 500)
        torch.testing.assert_close(alone[0][0], z[row], rtol=1e-12, atol=1e-12)
        assert alone[1][0] == iterations[row]


def test_max_iter_reached_is_reported():
    W, c, z0 = dense_problem(6, 16, norm=0.99)
    out = forward_op(W, c, z0, "tanh", 5, 1.0, LAM, 1e-14, 3)
    assert (out[1] == 3).all() and not out[3].any() and (out[2] > 1e-14).all()
    assert_solves_match(out, fixed_point_dense_anderson_ref(W, c, z0, "tanh", 5, 1.0, LAM, 1e-14, 3), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_non_finite_rows_are_flagged(dtype):
    W, c, z0 = dense_problem(5, 9, dtype)
    c[1, 0] = float("inf")  # tanh(inf) = 1 would hide it
    z0[3, 5] = float("nan")
    z, iterations, residual, converged = forward_op(W, c, z0, "tanh", 5, 1.0, LAM, 1e-6, 100)
    assert iterations.tolist()[1] == 0 and iterations.tolist()[3] == 0 and torch.isnan(residual[[1, 3]]).all()
    assert converged.tolist() == [True, False, True, False, True]
    assert torch.equal(z[1], z0[1])
    keep = torch.tensor([0, 2, 4])
    ref = fixed_point_dense_anderson_ref(W, c[keep], z0[keep], "tanh", 5, 1.0, LAM, 1e-6, 100)
    assert_solves_match((z[keep], iterations[keep], residual[keep], converged[keep]), ref, dtype)


def test_nan_in_W_flags_every_sample_and_backward_flags_rows():
    W, c, z0 = dense_problem(3, 7)
    bad_W = W.clone()
    bad_W[6, 0] = float("nan")
    z, iterations, residual, converged = forward_op(bad_W, c, z0, "relu", 5, 1.0, LAM, 1e-6, 100)
    assert (iterations == 0).all() and torch.isnan(residual).all() and not converged.any() and torch.equal(z, z0)
    z = fixed_point_dense_ref(W, c, z0, "tanh", 1.0, 1e-10, 300)[0]
    grad_z = torch.ones_like(z)
    grad_z[0, 2] = float("nan")
    out = backward_op(W, c, z, grad_z, "tanh", 5, 1.0, LAM, 1e-9, 100)
    assert out[1].tolist()[0] == 0 and out[3].tolist() == [False, True, True]


def test_empty_batch():
    W = torch.eye(4, dtype=torch.float64) * 0.5
    c = torch.empty(0, 4, dtype=torch.float64)
    out = forward_op(W, c, c.clone(), "tanh", 5, 1.0, LAM, 1e-6, 10)
    assert out[0].shape == (0, 4) and out[1].shape == (0,)


@pytest.mark.parametrize(
    "m, beta, lam, message",
    [(0, 1.0, LAM, "m"), (17, 1.0, LAM, "m"), (5, 0.0, LAM, "beta"), (5, 1.5, LAM, "beta"), (5, 1.0, -1.0, "lam")],
)
def test_raw_op_rejects_bad_options(m, beta, lam, message):
    W, c, z0 = dense_problem(2, 4)
    with pytest.raises(RuntimeError, match=message):
        forward_op(W, c, z0, "tanh", m, beta, lam, 1e-6, 10)


def test_opcheck():
    W, c, z0 = dense_problem(7, 10)
    torch.library.opcheck(forward_op, (W, c, z0, "tanh", 4, 0.9, LAM, 1e-8, 100))
    z = fixed_point_dense_ref(W, c, z0, "tanh", 1.0, 1e-10, 200)[0]
    torch.library.opcheck(backward_op, (W, c, z, torch.randn_like(z), "softsign", 5, 1.0, LAM, 1e-8, 100))


# ---------------------------------------------------------------- public API
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="newton"), "unknown method"),
        (dict(method="anderson", m=0), "m \\(the Anderson history"),
        (dict(method="anderson", m=17), "m \\(the Anderson history"),
        (dict(method="anderson", m=2.0), "m \\(the Anderson history"),
        (dict(method="anderson", beta=0.0), "beta"),
        (dict(method="anderson", beta=1.01), "beta"),
        (dict(method="anderson", lam=-1e-3), "lam"),
        (dict(method="anderson", alpha=0.5), "alpha"),
    ],
)
def test_api_rejects_bad_method_options(kwargs, message):
    W, c, _ = dense_problem(2, 4)
    with pytest.raises(ValueError, match=message):
        deqkern.fixed_point_dense(W, c, **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck_through_anderson(backend):
    W, c, _ = dense_problem(3, 6)
    W.requires_grad_(True)
    c.requires_grad_(True)

    def f(W, c):
        return deqkern.fixed_point_dense(W, c, method="anderson", m=4, tol=1e-12, max_iter=200, backend=backend)[0]

    assert torch.autograd.gradcheck(f, (W, c), atol=1e-6, rtol=1e-5)


def test_backward_uses_anderson_and_matches_picard_gradient():
    W, c, _ = slow_problem(8, 32)
    grads = {}
    for method in ("picard", "anderson"):
        Wg, cg = W.clone().requires_grad_(True), c.clone().requires_grad_(True)
        z, info = deqkern.fixed_point_dense(Wg, cg, method=method, tol=1e-10, max_iter=500)
        (z**2).sum().backward()
        grads[method] = (Wg.grad, cg.grad, info)
    # Both solves stop at tol 1e-10; the adjoint's error is amplified by up to 1 / (1 - 0.9).
    torch.testing.assert_close(grads["anderson"][0], grads["picard"][0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grads["anderson"][1], grads["picard"][1], rtol=1e-6, atol=1e-8)
    fwd_a, fwd_p = grads["anderson"][2], grads["picard"][2]
    assert fwd_a.backward.iterations.max() * 2 < fwd_p.backward.iterations.max()
    assert fwd_a.iterations.max() * 2 < fwd_p.iterations.max()


def test_deqlinear_passes_method_through():
    torch.manual_seed(0)
    layer = deqkern.nn.DEQLinear(6, 12, method="anderson", m=3, beta=0.9)
    picard = deqkern.nn.DEQLinear(6, 12)
    picard.load_state_dict(layer.state_dict())
    x = torch.randn(4, 6)
    z = layer(x)
    z.sum().backward()
    assert layer.last_info.backward is not None and layer.solver_options["method"] == "anderson"
    torch.testing.assert_close(z, picard(x), rtol=1e-3, atol=1e-4)


def test_torch_compile_fullgraph_forward_and_backward():
    W, c, _ = dense_problem(8, 16, dtype=torch.float32)
    W.requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(W, c):
        z, info = deqkern.fixed_point_dense(W, c, method="anderson", m=4, tol=1e-6, max_iter=200,
                                            on_nonconvergence="ignore")
        return (z**2).sum(), info.iterations

    loss, iterations = loss_fn(W, c)
    loss.backward()
    W_ref = W.detach().clone().requires_grad_(True)
    z_ref, _ = deqkern.fixed_point_dense(W_ref, c, method="anderson", m=4, tol=1e-6, max_iter=200)
    (z_ref**2).sum().backward()
    torch.testing.assert_close(loss, (z_ref**2).sum())
    torch.testing.assert_close(W.grad, W_ref.grad, rtol=1e-4, atol=1e-5)
    assert iterations.shape == (8,)


# ---------------------------------------------------------------- the targets, where cheap
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_slowly_contracting_layer_target(dtype):
    """Anderson (m=5) reaches tol 1e-4 in <= 16 evaluations for B=32, d=64, where Picard needs ~3x as many."""
    W, c, z0 = slow_problem(32, 64, dtype)
    z, iterations, residual, converged = forward_op(W, c, z0, "tanh", 5, 1.0, LAM, 1e-4, 100)
    picard = torch.ops.deqkern.fixed_point_dense(W, c, z0, "tanh", 1.0, 1e-4, 100)
    print(f"Anderson iterations max {iterations.max().item()}, Picard max {picard[1].max().item()}")
    assert converged.all() and iterations.max() <= 16
    assert picard[3].all() and picard[1].max() >= 2.5 * iterations.max()
    # Both are within tol of the same fixed point.
    assert ((z - picard[0]).norm(dim=1) / picard[0].norm(dim=1)).max() < 1e-3
    # The adjoint of the same layer: Anderson again in <= 16 evaluations.
    grad_z = torch.randn(32, 64, dtype=dtype, generator=torch.Generator().manual_seed(1))
    back = backward_op(W, c, z, grad_z, "tanh", 5, 1.0, LAM, 1e-4, 100)
    assert back[3].all() and back[1].max() <= 16


def test_regulariser_is_scale_invariant():
    """Scaling c (and so every residual) of the identity layer scales z exactly and keeps the iteration counts:
    lam acts relative to the Gram diagonal, not as an absolute shift."""
    W, c, z0 = slow_problem(4, 16)
    small = forward_op(W, 1e-6 * c, z0, "identity", 5, 1.0, LAM, 1e-8, 200)
    large = forward_op(W, c, z0, "identity", 5, 1.0, LAM, 1e-8, 200)
    assert torch.equal(small[1], large[1])
    torch.testing.assert_close(small[0] * 1e6, large[0], rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- Triton (interpreter on a CPU: small sizes)
TRITON_CASES = [
    (3, 5, "tanh", torch.float64),
    (9, 20, "sigmoid", torch.float64),
    (3, 40, "relu", torch.float64),
    (3, 1, "identity", torch.float32),
    (17, 33, "softsign", torch.float32),
    (5, 70, "relu6", torch.float32),
]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("batch,d,activation,dtype", TRITON_CASES,
                         ids=[f"B{b}-D{d}-{a}-{str(t)[6:]}" for b, d, a, t in TRITON_CASES])
def test_triton_matches_reference(batch, d, activation, dtype):
    from deqkern.triton_kernels.fixed_point_dense_anderson import (
        fixed_point_dense_anderson_backward_triton,
        fixed_point_dense_anderson_triton,
    )

    W, c, z0 = (t.to(TRITON_DEVICE) for t in dense_problem(batch, d, dtype))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    out = fixed_point_dense_anderson_triton(W, c, z0, activation, 4, 0.9, LAM, tol, 200)
    ref = fixed_point_dense_anderson_ref(W, c, z0, activation, 4, 0.9, LAM, tol, 200)
    assert_solves_match([t.cpu() for t in out], [t.cpu() for t in ref], dtype)
    z = fixed_point_dense_ref(W, c, z0, activation, 1.0, 1e-10, 500)[0]
    grad_z = torch.randn(batch, d, dtype=dtype, generator=torch.Generator().manual_seed(2)).to(TRITON_DEVICE)
    out = fixed_point_dense_anderson_backward_triton(W, c, z, grad_z, activation, 4, 0.9, LAM, tol, 200)
    ref = fixed_point_dense_anderson_backward_ref(W, c, z, grad_z, activation, 4, 0.9, LAM, tol, 200)
    assert_solves_match([t.cpu() for t in out], [t.cpu() for t in ref], dtype)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_gradients_match_cpu():
    """gradcheck itself is too slow under the interpreter: the same implicit gradients as the gradchecked CPU path."""
    W, c, _ = dense_problem(3, 6)
    grads = []
    for backend, device in (("triton", TRITON_DEVICE), ("cpu", "cpu")):
        Wg = W.clone().to(device).requires_grad_(True)
        cg = c.clone().to(device).requires_grad_(True)
        z, _ = deqkern.fixed_point_dense(Wg, cg, method="anderson", m=4, tol=1e-12, max_iter=200, backend=backend)
        (z**3).sum().backward()
        grads.append((Wg.grad.cpu(), cg.grad.cpu()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-11)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_flags_non_finite_rows_and_opcheck():
    from deqkern.triton_kernels.fixed_point_dense_anderson import fixed_point_dense_anderson_triton

    W, c, z0 = (t.to(TRITON_DEVICE) for t in dense_problem(4, 6))
    c[1, 0] = float("inf")
    out = fixed_point_dense_anderson_triton(W, c, z0, "tanh", 5, 1.0, LAM, 1e-8, 100)
    assert out[1].tolist()[1] == 0 and torch.isnan(out[2][1]) and out[3].tolist() == [True, False, True, True]
    W, c, z0 = (t.to(TRITON_DEVICE) for t in dense_problem(3, 4))  # finite: opcheck compares NaN as unequal
    torch.library.opcheck(torch.ops.deqkern.fixed_point_dense_anderson_triton,
                          (W, c, z0, "tanh", 3, 1.0, LAM, 1e-6, 30))

"""fixed_point_dense_anderson and its backward on every backend (cpu, cuda, triton) against
deqkern/reference/fixed_point_dense_anderson.py, then the public fixed_point_dense(method="anderson"): validation,
implicit gradients through the Anderson adjoint, torch.compile and the iteration-count targets."""
import pytest
import torch

import deqkern
from deqkern.activations import ACTIVATIONS
from deqkern.core.backends import kernel
from deqkern.core.constants import ANDERSON_DEFAULT_LAM as LAM
from deqkern.core.constants import TRITON_DENSE_ANDERSON_REGISTER_WIDTH
from deqkern.reference import (
    fixed_point_dense_anderson_backward_ref,
    fixed_point_dense_anderson_ref,
    fixed_point_dense_ref,
)

import kit

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
MAX_ITER = 300
NAN, INF = float("nan"), float("inf")


def forward(backend):
    return kernel("fixed_point_dense_anderson", backend)


def backward(backend):
    return kernel("fixed_point_dense_anderson_backward", backend)


# ---------------------------------------------------------------- every backend against the reference
GRID = [(b, d, a, t) for b, d in [(1, 1), (3, 5), (37, 33), (130, 129), (5, 300)] for a in sorted(ACTIVATIONS)
        for t in (torch.float64, torch.float32)]
SMALL = [(3, 5, "tanh", torch.float64), (9, 20, "sigmoid", torch.float64), (3, 40, "relu", torch.float64),
         (3, 1, "identity", torch.float32), (17, 33, "softsign", torch.float32), (5, 70, "relu6", torch.float32)]


def case_id(case):
    b, d, a, t = case
    return f"B{b}-D{d}-{a}-{kit.dtype_id(t)}"


# SMALL reaches both Triton kernels: rows in registers (d <= TRITON_DENSE_ANDERSON_REGISTER_WIDTH) and the scratch
# kernel.
CASES = kit.backend_params([(case_id(c), c) for c in dict.fromkeys(GRID + SMALL)], small={case_id(c) for c in SMALL})


@pytest.mark.parametrize("backend,batch,d,activation,dtype", CASES)
def test_forward_matches_reference(backend, batch, d, activation, dtype):
    W, c, z0 = kit.dense_problem(batch, d, dtype, kit.device_of(backend))
    args = (activation, 5, 1.0, LAM, TOL[dtype], MAX_ITER)
    out = forward(backend)(W, c, z0, *args)
    ref = fixed_point_dense_anderson_ref(W.cpu(), c.cpu(), z0.cpu(), *args)
    kit.assert_solve_matches(out, ref, dtype)
    assert out[3].all()


@pytest.mark.parametrize("backend,batch,d,activation,dtype", CASES)
def test_backward_matches_reference(backend, batch, d, activation, dtype):
    W, c, z0 = kit.dense_problem(batch, d, dtype, seed=1)
    z = fixed_point_dense_ref(W, c, z0, activation, 1.0, 1e-10, 500)[0]
    grad_z = kit.random_like(z)
    args = (activation, 4, 0.9, LAM, TOL[dtype], MAX_ITER)
    out = backward(backend)(*kit.to_device(kit.device_of(backend), W, c, z, grad_z), *args)
    kit.assert_solve_matches(out, fixed_point_dense_anderson_backward_ref(W, c, z, grad_z, *args), dtype)


@pytest.mark.parametrize("backend", kit.backend_names())
def test_backward_with_jacobian_penalty_matches_reference(backend):
    """The Anderson backward's Jacobian penalty (fixed_point_dense_backward's, see its test): the reference's outputs,
    on Triton from the register kernel (d = 5) and the scratch kernel (d = 70), and for an empty batch."""
    for batch, d, activation, dtype in [(3, 5, "tanh", torch.float64), (5, 70, "softsign", torch.float32),
                                        (0, 4, "sigmoid", torch.float64)]:
        W, c, z0 = kit.dense_problem(batch, d, dtype, seed=2)
        z = fixed_point_dense_ref(W, c, z0, activation, 1.0, 1e-10, 500)[0]
        grad_z = kit.random_like(z)
        args = (activation, 4, 0.9, LAM, TOL[dtype], MAX_ITER, 0.7)
        out = backward(backend)(*kit.to_device(kit.device_of(backend), W, c, z, grad_z), *args)
        kit.assert_solve_matches(out, fixed_point_dense_anderson_backward_ref(W, c, z, grad_z, *args), dtype)
        assert out[4].shape == (d,) and out[5].shape == ()


OPTIONS = [(1, 1.0, LAM), (3, 0.5, 0.0), (16, 0.8, 1e-2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=kit.dtype_id)
@pytest.mark.parametrize("m,beta,lam", OPTIONS, ids=[f"m{m}-beta{b}-lam{lam}" for m, b, lam in OPTIONS])
def test_options_match_reference(backend, m, beta, lam, dtype):
    if kit.small_only(backend) and m == 16:
        pytest.skip("interpreter: small sizes only")
    W, c, z0 = kit.dense_problem(19, 23, dtype, kit.device_of(backend), seed=3)
    args = ("tanh", m, beta, lam, TOL[dtype], MAX_ITER)
    out = forward(backend)(W, c, z0, *args)
    kit.assert_solve_matches(out, fixed_point_dense_anderson_ref(W.cpu(), c.cpu(), z0.cpu(), *args), dtype)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_any_strides(backend, layout):
    """The one contiguity rule: every input may have any strides."""
    W, c, z0 = kit.dense_problem(4, 12, device=kit.device_of(backend))
    change = kit.strided if layout == "strided" else (lambda t: t.T.contiguous().T)
    out = forward(backend)(change(W), change(c), change(z0), "tanh", 5, 1.0, LAM, 1e-10, MAX_ITER)
    ref = fixed_point_dense_anderson_ref(W.cpu(), c.cpu(), z0.cpu(), "tanh", 5, 1.0, LAM, 1e-10, MAX_ITER)
    kit.assert_solve_matches(out, ref, torch.float64)


def test_samples_stop_independently(backend):
    W, c, z0 = kit.dense_problem(12 if kit.small_only(backend) else 40, 24, device=kit.device_of(backend))
    z, iterations, residual, converged = forward(backend)(W, c, z0, "tanh", 5, 1.0, LAM, 1e-10, 500)
    assert converged.all() and (residual <= 1e-10).all()
    assert iterations.unique().numel() > 2, iterations
    for row in (0, 7, len(c) - 1):
        alone = forward(backend)(W, c[row:row + 1], z0[row:row + 1], "tanh", 5, 1.0, LAM, 1e-10, 500)
        torch.testing.assert_close(alone[0][0], z[row], rtol=1e-12, atol=1e-12)
        assert alone[1][0] == iterations[row]


def test_max_iter_reached_is_reported(backend):
    W, c, z0 = kit.dense_problem(6, 16, device=kit.device_of(backend), norm=0.99)
    out = forward(backend)(W, c, z0, "tanh", 5, 1.0, LAM, 1e-14, 3)
    assert (out[1] == 3).all() and not out[3].any() and (out[2] > 1e-14).all()
    kit.assert_solve_matches(out, fixed_point_dense_anderson_ref(W.cpu(), c.cpu(), z0.cpu(), "tanh", 5, 1.0, LAM,
                                                                 1e-14, 3), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=kit.dtype_id)
def test_non_finite_rows_are_flagged(backend, dtype):
    W, c, z0 = kit.dense_problem(5, 9, dtype, kit.device_of(backend))
    c[1, 0] = INF  # tanh(inf) = 1 would hide it
    z0[3, 5] = NAN
    z, iterations, residual, converged = forward(backend)(W, c, z0, "tanh", 5, 1.0, LAM, 1e-6, 100)
    assert iterations.tolist()[1] == 0 and iterations.tolist()[3] == 0 and torch.isnan(residual[[1, 3]]).all()
    assert converged.tolist() == [True, False, True, False, True]
    assert torch.equal(z[1], z0[1])
    keep = [0, 2, 4]
    ref = fixed_point_dense_anderson_ref(W[:, :].cpu(), c[keep].cpu(), z0[keep].cpu(), "tanh", 5, 1.0, LAM, 1e-6, 100)
    kit.assert_solve_matches((z[keep], iterations[keep], residual[keep], converged[keep]), ref, dtype)


def test_nan_in_W_flags_every_sample_and_backward_flags_rows(backend):
    device = kit.device_of(backend)
    W, c, z0 = kit.dense_problem(3, 7, device=device)
    bad_W = W.clone()
    bad_W[6, 0] = NAN
    z, iterations, residual, converged = forward(backend)(bad_W, c, z0, "relu", 5, 1.0, LAM, 1e-6, 100)
    assert (iterations == 0).all() and torch.isnan(residual).all() and not converged.any() and torch.equal(z, z0)
    z = fixed_point_dense_ref(W, c, z0, "tanh", 1.0, 1e-10, 300)[0]
    grad_z = torch.ones_like(z)
    grad_z[0, 2] = NAN
    out = backward(backend)(W, c, z, grad_z, "tanh", 5, 1.0, LAM, 1e-9, 100)
    assert out[1].tolist()[0] == 0 and out[3].tolist() == [False, True, True]


def test_empty_batch(backend):
    W, c, z0 = kit.dense_problem(0, 4, device=kit.device_of(backend))
    for out in (forward(backend)(W, c, z0, "tanh", 5, 1.0, LAM, 1e-6, 10),
                backward(backend)(W, c, z0, z0, "tanh", 5, 1.0, LAM, 1e-6, 10)[:4]):
        assert [tuple(t.shape) for t in out] == [(0, 4), (0,), (0,), (0,)]


@pytest.mark.parametrize("wide_history", [False, True], ids=["int32-history", "int64-history"])
@pytest.mark.parametrize("m", [3, 5])
@pytest.mark.parametrize("adjoint", [False, True], ids=["forward", "adjoint"])
def test_triton_scratch_kernel(adjoint, m, wide_history, monkeypatch):
    """The Triton scratch kernel (rows wider than the register kernel holds) at a small width, with column blocks
    that do not divide it, a history ring that wraps (m = 3 and 5, MP = 4 and 8), and a program whose rows are all
    flagged (BLOCK_B = 2, rows 0 and 1 bad) next to programs that iterate, history offsets in int32 and in int64:
    the reference's result, float64."""
    reason = kit.unavailable("triton")
    if reason:
        pytest.skip(reason)
    from deqkern.triton_kernels import fixed_point_dense_anderson
    from deqkern.triton_kernels.fixed_point_dense_anderson import launch

    if wide_history:  # the int64 history offsets of histories of 2^31 elements or more, at a small size
        monkeypatch.setattr(fixed_point_dense_anderson, "WIDE_HISTORY_ELEMENTS", 0)
    W, c, z0 = kit.dense_problem(5, 20, device=kit.device_of("triton"))
    grad_z = kit.random_like(c)
    c[0, 1] = NAN
    (grad_z if adjoint else z0)[1, 4] = INF
    args = ("tanh", m, 1.0, LAM, 1e-9, MAX_ITER)
    blocks = dict(BLOCK_B=2, BLOCK_N=16, BLOCK_K=8)
    if adjoint:
        out = launch(W, c, z0, grad_z, *args, adjoint=True, in_registers=False, blocks=blocks)
        ref, start = fixed_point_dense_anderson_backward_ref(W, c, z0, grad_z, *args), torch.zeros_like(z0)
    else:
        out = launch(W, c, z0, None, *args, adjoint=False, in_registers=False, blocks=blocks)
        ref, start = fixed_point_dense_anderson_ref(W, c, z0, *args), z0
    kit.assert_solve_matches(out, ref, torch.float64)
    assert torch.equal(out[0][:2], start[:2]) and out[1][:2].tolist() == [0, 0]
    assert out[3][2:].all() and out[1][2:].max() > m  # the ring wrapped


@pytest.mark.parametrize("adjoint", [False, True], ids=["forward", "adjoint"])
def test_triton_picks_the_scratch_kernel_past_the_register_width(adjoint):
    """The widest register row and one more (the scratch kernel) both run, a few iterations each (the interpreter
    is slow), and give the reference's iterate."""
    reason = kit.unavailable("triton")
    if reason:
        pytest.skip(reason)
    for d in (TRITON_DENSE_ANDERSON_REGISTER_WIDTH, TRITON_DENSE_ANDERSON_REGISTER_WIDTH + 1):
        W, c, z0 = kit.dense_problem(2, d, torch.float64, kit.device_of("triton"))
        args = ("tanh", 5, 1.0, LAM, 1e-12, 4)
        if adjoint:
            out = backward("triton")(W, c, z0, z0, *args)
            ref = fixed_point_dense_anderson_backward_ref(W.cpu(), c.cpu(), z0.cpu(), z0.cpu(), *args)
        else:
            out = forward("triton")(W, c, z0, *args)
            ref = fixed_point_dense_anderson_ref(W.cpu(), c.cpu(), z0.cpu(), *args)
        kit.assert_solve_matches(out, ref, torch.float64)
        assert out[1].tolist() == [4, 4]


@pytest.mark.parametrize(
    "m, beta, lam, message",
    [(0, 1.0, LAM, "m"), (17, 1.0, LAM, "m"), (5, 0.0, LAM, "beta"), (5, 1.5, LAM, "beta"), (5, 1.0, -1.0, "lam")],
)
def test_raw_op_rejects_bad_options(m, beta, lam, message):
    W, c, z0 = kit.dense_problem(2, 4)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.deqkern.fixed_point_dense_anderson(W, c, z0, "tanh", m, beta, lam, 1e-6, 10)


def test_opcheck(backend):
    W, c, z0 = kit.dense_problem(4, 6, device=kit.device_of(backend))
    z = fixed_point_dense_ref(W, c, z0, "tanh", 1.0, 1e-10, 200)[0]
    suffix = "_triton" if backend == "triton" else ""
    if backend == "triton":  # the Triton ops are registered when their module is first imported (on first use)
        kernel("fixed_point_dense_anderson", "triton")
    tests = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(torch.ops.deqkern, "fixed_point_dense_anderson" + suffix).default,
                          (W, c, z0, "tanh", 4, 0.9, LAM, 1e-8, 100), test_utils=tests)
    torch.library.opcheck(getattr(torch.ops.deqkern, "fixed_point_dense_anderson_backward" + suffix).default,
                          (W, c, z, kit.random_like(z), "softsign", 5, 1.0, LAM, 1e-8, 100), test_utils=tests)


# ---------------------------------------------------------------- the public function, method="anderson"
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
    W, c, _ = kit.dense_problem(2, 4)
    with pytest.raises(ValueError, match=message):
        deqkern.fixed_point_dense(W, c, **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck_through_anderson(backend):
    W, c, _ = kit.dense_problem(3, 6)
    W.requires_grad_(True)
    c.requires_grad_(True)

    def f(W, c):
        return deqkern.fixed_point_dense(W, c, method="anderson", m=4, tol=1e-12, max_iter=200, backend=backend)[0]

    assert torch.autograd.gradcheck(f, (W, c), atol=1e-6, rtol=1e-5)


def test_gradients_match_cpu(backend):
    """gradcheck is too slow under the interpreter: the same implicit gradients as the gradchecked CPU path."""
    W, c, _ = kit.dense_problem(3, 6)
    grads = []
    for name in (backend, "cpu"):
        device = kit.device_of(name)
        Wg, cg = W.clone().to(device).requires_grad_(True), c.clone().to(device).requires_grad_(True)
        z, _ = deqkern.fixed_point_dense(Wg, cg, method="anderson", m=4, tol=1e-12, max_iter=200, backend=name)
        (z**3).sum().backward()
        grads.append((Wg.grad.cpu(), cg.grad.cpu()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-11)


def test_backward_uses_anderson_and_matches_picard_gradient():
    W, c, _ = kit.slow_problem(8, 32)
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
    W, c, _ = kit.dense_problem(8, 16, dtype=torch.float32)
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
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=kit.dtype_id)
def test_slowly_contracting_layer_target(dtype):
    """Anderson (m=5) reaches tol 1e-4 in <= 16 evaluations for B=32, d=64, where Picard needs ~3x as many."""
    W, c, z0 = kit.slow_problem(32, 64, dtype)
    z, iterations, residual, converged = forward("cpu")(W, c, z0, "tanh", 5, 1.0, LAM, 1e-4, 100)
    picard = torch.ops.deqkern.fixed_point_dense(W, c, z0, "tanh", 1.0, 1e-4, 100)
    print(f"Anderson iterations max {iterations.max().item()}, Picard max {picard[1].max().item()}")
    assert converged.all() and iterations.max() <= 16
    assert picard[3].all() and picard[1].max() >= 2.5 * iterations.max()
    assert ((z - picard[0]).norm(dim=1) / picard[0].norm(dim=1)).max() < 1e-3
    # The adjoint of the same layer: Anderson again in <= 16 evaluations.
    back = backward("cpu")(W, c, z, kit.random_like(z, seed=1), "tanh", 5, 1.0, LAM, 1e-4, 100)
    assert back[3].all() and back[1].max() <= 16


def test_regulariser_is_scale_invariant():
    """Scaling c (and so every residual) of the identity layer scales z exactly and keeps the iteration counts:
    lam acts relative to the Gram diagonal, not as an absolute shift."""
    W, c, z0 = kit.slow_problem(4, 16)
    small = forward("cpu")(W, 1e-6 * c, z0, "identity", 5, 1.0, LAM, 1e-8, 200)
    large = forward("cpu")(W, c, z0, "identity", 5, 1.0, LAM, 1e-8, 200)
    assert torch.equal(small[1], large[1])
    torch.testing.assert_close(small[0] * 1e6, large[0], rtol=1e-8, atol=1e-12)

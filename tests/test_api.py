"""deqkern.fixed_point_dense: input checks, the non-convergence policy, implicit gradients, torch.compile."""
import warnings

import pytest
import torch

import deqkern
from deqkern.reference import fixed_point_dense_ref
from problems import dense_problem

# (backend, device, activations): the Triton interpreter is slow on a CPU, so it gradchecks one activation.
_GPU = torch.cuda.is_available()
GRADCHECK_CASES = [
    ("cpu", "cpu", ("tanh", "softsign", "sigmoid", "identity")),
    ("reference", "cpu", ("tanh", "softsign", "sigmoid", "identity")),
    ("triton", "cuda" if _GPU else "cpu", ("tanh", "softsign", "sigmoid", "identity") if _GPU else ("tanh",)),
] + ([("cuda", "cuda", ("tanh", "softsign", "sigmoid", "identity"))] if _GPU else [])


def test_solution_is_a_fixed_point_and_info_is_per_sample():
    W, c, _ = dense_problem(9, 17)
    z, info = deqkern.fixed_point_dense(W, c, activation="tanh", tol=1e-10, max_iter=200)
    torch.testing.assert_close(z, torch.tanh(z @ W.T + c), rtol=1e-8, atol=1e-9)
    assert info.iterations.shape == info.residual.shape == info.converged.shape == (9,)
    assert info.converged.all() and (info.residual <= 1e-10).all()


def test_default_start_is_zero_and_z0_is_used():
    W, c, z0 = dense_problem(4, 8)
    z_default, _ = deqkern.fixed_point_dense(W, c, tol=1e-3, max_iter=50)
    ref = fixed_point_dense_ref(W, c, torch.zeros_like(c), "tanh", 1.0, 1e-3, 50)[0]
    torch.testing.assert_close(z_default, ref)
    z_start, _ = deqkern.fixed_point_dense(W, c, tol=1e-3, max_iter=50, z0=z0)
    torch.testing.assert_close(z_start, fixed_point_dense_ref(W, c, z0, "tanh", 1.0, 1e-3, 50)[0])


def test_non_contiguous_inputs():
    W, c, z0 = dense_problem(6, 11)
    wide_W = torch.zeros(11, 30, dtype=W.dtype)
    wide_W[:, ::2][:, :11] = W
    W_strided = wide_W[:, ::2][:, :11]
    c_strided = torch.cat([c, c], dim=1)[:, ::2]  # a different matrix, but non-contiguous: compare to itself
    assert not W_strided.is_contiguous() and not c_strided.is_contiguous()
    z, _ = deqkern.fixed_point_dense(W_strided, c_strided.T.contiguous().T, tol=1e-10, max_iter=300)
    ref = fixed_point_dense_ref(W, c_strided.contiguous(), torch.zeros_like(c), "tanh", 1.0, 1e-10, 300)[0]
    torch.testing.assert_close(z, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "backend, device, activation",
    [(b, dev, act) for b, dev, acts in GRADCHECK_CASES for act in acts],
)
def test_gradcheck(backend, device, activation):
    W, c, _ = dense_problem(3, 5, seed=3, device=device)
    W.requires_grad_(True)
    c.requires_grad_(True)

    def solve(W, c):
        return deqkern.fixed_point_dense(W, c, activation=activation, tol=1e-13, max_iter=1000, backend=backend)[0]

    assert torch.autograd.gradcheck(solve, (W, c), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_implicit_gradient_matches_unrolled_autograd(alpha):
    """At the fixed point the implicit gradient equals backpropagation through a long unrolled solve."""
    W, c, _ = dense_problem(4, 10, seed=4)
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
    W, c, _ = dense_problem(5, 12, norm=0.99)
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
    W, c, _ = dense_problem(3, 6, seed=5)
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
    W, c, z0 = dense_problem(3, 4)
    {"W": W, "c": c, "z0": z0}[where][1, 1] = float("nan") if where != "c" else float("inf")
    with pytest.raises(ValueError, match=f"{where} contain NaN or Inf"):
        deqkern.fixed_point_dense(W, c, z0=z0, tol=1e-6)


def test_nan_in_grad_is_named():
    W, c, _ = dense_problem(3, 4)
    c.requires_grad_(True)
    z, _ = deqkern.fixed_point_dense(W, c, tol=1e-8)
    with pytest.raises(ValueError, match="grad_z contain NaN"):
        z.backward(torch.full_like(z, float("nan")))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(W=torch.ones(3, 4)), ValueError, "square"),
        (dict(W=torch.eye(3)[None]), ValueError, "square"),
        (dict(c=torch.ones(2, 5)), ValueError, r"\(batch, 4\)"),
        (dict(c=torch.ones(4)), ValueError, r"\(batch, 4\)"),
        (dict(W=torch.eye(4, dtype=torch.int64)), TypeError, "float32 or float64"),
        (dict(c=torch.ones(2, 4, dtype=torch.float64)), TypeError, "one dtype"),
        (dict(W=torch.eye(4).half()), TypeError, "float32 or float64"),
        (dict(z0=torch.ones(3, 4)), ValueError, "z0 must have the shape"),
        (dict(c=[[1.0] * 4]), TypeError, "torch.Tensor"),
        (dict(activation="gelu"), ValueError, "unknown activation"),
        (dict(tol=0.0), ValueError, "tol"),
        (dict(tol=float("nan")), ValueError, "tol"),
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices_are_named():
    with pytest.raises(ValueError, match="one device"):
        deqkern.fixed_point_dense(torch.eye(4) * 0.5, torch.ones(2, 4, device="cuda"))


def test_mixed_devices_are_named_with_meta_tensors():
    with pytest.raises(ValueError, match="one device"):
        deqkern.fixed_point_dense(torch.eye(4) * 0.5, torch.ones(2, 4, device="meta"))


def test_torch_compile_fullgraph_forward_and_backward():
    W, c, _ = dense_problem(8, 16, dtype=torch.float32)
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

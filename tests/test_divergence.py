"""An overflow is never read as convergence (the stop rule of csrc/common/stop_rule.h, triton_kernels/common.py and
deqkern/reference/common.py): divergent layers on every backend, method and dtype report converged=False and the
public functions raise; power iterations keep their scale from 1e-30 to 1e30 and give 0 only for a zero matrix.
Property-based (hypothesis) over the divergent layers' inputs."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deqkern
from deqkern import lipschitz
from deqkern.core.backends import kernel
from deqkern.reference import anderson_step_ref

import kit

DENSE_BACKENDS = kit.backend_names(("cpu", "cuda", "triton", "reference"))
PROPERTY = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def iterations_to_overflow(scale, dtype):
    """Evaluations after which scale^k exceeds the dtype's largest number (and a few more)."""
    return math.ceil(math.log(torch.finfo(dtype).max) / math.log(scale)) + 10


def diverging_layer(scale, c_value, d, dtype, device):
    """W = scale I, c = c_value: act = identity diverges like scale^k from 0 (the fixed point -c / (scale - 1) is
    repelling); relu with a positive c too."""
    W = scale * torch.eye(d, dtype=torch.float64)
    c = torch.full((3, d), c_value, dtype=torch.float64)
    return W.to(dtype=dtype, device=device), c.to(dtype=dtype, device=device)


# ---------------------------------------------------------------- the raw dense ops: never converged
@pytest.mark.parametrize("method", ["picard", "anderson"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=kit.dtype_id)
@pytest.mark.parametrize("backend", DENSE_BACKENDS)
@PROPERTY
@given(c_value=st.floats(0.1, 3.0), scale=st.sampled_from([3.0, 10.0]), activation=st.sampled_from(["identity", "relu"]))
def test_divergent_dense_solve_is_never_converged(backend, dtype, method, c_value, scale, activation):
    """Issue: W = [[3]], identity, float64 reported converged with residual 0 at |z| = 1.7e154 (the squared norm of
    f(z) overflowed, the ratio became 0); float32 at |z| ~ 2e19. (Anderson, a Krylov method, finds the repelling
    fixed point -c / (scale - 1) of the linear layer, correctly: it runs on the relu layer, which has none.)"""
    if method == "anderson" and activation == "identity":
        activation = "relu"
    if kit.small_only(backend):  # the interpreter runs a Python loop per iteration: a divergence in a few of them
        scale = 1e30
    d = 1 if kit.small_only(backend) else 4
    W, c = diverging_layer(scale, c_value, d, dtype, kit.device_of(backend))
    op = "fixed_point_dense_anderson" if method == "anderson" else "fixed_point_dense"
    options = (5, 1.0, 1e-4) if method == "anderson" else (1.0,)
    max_iter = iterations_to_overflow(scale, dtype)
    z, iterations, residual, converged = kernel(op, backend)(W, c, torch.zeros_like(c), activation, *options, 1e-6,
                                                            max_iter)
    assert not converged.any(), (z, residual)
    assert not (residual <= 1e-6).any()


@pytest.mark.parametrize("method", ["picard", "anderson"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=kit.dtype_id)
def test_public_dense_solve_raises_on_divergence(dtype, method):
    W, c = diverging_layer(3.0, 0.1, 4, dtype, "cpu")
    for max_iter in (5, 1000):
        with pytest.raises((FloatingPointError, deqkern.NonConvergenceError)):
            deqkern.fixed_point_dense(W, c, activation="relu", method=method, tol=1e-6, on_nonconvergence="raise",
                                      max_iter=max_iter)
    if method == "picard":  # the iterates overflow: reported as such
        with pytest.raises(FloatingPointError, match="overflowed"):
            deqkern.fixed_point_dense(W, c, activation="relu", method=method, tol=1e-6, max_iter=1000)
    else:  # Anderson's iterates stay bounded on this layer without a fixed point: reported as not converged
        with pytest.warns(deqkern.NonConvergenceWarning):
            deqkern.fixed_point_dense(W, c, activation="relu", method=method, tol=1e-6, max_iter=1000)


def test_large_but_finite_float32_iterates_are_not_an_overflow():
    """The squared norms are summed in float64: a float32 fixed point with entries of 1e30 (squares 1e60, beyond
    float32) converges and is reported as such, on the CPU kernel and the reference."""
    W = 0.5 * torch.eye(4)
    c = torch.full((2, 4), 1e30)
    for op in (torch.ops.deqkern.fixed_point_dense, deqkern.reference.fixed_point_dense_ref):
        z, iterations, residual, converged = op(W, c, torch.zeros_like(c), "identity", 1.0, 1e-5, 200)
        assert converged.all() and torch.isfinite(z).all(), residual
        torch.testing.assert_close(z, torch.full_like(z, 2e30), rtol=1e-4, atol=0)


# ---------------------------------------------------------------- deqkern.solve and its step: never converged
@pytest.mark.parametrize("method", ["anderson", "picard", "broyden"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=kit.dtype_id)
@PROPERTY
@given(c_value=st.floats(0.1, 3.0))
def test_divergent_generic_solve_is_never_converged(dtype, method, c_value):
    c = torch.full((3, 2), c_value, dtype=dtype)
    f = lambda z: torch.relu(3.0 * z + c)  # noqa: E731  (no fixed point: every method diverges)
    max_iter = iterations_to_overflow(3.0, dtype)
    z, info = deqkern.solve(f, torch.zeros_like(c), method=method, tol=1e-6, max_iter=max_iter,
                            on_nonconvergence="ignore")
    assert not info.converged.any(), info.residual
    with pytest.raises((FloatingPointError, deqkern.NonConvergenceError)):
        deqkern.solve(f, torch.zeros_like(c), method=method, tol=1e-6, max_iter=max_iter, on_nonconvergence="raise")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=kit.dtype_id)
def test_anderson_step_reports_overflow_as_nan(backend, dtype):
    """One step whose f(x) squares overflow: residual NaN, the sample stops, never converged, on every backend."""
    device = kit.device_of(backend)
    huge = torch.finfo(dtype).max / 4
    B, n, m = 2, 8, 3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state = dict(X_hist=torch.zeros(B, m, n, dtype=dtype), G_hist=torch.zeros(B, m, n, dtype=dtype),
                 H=torch.zeros(B, m, m, dtype=acc), x=torch.zeros(B, n, dtype=dtype),
                 fx=torch.full((B, n), huge, dtype=dtype), x_next=torch.zeros(B, n, dtype=dtype),
                 z_best=torch.zeros(B, n, dtype=dtype), residual_best=torch.full((B,), math.nan, dtype=acc),
                 residual=torch.zeros(B, dtype=acc), active=torch.ones(B, dtype=torch.bool),
                 iterations=torch.zeros(B, dtype=torch.int32))
    for op in (kernel("anderson_step", backend), anderson_step_ref):
        s = {key: v.clone().to(device if op is not anderson_step_ref else "cpu") for key, v in state.items()}
        op(s["X_hist"], s["G_hist"], s["H"], s["x"], s["fx"], s["x_next"], s["z_best"], s["residual_best"],
           s["residual"], s["active"], s["iterations"], 0, 1.0, 1e-4, 1e-6)
        if dtype == torch.float64:  # float64 squares of 4e307 overflow: NaN, stopped
            assert s["residual"].isnan().all() and not s["active"].any(), s["residual"]
        else:  # float32 / half entries are squared in float64: a finite residual of 1 (f(x) - x = f(x))
            torch.testing.assert_close(s["residual"].cpu(), torch.ones(B, dtype=acc))


# ---------------------------------------------------------------- power iteration: scale kept, zero only for zero
@pytest.mark.parametrize("backend", kit.backend_names(("cpu", "cuda", "triton", "reference")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=kit.dtype_id)
@pytest.mark.parametrize("norm", [5.2e-30, 5.2e-12, 1.0, 5e10, 5e12, 3e30])
def test_spectral_norm_keeps_its_scale(backend, dtype, norm):
    """Issue: float32 ||W||_2 = 5e10 or 5e12 returned 0 with converged=True, 5.2e-12 returned 2.3e-12."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, dtype=torch.float64, generator=g)
    W = (A / torch.linalg.matrix_norm(A, ord=2) * norm).to(dtype=dtype, device=kit.device_of(backend))
    result = lipschitz.spectral_norm(W, max_iter=2000, tol=1e-5 if dtype == torch.float32 else 1e-10, backend=backend)
    assert bool(result.converged)
    assert abs(float(result) / norm - 1) < (1e-3 if dtype == torch.float32 else 1e-8), float(result)


def test_power_iteration_gives_zero_only_for_a_zero_matrix():
    """A start vector that W maps to 0 (here e1 for a nilpotent W) is replaced, so a nonzero W never reports 0;
    a zero W gives exactly 0, converged."""
    W = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    result = lipschitz.power_iteration(W, torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(result.value, torch.ones(2, dtype=torch.float64))
    zero = lipschitz.power_iteration(torch.zeros(2, 2), torch.ones(3, 2))
    assert (zero.value == 0).all() and zero.converged.all()


def test_power_iteration_result_is_a_named_tuple():
    value, u = lipschitz.spectral_norm(torch.eye(3) * 2)
    result = lipschitz.spectral_norm(torch.eye(3) * 2)
    assert float(result) == pytest.approx(2.0) and value.item() == pytest.approx(2.0) and u.shape == (3,)
    assert result._fields[:4] == ("value", "u", "iterations", "converged") and result[2] == result.iterations


# ---------------------------------------------------------------- a backward that overflows: raise, or skip the batch
def _unstable_fixed_point(on_backward_overflow):
    """z = 3 z + c: the forward starts at its fixed point -c / 2 (converged at once), the adjoint g = 3 g + v
    overflows (Picard, float32)."""
    W = (3.0 * torch.eye(4)).requires_grad_(True)
    c = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    z, info = deqkern.fixed_point_dense(W, c, activation="identity", z0=-c.detach() / 2, tol=1e-6, max_iter=1000,
                                        on_backward_overflow=on_backward_overflow)
    assert info.converged.all()
    return W, c, z, info


def test_backward_overflow_raises_by_default():
    W, c, z, info = _unstable_fixed_point("raise")
    with pytest.raises(FloatingPointError, match="overflowed"):
        z.sum().backward()


def test_backward_overflow_can_skip_the_batch():
    W, c, z, info = _unstable_fixed_point("skip")
    with pytest.warns(deqkern.SkippedGradientWarning, match="zero gradients"):
        z.sum().backward()
    assert info.backward.gradient_skipped
    assert torch.equal(W.grad, torch.zeros_like(W)) and torch.equal(c.grad, torch.zeros_like(c))
    # NaN arriving from upstream: named under "raise", skipped under "skip"
    for policy, expectation in (("raise", pytest.raises(ValueError, match="grad_z")),
                                ("skip", pytest.warns(deqkern.SkippedGradientWarning))):
        W = torch.eye(3, requires_grad=True).mul(0.5).detach().requires_grad_(True)
        c = torch.ones(2, 3, requires_grad=True)
        z, info = deqkern.fixed_point_dense(W, c, on_backward_overflow=policy)
        with expectation:
            (z * torch.tensor(float("nan"))).sum().backward()
    assert info.backward.gradient_skipped and torch.equal(W.grad, torch.zeros_like(W))
    # a healthy backward under "skip" is the ordinary one
    W = (0.5 * torch.eye(3)).requires_grad_(True)
    z, info = deqkern.fixed_point_dense(W, torch.ones(2, 3), on_backward_overflow="skip")
    z.sum().backward()
    assert not info.backward.gradient_skipped and W.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="on_backward_overflow"):
        deqkern.fixed_point_dense(W, torch.ones(2, 3), on_backward_overflow="ignore")


def test_layers_take_the_backward_overflow_policy():
    layer = deqkern.nn.DEQLinear(3, 4, on_backward_overflow="skip")
    assert layer.solver_options["on_backward_overflow"] == "skip"
    for cls in (deqkern.nn.PositiveConcaveDEQ, deqkern.nn.LinfContractiveDEQ, deqkern.nn.LipschitzDEQ):
        assert cls(3, 4, on_backward_overflow="skip").solver_options["on_backward_overflow"] == "skip"

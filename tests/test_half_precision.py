"""Half-precision (float16, bfloat16) dense solves on every backend: Picard and Anderson, forward and implicit
backward, against the references (deqkern/reference/common.py: the float32 solve of the widened inputs, rounded
once), within the kit's tolerance ladder; their accuracy against float64; gradients; nn.DEQLinear under autocast."""
import pytest
import torch

import deqkern
from deqkern.core.backends import kernel
from deqkern.core.constants import ANDERSON_DEFAULT_LAM as LAM
from deqkern.reference import (
    fixed_point_dense_anderson_backward_ref,
    fixed_point_dense_anderson_ref,
    fixed_point_dense_backward_ref,
    fixed_point_dense_ref,
)

import kit

HALF = (torch.float16, torch.bfloat16)
TOL, MAX_ITER = 1e-4, 300
# method -> (forward op name, forward reference, backward reference, method options after activation)
METHODS = {
    "picard": ("fixed_point_dense", fixed_point_dense_ref, fixed_point_dense_backward_ref, (0.7,)),
    "anderson": ("fixed_point_dense_anderson", fixed_point_dense_anderson_ref, fixed_point_dense_anderson_backward_ref,
                 (4, 1.0, LAM)),
}
# (batch, d, activation): d = 70 takes the Triton scratch kernels (rows wider than 64 are not held in registers).
SIZES = [(1, 1, "identity"), (3, 5, "tanh"), (17, 33, "sigmoid"), (6, 70, "softsign")]


def case_id(case):
    method, adjoint, batch, d, activation, dtype = case
    return f"{method}-{'adjoint' if adjoint else 'forward'}-B{batch}-D{d}-{activation}-{kit.dtype_id(dtype)}"


CASES = kit.backend_params([(case_id(c), c) for c in [
    (method, adjoint, batch, d, activation, dtype) for method in METHODS for adjoint in (False, True)
    for batch, d, activation in SIZES for dtype in HALF]])


@pytest.mark.parametrize("backend,method,adjoint,batch,d,activation,dtype", CASES)
def test_half_solve_matches_reference(backend, method, adjoint, batch, d, activation, dtype):
    op, forward_ref, backward_ref, options = METHODS[method]
    W, c, z0 = kit.dense_problem(batch, d, dtype, seed=3)
    args = (activation, *options, TOL, MAX_ITER)
    if adjoint:
        z = forward_ref(W, c, z0, *args)[0]
        inputs, ref = (W, c, z, kit.random_like(z)), backward_ref(W, c, z, kit.random_like(z), *args)
        op += "_backward"
    else:
        inputs, ref = (W, c, z0), forward_ref(W, c, z0, *args)
    out = kernel(op, backend)(*kit.to_device(kit.device_of(backend), *inputs), *args)
    assert out[2].dtype == torch.float32  # the residual is reported in the accumulation dtype
    kit.assert_solve_matches(out, ref, dtype)
    assert out[3].all()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", HALF, ids=kit.dtype_id)
def test_half_solve_is_as_accurate_as_its_dtype(dtype, method):
    """z* of half data (float32 accumulation) against the float64 fixed point of the same rounded data: within the
    dtype's rung of the ladder, i.e. limited by the final rounding, not by accumulating in half."""
    W, c, _ = kit.dense_problem(32, 48, dtype, seed=4)
    z, info = deqkern.fixed_point_dense(W, c, method=method, tol=1e-6, max_iter=500, on_nonconvergence="raise")
    exact, _ = deqkern.fixed_point_dense(W.double(), c.double(), method=method, tol=1e-12, max_iter=1000)
    assert z.dtype == dtype and info.residual.dtype == torch.float32 and bool(info.converged.all())
    error = ((z.double() - exact).norm() / exact.norm()).item()
    assert error < kit.TOLERANCES[dtype].rtol, error


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", HALF, ids=kit.dtype_id)
def test_half_implicit_gradients(dtype, method):
    """d loss / d(W, c) through a half solve (its adjoint solved in float32 too) against float64's, same data."""
    W, c, _ = kit.dense_problem(8, 24, dtype, seed=5)
    weights = kit.random_like(c)

    def grads(W, c, tol):
        W, c = W.clone().requires_grad_(), c.clone().requires_grad_()
        z, _ = deqkern.fixed_point_dense(W, c, method=method, tol=tol, max_iter=500, on_nonconvergence="raise")
        (z * weights.to(z.dtype)).sum().backward()
        return W.grad, c.grad

    half_grads = grads(W, c, 1e-6)
    exact_grads = grads(W.double(), c.double(), 1e-12)
    for name, g, g_exact in zip(("W", "c"), half_grads, exact_grads):
        assert g.dtype == dtype, name
        error = ((g.double() - g_exact).norm() / g_exact.norm()).item()
        assert error < kit.TOLERANCES[dtype].solve_rel, (name, error)


@pytest.mark.parametrize("dtype", HALF, ids=kit.dtype_id)
def test_half_jacobian_penalty(dtype):
    """The Jacobian penalty of a half solve is computed in float32 (2 w / N underflows float16 at everyday sizes):
    its value and its gradient (alone: the loss is 0 * z) match float32's on the same data."""
    W, c, _ = kit.dense_problem(64, 32, dtype, seed=6)

    def penalty_and_gradients(W, c):
        W, c = W.clone().requires_grad_(), c.clone().requires_grad_()
        z, info = deqkern.fixed_point_dense(W, c, tol=1e-6, max_iter=300, jacobian_penalty=1.0,
                                            on_nonconvergence="raise")
        (0 * z).sum().backward()  # the gradient is the penalty's alone
        return info.jacobian_penalty, W.grad, c.grad

    value, *grads = penalty_and_gradients(W, c)
    value32, *grads32 = penalty_and_gradients(W.float(), c.float())
    assert value.dtype == torch.float32 and abs(value.item() - value32.item()) <= 1e-2 * value32.item()
    for g, g32 in zip(grads, grads32):
        assert g.dtype == dtype and g32.norm() > 0
        error = ((g.double() - g32.double()).norm() / g32.double().norm()).item()
        assert error < kit.TOLERANCES[dtype].solve_rel, error


@pytest.mark.parametrize("dtype", HALF, ids=kit.dtype_id)
def test_half_opcheck(dtype):
    """The registered ops' fake kernels give the half solve's metadata (a float32 residual) on the CPU backend."""
    W, c, z0 = kit.dense_problem(5, 7, dtype)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.deqkern.fixed_point_dense.default, (W, c, z0, "tanh", 0.8, 1e-4, 100),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.deqkern.fixed_point_dense_anderson_backward.default,
                          (W, c, z0, kit.random_like(z0), "tanh", 3, 1.0, LAM, 1e-4, 100), test_utils=tests)


def test_deqlinear_under_autocast():
    """nn.DEQLinear in a bfloat16 autocast region: the solve reads bfloat16 data, returns bfloat16, and the float32
    parameters get finite float32 gradients close to those of the float32 layer."""
    torch.manual_seed(0)
    layer = deqkern.nn.DEQLinear(12, 24, tol=1e-5, max_iter=200, on_nonconvergence="raise")
    x = torch.randn(16, 12)
    out32 = layer(x)
    out32.square().sum().backward()
    grads32 = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = layer(x)
    assert out16.dtype == torch.bfloat16 and layer.last_info.residual.dtype == torch.float32
    out16.float().square().sum().backward()
    for p, g32 in zip(layer.parameters(), grads32):
        assert p.dtype == p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all())
        assert ((p.grad - g32).norm() / g32.norm()).item() < 5e-2
    assert ((out16.float() - out32).norm() / out32.norm()).item() < kit.TOLERANCES[torch.bfloat16].rtol


class _HalfInputMap(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, z, x):
        return 0.5 * torch.tanh(self.lin(z) + x)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16), ("cuda", torch.float16)], ids=["cpu-bf16", "cuda-f16"])
def test_deq_ift_backward_evaluates_f_under_the_forwards_autocast_state(device, dtype):
    """nn.DEQ in a half-precision autocast region with a half state: the backward's evaluations of f run under the
    forward's autocast (before, a float32 weight met the half state there: 'mat1 and mat2 must have the same
    dtype'), and the gradients are close to the float32 model's."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("float16 autocast needs a GPU here")
    torch.manual_seed(0)
    f = _HalfInputMap().to(device)
    deq = deqkern.nn.DEQ(f, solver_options=dict(tol=1e-3, max_iter=100), backward_options=dict(tol=1e-2))
    x = torch.randn(4, 8, device=device, requires_grad=True)
    deq(x).square().sum().backward()
    grads32 = [t.grad.clone() for t in (x, f.lin.weight)]
    x.grad = f.lin.weight.grad = None
    with torch.autocast(device, dtype=dtype):
        z = deq(x.to(dtype))
    assert z.dtype == dtype
    z.float().square().sum().backward()
    for t, g32 in zip((x, f.lin.weight), grads32):
        assert t.grad.dtype == torch.float32 and ((t.grad - g32).norm() / g32.norm()).item() < 5e-2


def test_deq_default_state_follows_fs_dtype_under_autocast():
    """f(z, x) = tanh(lin(z) + lin(x)) returns bfloat16 under autocast for a float32 x: the default state (no z0)
    takes that dtype (before, the first evaluation raised 'f must keep the state's dtype'); outside autocast it stays
    x's dtype."""
    torch.manual_seed(0)
    lin, lin2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    deq = deqkern.nn.DEQ(lambda z, x: 0.5 * torch.tanh(lin(z) + lin2(x)), solver_options=dict(tol=1e-2),
                         backward_options=dict(tol=1e-2))
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = deq(x)
    assert z.dtype == torch.bfloat16
    z.float().sum().backward()
    assert x.grad.dtype == lin.weight.grad.dtype == torch.float32 and bool(torch.isfinite(lin.weight.grad).all())
    assert deq(x).dtype == torch.float32


@pytest.mark.parametrize("name", ["LipschitzDEQ", "LinfContractiveDEQ", "PositiveConcaveDEQ"])
def test_certified_layers_solve_in_their_weight_dtype_under_autocast(name):
    """Under a bfloat16 autocast a certified layer's injection comes out in bfloat16; the layer widens it back and
    solves in its weight's dtype (float32), so that its certificate holds for the solve: the output is float32 and
    equals the float32 layer's given the same (rounded) injection."""
    torch.manual_seed(0)
    layer = getattr(deqkern.nn, name)(12, 24, tol=1e-6, max_iter=300).eval()
    x = torch.randn(16, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float32 and bool(layer.last_info.converged.all())
    assert ((out - layer(x)).norm() / layer(x).norm()).item() < kit.TOLERANCES[torch.bfloat16].rtol


# ---------------------------------------------------------------- TF32 products (Triton), following PyTorch's switch
@pytest.fixture
def matmul_precision():
    """Sets torch.set_float32_matmul_precision for one test and restores it after."""
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


@pytest.mark.skipif(kit.unavailable("triton") is not None, reason=str(kit.unavailable("triton")))
def test_triton_products_follow_torch_matmul_precision(matmul_precision):
    """Exact float32 products by default; TF32 when PyTorch allows it for float32 matmuls ("high" / "medium"), for
    float32 and half data (solved in float32); float64 never uses tl.dot. (The interpreter multiplies exactly whatever
    the precision: bench/compile_check.py proves that the TF32 kernels compile to tensor-core instructions.)"""
    from deqkern.triton_kernels.common import product_options

    matmul_precision("highest")
    assert product_options(torch.float32) == dict(USE_DOT=True, DOT_PRECISION="ieee")
    for precision in ("high", "medium"):
        matmul_precision(precision)
        assert product_options(torch.float32) == dict(USE_DOT=True, DOT_PRECISION="tf32")
        assert product_options(torch.float64) == dict(USE_DOT=False, DOT_PRECISION="ieee")
    W, c, z0 = kit.dense_problem(3, 20, torch.bfloat16, kit.device_of("triton"))
    out = kernel("fixed_point_dense", "triton")(W, c, z0, "tanh", 1.0, 1e-3, MAX_ITER)
    kit.assert_solve_matches(out, fixed_point_dense_ref(W.cpu(), c.cpu(), z0.cpu(), "tanh", 1.0, 1e-3, MAX_ITER),
                             torch.bfloat16)

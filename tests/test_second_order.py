"""Second derivatives through the implicit backward (create_graph=True, then differentiating the gradient again),
against unrolled autograd to convergence in float64: d2z/dx2, a Hessian-vector product in x and W of E = ||z*||^2 / 2,
the W-gradient of a force-matching loss ||dE/dx - F||^2; gradgradcheck on small cases; and the loud errors where a
second derivative is not implemented."""
import pytest
import torch

import deqkern
from kit import backend_names, contractive_matrix, device_of, random_like

TIGHT = dict(tol=1e-13, max_iter=400)
UNROLLED_STEPS = 300  # ||W|| = 0.6: 0.6^300 is far below float64's resolution


def unrolled(f, x):
    z = torch.zeros_like(x)
    for _ in range(UNROLLED_STEPS):
        z = f(z, x)
    return z


def second_order_quantities(solve, x, W):
    """(HVP of E in (x, W) along ones, W-gradient of the force-matching loss) of z* = solve(x)."""
    z = solve(x)
    energy = 0.5 * (z ** 2).sum()
    grad_x, grad_W = torch.autograd.grad(energy, (x, W), create_graph=True)
    hvp = torch.autograd.grad(grad_x.sum() + grad_W.sum(), (x, W), retain_graph=True)
    forces = random_like(grad_x, seed=5)
    (force_grad_W,) = torch.autograd.grad(((grad_x - forces) ** 2).sum(), W)
    return (*hvp, force_grad_W)


def assert_relative(got, expected, rtol=1e-6):
    for g, e in zip(got, expected):
        error = ((g - e).norm() / e.norm().clamp_min(1e-30)).item()
        assert error <= rtol, f"relative error {error:.2e}"


class DenseMap(torch.nn.Module):
    def __init__(self, d, seed=0):
        super().__init__()
        self.W = torch.nn.Parameter(contractive_matrix(d, norm=0.6, generator=torch.Generator().manual_seed(seed)))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x)


@pytest.mark.parametrize("method", ["anderson", "picard", "broyden"])
@pytest.mark.parametrize("f_kind", ["function", "module"])
def test_deq_d2z_dx2_of_the_scalar_equation(method, f_kind):
    """z = tanh(0.5 z + x) at x = 0.3: d2z/dx2 = -3.0676 (the issue measured -1.1999 before)."""
    scalar_map = (lambda z, x: torch.tanh(0.5 * z + x)) if f_kind == "function" else _ScalarMap()
    deq = deqkern.nn.DEQ(scalar_map, method=method, solver_options=TIGHT, backward_options=dict(TIGHT, method=method))
    results = []
    for solve in (deq, lambda x: unrolled(scalar_map, x)):
        x = torch.tensor([[0.3]], dtype=torch.float64, requires_grad=True)
        (dz,) = torch.autograd.grad(solve(x).sum(), x, create_graph=True)
        (d2z,) = torch.autograd.grad(dz.sum(), x)
        results.append((dz, d2z))
    assert_relative(results[0], results[1])
    assert abs(results[0][1].item() + 3.0676) < 1e-4


class _ScalarMap(torch.nn.Module):
    def forward(self, z, x):
        return torch.tanh(0.5 * z + x)


@pytest.mark.parametrize("method", ["anderson", "picard", "broyden"])
def test_deq_hessian_vector_products_match_unrolled(method):
    f = DenseMap(6)
    deq = deqkern.nn.DEQ(f, method=method, solver_options=TIGHT, backward_options=dict(TIGHT, method=method))
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert_relative(second_order_quantities(deq, x, f.W),
                    second_order_quantities(lambda x: unrolled(f, x), x, f.W))


@pytest.mark.parametrize("backend", backend_names(("cpu", "cuda", "triton", "reference")))
@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_dense_hessian_vector_products_match_unrolled(backend, method):
    device = device_of(backend)
    W = contractive_matrix(6, norm=0.6, device=device).requires_grad_()
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()

    def solve(c):
        return deqkern.fixed_point_dense(W, c, method=method, backend=backend, **TIGHT)[0]

    assert_relative(second_order_quantities(solve, x, W),
                    second_order_quantities(lambda c: unrolled(lambda z, c: torch.tanh(z @ W.T + c), c), x, W))


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_gradgradcheck_dense_and_deq(method):
    W = contractive_matrix(3, norm=0.6).requires_grad_()
    c = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda W, c: deqkern.fixed_point_dense(W, c, method=method, **TIGHT)[0], (W, c))
    deq = deqkern.nn.DEQ(DenseMap(3), method=method, solver_options=TIGHT, backward_options=dict(TIGHT, method=method))
    assert torch.autograd.gradgradcheck(deq, (c,))


LAYERS = {
    "DEQLinear": lambda: deqkern.nn.DEQLinear(3, 4, **TIGHT, dtype=torch.float64),
    "LipschitzDEQ": lambda: deqkern.nn.LipschitzDEQ(3, 4, **TIGHT, dtype=torch.float64),
    "LinfContractiveDEQ": lambda: deqkern.nn.LinfContractiveDEQ(3, 4, **TIGHT, dtype=torch.float64),
    "PositiveConcaveDEQ": lambda: deqkern.nn.PositiveConcaveDEQ(3, 4, **TIGHT, dtype=torch.float64),
    "LipschitzConvDEQ": lambda: deqkern.nn.LipschitzConvDEQ(1, 1, **TIGHT, dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_gradgradcheck_layers(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    shape = (1, 1, 2, 2) if "Conv" in name else (2, 3)
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    assert torch.autograd.gradgradcheck(layer, (x,))


@pytest.mark.parametrize("mode", ["phantom", "one_step"])
def test_phantom_and_one_step_are_differentiated_as_their_unrolled_steps(mode):
    f = DenseMap(5)
    deq = deqkern.nn.DEQ(f, backward=mode, solver_options=TIGHT, phantom_steps=3, phantom_damping=0.7)
    x = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def steps(x):  # what the mode is: steps with grad from z* (held constant)
        z_star = deqkern.solve(lambda z: f(z, x.detach()), torch.zeros_like(x), **TIGHT)[0]
        if mode == "one_step":
            return f(z_star, x)
        z = z_star
        for _ in range(3):
            z = 0.3 * z + 0.7 * f(z, x)
        return z

    assert_relative(second_order_quantities(deq, x, f.W), second_order_quantities(steps, x, f.W), rtol=1e-10)


def test_a_closure_tensor_gets_its_first_derivative_and_a_second_one_raises():
    W = contractive_matrix(4, norm=0.6).requires_grad_()
    deq = deqkern.nn.DEQ(lambda z, x: torch.tanh(z @ W.T + x), solver_options=TIGHT, backward_options=TIGHT)
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    grad_x, grad_W = torch.autograd.grad(deq(x).sum(), (x, W), create_graph=True)
    expected = torch.autograd.grad(unrolled(lambda z, x: torch.tanh(z @ W.T + x), x).sum(), (x, W))
    assert_relative((grad_x.detach(), grad_W.detach()), expected)
    for wrt in (x, W):
        with pytest.raises(RuntimeError, match="neither a parameter of f nor a tensor of x"):
            torch.autograd.grad(grad_x.sum(), wrt, retain_graph=True)


def test_the_dense_jacobian_penalty_raises_on_a_second_derivative():
    W = contractive_matrix(4, norm=0.6).requires_grad_()
    c = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    z, _ = deqkern.fixed_point_dense(W, c, jacobian_penalty=0.1, **TIGHT)
    (grad_c,) = torch.autograd.grad(z.sum(), c, create_graph=True)
    with pytest.raises(RuntimeError, match="jacobian_penalty"):
        torch.autograd.grad(grad_c.sum(), W)


@pytest.mark.parametrize("kind", ["dense", "DEQ"])
def test_a_third_derivative_raises(kind):
    x = torch.tensor([[0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    if kind == "dense":
        z = deqkern.fixed_point_dense(0.4 * torch.eye(2, dtype=torch.float64), x, **TIGHT)[0]
    else:
        z = deqkern.nn.DEQ(_ScalarMap(), solver_options=TIGHT, backward_options=TIGHT)(x)
    (d1,) = torch.autograd.grad(z.sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivative"):
        torch.autograd.grad(d2.sum(), x)


def test_a_weight_normalised_multiscale_deq_matches_finite_differences():
    """MDEQ's weights are weight-normalised (a parametrisation, cached per forward): the second derivative must
    follow them. d/dt of the x-gradient along a direction, against a central difference of first derivatives."""
    torch.manual_seed(0)
    model = deqkern.nn.MultiscaleDEQ(1, channels=(2, 2), groups=1, expansion=1, weight_norm=True,
                                     solver_options=dict(tol=1e-11, max_iter=200),
                                     backward_options=dict(method="anderson", tol=1e-11, max_iter=200),
                                     dtype=torch.float64).eval()
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    direction = random_like(x, seed=8)

    def grad_x(x, create_graph):
        out = model(x)
        return torch.autograd.grad(sum((z ** 2).sum() for z in out), x, create_graph=create_graph)[0]

    (hvp,) = torch.autograd.grad((grad_x(x, True) * direction).sum(), x)
    eps = 1e-5
    shifted = [(x.detach() + sign * eps * direction).requires_grad_() for sign in (1, -1)]
    central = (grad_x(shifted[0], False) - grad_x(shifted[1], False)) / (2 * eps)
    assert ((hvp - central).norm() / central.norm()).item() < 1e-5


def test_the_force_matching_example_trains_as_its_unrolled_twin_and_lowers_its_loss():
    """deqkern.apps.force_matching, a DEQ energy model trained on forces (a loss on dE/dx, differentiated again): nn.DEQ
    with implicit second derivatives follows the training curve of the same model unrolled (same start, same
    batches); the certified LipschitzDEQ version lowers the force loss on a held-out batch."""
    from deqkern.apps.force_matching import DEQEnergy, force_loss, target_forces, train

    curves = {}
    for layer in ("DEQ", "unrolled"):
        torch.manual_seed(0)
        curves[layer] = train(DEQEnergy(8, 16, layer=layer), steps=10, batch=32)
    assert curves["DEQ"] == pytest.approx(curves["unrolled"], rel=1e-3)

    torch.manual_seed(0)
    model = DEQEnergy(8, 16, layer="LipschitzDEQ")
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(9))
    before = force_loss(model, x, target_forces(x)).item()
    train(model, steps=30, batch=32)
    after = force_loss(model, x, target_forces(x)).item()
    assert after < 0.9 * before, (before, after)

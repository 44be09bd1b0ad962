"""deqkern.nn.DEQLinear: a trainable implicit layer."""
import pytest
import torch
from torch import nn

import deqkern
from deqkern.reference import fixed_point_dense_ref


def test_deqlinear_output_is_the_fixed_point():
    torch.manual_seed(0)
    layer = deqkern.nn.DEQLinear(7, 13, activation="softsign", tol=1e-10, max_iter=500, dtype=torch.float64)
    x = torch.randn(5, 7, dtype=torch.float64)
    z = layer(x)
    c = layer.injection(x)
    torch.testing.assert_close(z, fixed_point_dense_ref(layer.weight, c, torch.zeros_like(c), "softsign", 1.0,
                                                        1e-10, 500)[0])
    assert z.shape == (5, 13) and layer.last_info.converged.all()
    assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() == pytest.approx(0.5)


def test_deqlinear_gradcheck_through_all_parameters():
    torch.manual_seed(1)
    layer = deqkern.nn.DEQLinear(3, 4, tol=1e-13, max_iter=2000, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    params = (layer.weight, layer.injection.weight, layer.injection.bias)

    def f(x, W, U, b):
        c = x @ U.T + b
        return deqkern.fixed_point_dense(W, c, tol=1e-13, max_iter=2000)[0]

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)
    layer(x).sum().backward()  # the module path populates every parameter gradient
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert layer.last_info.backward.converged.all()


def test_deqlinear_trains_and_matches_reference_backend():
    """A few optimizer steps with the CPU kernels follow the pure-PyTorch reference step for step."""
    torch.manual_seed(2)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    losses = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(3)
        model = nn.Sequential(deqkern.nn.DEQLinear(10, 24, backend=backend, tol=1e-6), nn.Linear(24, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses[backend] = []
        for _ in range(15):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[backend].append(loss.item())
    assert losses["cpu"][-1] < 0.5 * losses["cpu"][0]
    torch.testing.assert_close(torch.tensor(losses["cpu"]), torch.tensor(losses["reference"]), rtol=2e-3, atol=1e-4)


def test_deqlinear_repr_and_bad_activation():
    assert "hidden_features=6" in repr(deqkern.nn.DEQLinear(2, 6))
    with pytest.raises(ValueError, match="unknown activation"):
        deqkern.nn.DEQLinear(2, 6, activation="swish")


@pytest.mark.parametrize("layer_class", [deqkern.nn.DEQLinear, deqkern.nn.PositiveConcaveDEQ])
def test_dense_layers_compile_with_fullgraph_forward_and_backward(layer_class):
    """torch.compile(fullgraph=True) of a dense layer, forward and backward, equals eager (a regression: the context
    that names a non-finite input to the user broke the graph until it stood aside while tracing)."""
    torch.manual_seed(0)
    layer = layer_class(4, 8, tol=1e-6, max_iter=200)
    x = torch.randn(3, 4)
    compiled = torch.compile(lambda x: layer(x).square().sum(), fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    eager = layer(x).square().sum()
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for p, g in zip(layer.parameters(), grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)

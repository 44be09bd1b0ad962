"""pytest-benchmark cases: `pytest bench/ --benchmark-only` (plain `pytest tests/` never collects this file)."""
import pytest
import torch

import deqkern
from harness.peers import eager_solve, layer, random_contraction_problem

SHAPES = [(32, 64)]


@pytest.fixture(autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("batch,d", SHAPES, ids=[f"B{b}-D{d}" for b, d in SHAPES])
def test_forward_deqkern_cpu(benchmark, batch, d):
    W, c, _ = random_contraction_problem(batch, d)
    z, info = benchmark(deqkern.fixed_point_dense, W, c, tol=1e-4, max_iter=100, backend="cpu")
    assert bool(info.converged.all())


@pytest.mark.parametrize("batch,d", SHAPES, ids=[f"B{b}-D{d}" for b, d in SHAPES])
def test_forward_pytorch_eager_loop(benchmark, batch, d):
    W, c, z0 = random_contraction_problem(batch, d)
    z, iterations = benchmark(eager_solve, layer(W, c), z0)
    z_ref, _ = deqkern.fixed_point_dense(W, c, tol=1e-4, max_iter=100, backend="cpu")
    assert iterations < 100
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-3)

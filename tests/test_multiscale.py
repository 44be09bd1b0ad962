"""deqkern.nn.MultiscaleDEQ (the MDEQ cell of Bai, Koltun and Kolter 2020) and its classifier."""
import pytest
import torch

import deqkern
from deqkern.nn.multiscale import MultiscaleCell

DT = torch.float64


def _small(seed=2, **options):
    torch.manual_seed(seed)
    model = deqkern.nn.MultiscaleDEQ(2, channels=(2, 4), expansion=2, groups=2, dtype=DT, **options)
    with torch.no_grad():  # no contraction (GroupNorm amplifies), but with this seed Anderson reaches 1e-13
        for name, p in model.cell.named_parameters():
            if p.dim() == 4:
                p.normal_(0.0, 0.05)
    return model


def _x(batch=2, size=4, seed=1):
    return torch.randn(batch, 2, size, size, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_branches_have_their_resolutions_and_statistics():
    model = deqkern.nn.MultiscaleDEQ(3, channels=(4, 8, 16), expansion=2, groups=4,
                                     solver_options=dict(tol=1e-3, max_iter=30, on_nonconvergence="ignore"))
    z = model(torch.randn(5, 3, 16, 12))
    assert isinstance(z, tuple) and [tuple(t.shape) for t in z] == [(5, 4, 16, 12), (5, 8, 8, 6), (5, 16, 4, 3)]
    assert model.last_info.iterations.shape == (5,)
    assert model.state_shapes(16, 12) == ((4, 16, 12), (8, 8, 6), (16, 4, 3))


def _flat(state):
    return torch.cat([t.reshape(t.shape[0], -1) for t in state], dim=1)


def test_fixed_point_and_ift_gradients_match_an_exact_linear_solve_and_finite_differences():
    """The MDEQ cell is no contraction (its GroupNorms amplify; the plain iteration oscillates here), so there is no
    unrolled reference: the fixed point is checked by its residual, the IFT gradients against g = (I - J^T)^-1 v with
    J built explicitly and solved exactly, and against central differences of z*(x) re-solved at +-eps."""
    model = _small(solver_options=dict(tol=1e-13, max_iter=400),
                   backward_options=dict(method="anderson", tol=1e-13, max_iter=400))
    x = _x().requires_grad_()
    z = model(x)
    assert model.last_info.converged.all()
    injection = model.injection(x)
    with torch.no_grad():
        residual = _flat(model.cell(z, (injection, None))) - _flat(z)
    assert residual.abs().max() < 1e-10

    weights = [torch.randn(t.shape, dtype=DT, generator=torch.Generator().manual_seed(7)) for t in z]
    params = list(model.parameters())
    grads = torch.autograd.grad(sum((a * w).sum() for a, w in zip(z, weights)), [x] + params)
    assert model.last_info.backward.converged.all()

    z_star = _flat(z).detach()
    sizes = [t[0].numel() for t in z]
    shapes = [t.shape[1:] for t in z]

    def unpack(flat):
        return tuple(p.reshape(flat.shape[0], *shape) for p, shape in zip(torch.split(flat, sizes, dim=1), shapes))

    def cell_flat(flat):
        return _flat(model.cell(unpack(flat), (injection.detach(), None)))

    n = z_star.numel()
    J = torch.autograd.functional.jacobian(cell_flat, z_star).reshape(n, n)
    g = torch.linalg.solve(torch.eye(n, dtype=DT) - J.T, _flat(weights).reshape(n))
    out = _flat(model.cell(unpack(z_star), (model.injection(x), None)))
    exact = torch.autograd.grad(out, [x] + params, g.reshape(out.shape))
    for got, ref in zip(grads, exact):
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9)

    direction = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(8))
    eps = 1e-5
    with torch.no_grad():
        plus, minus = model(x + eps * direction), model(x - eps * direction)
    finite_difference = sum((w * (a - b)).sum() for w, a, b in zip(weights, plus, minus)) / (2 * eps)
    torch.testing.assert_close((grads[0] * direction).sum(), finite_difference, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["anderson", "picard", "broyden"])
@pytest.mark.parametrize("backward", ["ift", "phantom", "one_step"])
def test_every_method_and_backward_mode_trains(method, backward):
    # the MDEQ cell is no contraction: Picard need not converge (its statistics say so); the gradients stay finite
    quiet = dict(tol=1e-6, max_iter=100, on_nonconvergence="ignore")
    model = _small(method=method, backward=backward, solver_options=quiet, backward_options=dict(quiet, method=method))
    z = model(_x())
    sum(t.square().sum() for t in z).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_variational_dropout_keeps_one_mask_for_the_whole_solve():
    model = _small(dropout=0.3, solver_options=dict(tol=1e-8, max_iter=50, on_nonconvergence="ignore"))
    seen = []
    model.cell.register_forward_pre_hook(lambda module, args: seen.append(args[1][1]))
    x = _x(batch=3)
    model.train()(x)
    first = seen[:]
    assert len(first) > 2 and first[0] is not None
    assert all(masks is first[0] for masks in first)  # every evaluation of one forward sees the same masks
    kept = first[0][0]
    assert set(torch.unique(kept).tolist()) <= {0.0, 1 / 0.7} and (kept == 0).any()
    seen.clear()
    model(x)
    assert seen[0] is not first[0] and not torch.equal(seen[0][0], kept)  # a new mask per forward
    seen.clear()
    model.eval()(x)
    assert all(masks is None for masks in seen)  # no dropout in eval


def test_warm_start_from_the_equilibrium_stops_at_once():
    model = _small(solver_options=dict(tol=1e-10, max_iter=300))
    x = _x()
    with torch.no_grad():
        z = model(x)
        cold = int(model.last_info.iterations.max())
        again = model(x, z0=z)
    assert int(model.last_info.iterations.max()) <= 2 < cold
    for a, b in zip(again, z):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_weight_normalised_convolutions_get_gradients():
    model = _small(weight_norm=True, solver_options=dict(tol=1e-6, max_iter=100, on_nonconvergence="ignore"))
    parametrized = [m for m in model.cell.modules() if isinstance(m, torch.nn.Conv2d)]
    assert parametrized and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in parametrized)
    z = model(_x())
    sum(t.square().sum() for t in z).backward()
    for m in parametrized:
        original = m.parametrizations.weight
        assert original.original0.grad is not None and original.original1.grad is not None


def test_jacobian_regularised_mdeq_reports_its_penalty():
    model = _small(jac_reg=(1.0, 1.0), solver_options=dict(tol=1e-8, max_iter=200)).train()
    z = model(_x())
    sum(t.sum() for t in z).backward()
    assert model.last_jac_loss is not None and float(model.last_jac_loss) > 0


def test_classifier_is_one_line_and_learns_the_digits():
    from deqkern.apps.digits import load_digits_split

    torch.manual_seed(0)
    (x, y), _ = load_digits_split("cpu", torch.float32)
    x, y = x[:512].reshape(-1, 1, 8, 8), y[:512]
    model = deqkern.nn.MultiscaleDEQClassifier(1, 10, channels=(8, 16), expansion=2, final_channels=32,
                                               solver_options=dict(tol=1e-3, max_iter=20, on_nonconvergence="ignore"),
                                               backward_options=dict(tol=1e-3, max_iter=20,
                                                                     on_nonconvergence="ignore"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for epoch in range(5):
        for i in range(0, 512, 64):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-8:]) < 0.85 * sum(losses[:8]), losses
    assert model.last_info is not None


@pytest.mark.parametrize("make, error, match", [
    (lambda: deqkern.nn.MultiscaleDEQ(3, channels=()), ValueError, "channels"),
    (lambda: deqkern.nn.MultiscaleDEQ(3, channels=(4, 0)), ValueError, r"channels\[1\]"),
    (lambda: deqkern.nn.MultiscaleDEQ(3, dropout=1.0), ValueError, "dropout"),
    (lambda: deqkern.nn.MultiscaleDEQ(3, method="newton"), ValueError, "method"),
    (lambda: deqkern.nn.MultiscaleDEQ(3, (4, 8), 5), TypeError, "keyword-only"),
    (lambda: deqkern.nn.MultiscaleDEQClassifier(3, 10, head_channels=(4,)), ValueError, "head_channels"),
])
def test_bad_options_raise_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_inputs_name_the_problem():
    model = deqkern.nn.MultiscaleDEQ(3, channels=(4, 8, 16))
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(2, 3, 6, 8))
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.randn(2, 4, 8, 8))
    with pytest.raises(TypeError, match="x must be"):
        model(torch.zeros(2, 3, 8, 8, dtype=torch.int64))


def test_the_cell_treats_samples_independently():
    """GroupNorm, not BatchNorm: sample b's output depends on sample b only (what per-sample stopping needs)."""
    torch.manual_seed(0)
    cell = MultiscaleCell((2, 4), expansion=2, groups=2, dtype=DT)
    z = (torch.randn(3, 2, 4, 4, dtype=DT), torch.randn(3, 4, 2, 2, dtype=DT))
    injection = torch.randn(3, 2, 4, 4, dtype=DT)
    full = cell(z, (injection, None))
    alone = cell(tuple(t[1:2] for t in z), (injection[1:2], None))
    for a, b in zip(full, alone):
        torch.testing.assert_close(a[1:2], b, rtol=1e-12, atol=1e-12)

"""deqkern.nn.DEQ (generic f(z, x)) and the torchdeq drop-in solvers."""
import warnings

import pytest
import torch
from torch import nn

import deqkern

DT = torch.float64


# ---------------------------------------------------------------- layers
class TanhLayer(nn.Module):
    """f(z, x) = tanh(z W^T + x U^T + b), ||W||_2 = 0.5."""

    def __init__(self, d_in, d, scale=0.5):
        super().__init__()
        W = torch.randn(d, d, dtype=DT)
        self.W = nn.Parameter(scale * W / torch.linalg.matrix_norm(W, ord=2))
        self.U = nn.Parameter(torch.randn(d, d_in, dtype=DT) / d_in ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(d, dtype=DT))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class MLPLayer(nn.Module):
    """f(z, x) = 0.5 * tanh-MLP([z, x]) (conv-free, two layers, contractive by its small scale)."""

    def __init__(self, d_in, d, hidden=16):
        super().__init__()
        self.l1 = nn.Linear(d + d_in, hidden, dtype=DT)
        self.l2 = nn.Linear(hidden, d, dtype=DT)
        with torch.no_grad():
            self.l1.weight[:, :d].mul_(0.6 / torch.linalg.matrix_norm(self.l1.weight[:, :d], ord=2))
            self.l2.weight.mul_(0.8 / torch.linalg.matrix_norm(self.l2.weight, ord=2))

    def forward(self, z, x):
        return self.l2(torch.tanh(self.l1(torch.cat([z, x], dim=-1))))


D_IN, D, B = 4, 6, 3
TIGHT = dict(tol=1e-12, max_iter=300)
BTIGHT = dict(method="anderson", tol=1e-12, max_iter=300)


def _make(kind, seed=0):
    torch.manual_seed(seed)
    f = TanhLayer(D_IN, D) if kind == "tanh" else MLPLayer(D_IN, D)
    x = torch.randn(B, D_IN, dtype=DT, requires_grad=True)
    return f, x


def _grads(f, x, z, weights):
    loss = (z * weights).sum()
    return torch.autograd.grad(loss, [*f.parameters(), x])


def _unrolled(f, x, steps=200):
    z = torch.zeros(B, D, dtype=DT)
    for _ in range(steps):
        z = f(z, x)
    return z


@pytest.mark.parametrize("kind", ["tanh", "mlp"])
def test_fixed_point_and_ift_matches_unrolled(kind):
    f, x = _make(kind)
    deq = deqkern.nn.DEQ(f, solver_options=TIGHT, backward_options=BTIGHT, z_shape=(D,))
    assert "f" in dict(deq.named_children())  # f's parameters belong to the DEQ
    z = deq(x)
    info = deq.last_info
    with torch.no_grad():
        assert (f(z, x) - z).abs().max() < 1e-10
    assert info.converged.all()
    w = torch.randn(B, D, dtype=DT)
    g_ift = _grads(f, x, z, w)
    assert info.backward is not None and info.backward.converged.all()
    g_ref = _grads(f, x, _unrolled(f, x), w)
    for a, r in zip(g_ift, g_ref):
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("kind", ["tanh", "mlp"])
@pytest.mark.parametrize("solver", ["anderson", "picard", "broyden"])
def test_solver_methods_and_backward_solvers(kind, solver):
    f, x = _make(kind, seed=1)
    deq = deqkern.nn.DEQ(f, method=solver, solver_options=TIGHT,
                         backward_options=dict(BTIGHT, method=solver), z_shape=(D,))
    z = deq(x)
    w = torch.randn(B, D, dtype=DT)
    for a, r in zip(_grads(f, x, z, w), _grads(f, x, _unrolled(f, x), w)):
        torch.testing.assert_close(a, r, atol=1e-8, rtol=1e-7)


def test_phantom_and_one_step():
    f, x = _make("tanh", seed=2)
    w = torch.randn(B, D, dtype=DT)
    ift = deqkern.nn.DEQ(f, solver_options=TIGHT, backward_options=BTIGHT, z_shape=(D,))
    g_ift = _grads(f, x, ift(x), w)
    for backward, opts in (("phantom", dict(phantom_steps=5)), ("one_step", {})):
        deq = deqkern.nn.DEQ(f, backward=backward, solver_options=TIGHT, z_shape=(D,), **opts)
        g = _grads(f, x, deq(x), w)
        assert all(torch.isfinite(t).all() for t in g)
    many = deqkern.nn.DEQ(f, backward="phantom", solver_options=TIGHT, z_shape=(D,), phantom_steps=150,
                          phantom_damping=0.8)
    z = many(x)
    with torch.no_grad():
        assert (z - ift(x)).abs().max() < 1e-10  # phantom steps from z* stay at z*
    for a, r in zip(_grads(f, x, z, w), g_ift):
        torch.testing.assert_close(a, r, atol=1e-8, rtol=1e-7)


def test_gradcheck_ift_tiny():
    torch.manual_seed(3)
    W0 = torch.randn(3, 3, dtype=DT)
    W = (0.5 * W0 / torch.linalg.matrix_norm(W0, ord=2)).requires_grad_()
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)

    def fn(x, W):
        deq = deqkern.nn.DEQ(lambda z, x: torch.tanh(z @ W.T + x), solver_options=dict(tol=1e-14, max_iter=500),
                             backward_options=dict(tol=1e-14, max_iter=500))
        return deq(x)

    assert torch.autograd.gradcheck(fn, (x, W), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_eval_mode_force_matches_finite_differences():
    f, _ = _make("mlp", seed=4)
    deq = deqkern.nn.DEQ(f, solver_options=TIGHT, backward_options=BTIGHT, z_shape=(D,)).eval()
    head = torch.randn(D, dtype=DT)

    def energy(x):
        z = deq(x)
        return (torch.tanh(z) @ head).sum()

    x = torch.randn(B, D_IN, dtype=DT, requires_grad=True)
    e = energy(x)
    info = deq.last_info
    force = -torch.autograd.grad(e, x)[0]
    assert info.backward is not None and info.backward.converged.all()  # the adjoint solve ran in eval mode
    fd = torch.zeros_like(x)
    eps = 1e-6
    with torch.no_grad():
        for i in range(B):
            for j in range(D_IN):
                e = torch.zeros_like(x)
                e[i, j] = eps
                fd[i, j] = -(energy(x + e) - energy(x - e)) / (2 * eps)
    torch.testing.assert_close(force, fd, atol=1e-7, rtol=1e-6)


def test_torchdeq_eval_mode_has_no_graph_where_deq_has_one():
    torchdeq = pytest.importorskip("torchdeq")
    f, x = _make("tanh", seed=8)
    td = torchdeq.get_deq(f_solver="anderson", b_solver="anderson", ift=True, f_tol=1e-10, f_max_iter=100).eval()
    z_td = td(lambda z: f(z, x), torch.zeros(B, D, dtype=DT))[0][-1]
    assert not z_td.requires_grad  # torchdeq: no force in eval mode
    z = deqkern.nn.DEQ(f, solver_options=TIGHT, z_shape=(D,)).eval()(x)
    assert z.requires_grad and z.grad_fn is not None


def test_unknown_and_misspelled_options_raise():
    f, _ = _make("tanh")
    with pytest.raises(ValueError, match="method"):
        deqkern.nn.DEQ(f, method="andersen")
    with pytest.raises(ValueError, match="backward"):
        deqkern.nn.DEQ(f, backward="implicit")
    with pytest.raises(ValueError):
        deqkern.nn.DEQ(f, backward_options=dict(method="newton"))
    with pytest.raises(TypeError, match="tols"):
        deqkern.nn.DEQ(f, solver_options=dict(tols=1e-6))  # misspelled: torchdeq would ignore it
    with pytest.raises(TypeError, match="max_iters"):
        deqkern.nn.DEQ(f, backward_options=dict(max_iters=10))
    with pytest.raises(ValueError, match="on_nonconvergence"):
        deqkern.nn.DEQ(f, solver_options=dict(on_nonconvergence="loud"))
    with pytest.raises(ValueError):
        deqkern.nn.DEQ(f, backward="phantom", phantom_damping=1.5)


def test_wrong_state_shape_is_named():
    f, x = _make("tanh")
    with pytest.raises(RuntimeError) as raised:  # f's own error, unchanged, with the state it was called on noted
        deqkern.nn.DEQ(f)(x)  # default z0 = zeros_like(x) has 4 features, f needs 6
    if hasattr(raised.value, "add_note"):
        assert any("z_shape" in note for note in raised.value.__notes__)
    with pytest.raises(ValueError, match="z_shape"):
        deqkern.nn.DEQ(lambda z, x: torch.cat([z, z], -1))(x)  # f returns another shape
    z = deqkern.nn.DEQ(f)(x, z0=torch.zeros(B, D, dtype=DT))  # an explicit z0 sets the shape
    assert z.shape == (B, D)


def test_nonconvergence_policy_forward_and_backward():
    f, x = _make("tanh", seed=5)
    loose = dict(tol=1e-14, max_iter=2)
    with pytest.warns(deqkern.NonConvergenceWarning):
        deqkern.nn.DEQ(f, solver_options=loose, z_shape=(D,))(x)
    with pytest.raises(deqkern.NonConvergenceError):
        deqkern.nn.DEQ(f, solver_options=dict(loose, on_nonconvergence="raise"), z_shape=(D,))(x)
    deq = deqkern.nn.DEQ(f, solver_options=TIGHT, backward_options=dict(loose, on_nonconvergence="raise"),
                         z_shape=(D,))
    z = deq(x)
    with pytest.raises(deqkern.NonConvergenceError):
        z.sum().backward()


# ---------------------------------------------------------------- torchdeq drop-in
@pytest.mark.parametrize("core", ["sliced", "indexing"])
def test_torchdeq_drop_in(core):
    torchdeq = pytest.importorskip("torchdeq")
    names = deqkern.register_torchdeq_solvers()
    assert names == ["deqkern_anderson", "deqkern_picard", "deqkern_broyden"]
    f, x = _make("tanh", seed=6)
    z0 = torch.zeros(B, D, dtype=DT)
    w = torch.randn(B, D, dtype=DT)
    common = dict(core=core, ift=True, f_tol=1e-11, b_tol=1e-11, f_max_iter=200, b_max_iter=200)

    results = {}
    for solver in ("anderson", "deqkern_anderson"):
        deq = torchdeq.get_deq(f_solver=solver, b_solver=solver, **common)
        z_out, info = deq(lambda z: f(z, x), z0)
        assert set(info) >= {"abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep"}
        assert info["abs_lowest"].shape == (B,) and (info["abs_lowest"] < 1e-11).all()
        results[solver] = (z_out[-1].detach(), _grads(f, x, z_out[-1], w))
        deq.eval()
        z_eval, info = deq(lambda z: f(z, x), z0)
        assert "sradius" in info
        torch.testing.assert_close(z_eval[-1], results[solver][0], atol=1e-10, rtol=0)

    z_ours, _ = deqkern.solve(lambda z: f(z, x), z0, method="anderson", tol=1e-13, max_iter=300)
    z_td, g_td = results["anderson"]
    z_dk, g_dk = results["deqkern_anderson"]
    torch.testing.assert_close(z_dk, z_td, atol=1e-10, rtol=0)
    torch.testing.assert_close(z_dk, z_ours.detach(), atol=1e-10, rtol=0)
    for a, r in zip(g_dk, g_td):
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-8)


def test_torchdeq_adapter_contract():
    pytest.importorskip("torchdeq")
    from torchdeq.solver import get_solver

    deqkern.register_torchdeq_solvers(on_nonconvergence="raise")
    f, x = _make("tanh", seed=7)
    func = lambda z: f(z, x).detach()  # noqa: E731
    z0 = torch.zeros(B, D, dtype=DT)
    for name in ("deqkern_anderson", "deqkern_picard", "deqkern_broyden"):
        solver = get_solver(name)
        z, traj, info = solver(func, z0, max_iter=200, tol=1e-9, stop_mode="abs", indexing=[5, 200])
        assert len(traj) == 2 and traj[-1] is z
        assert (info["abs_lowest"] <= 1e-9).all() and info["nstep"].shape == (B,)
        z, traj, info = solver(func, z0, max_iter=200, tol=1e-9, stop_mode="rel")
        assert traj == [] and (info["rel_lowest"] <= 1e-9).all()
    solver = get_solver("deqkern_anderson")
    with pytest.raises(TypeError):
        solver(func, z0, max_iter=50, tol=1e-6, mm=3)  # torchdeq's own solvers would ignore it
    with pytest.raises(deqkern.NonConvergenceError):
        solver(func, z0, max_iter=3, tol=1e-14)
    with pytest.raises(TypeError):
        deqkern.register_torchdeq_solvers(tol=1e-3)


def test_jac_reg_option_adds_the_hutchinson_penalty_gradient():
    """nn.DEQ(jac_reg=w): the gradient is that of loss + w * jacobian_reg(f, z*, x) with the same probe."""
    import deqkern.jacobian as jac

    torch.manual_seed(40)
    cell = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.float64), torch.nn.Tanh())

    def f(z, x):
        return 0.5 * cell(z) + x

    deq_plain = deqkern.nn.DEQ(f, solver_options=dict(tol=1e-10, max_iter=200))
    deq_reg = deqkern.nn.DEQ(f, solver_options=dict(tol=1e-10, max_iter=200), jac_reg=0.3)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.manual_seed(1)
    z = deq_reg(x)
    z.sum().backward()
    got = [p.grad.clone() for p in cell.parameters()]
    penalty = deq_reg.last_jac_loss
    cell.zero_grad()
    z_plain = deq_plain(x)
    torch.manual_seed(1)  # the same Rademacher probe as the layer drew
    expected = jac.jacobian_reg(f, z_plain.detach(), x)
    (z_plain.sum() + 0.3 * expected).backward()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-12)
    for a, b in zip(got, (p.grad for p in cell.parameters())):
        torch.testing.assert_close(a, b)
    deq_reg.eval()
    deq_reg(x)
    assert deq_reg.last_jac_loss is None
    with pytest.raises(ValueError, match="jac_reg must be"):
        deqkern.nn.DEQ(f, jac_reg=(1.0, 2.0))


def test_torchdeq_adapter_warns_when_its_backward_solver_is_unused():
    torchdeq = pytest.importorskip("torchdeq")
    deqkern.register_torchdeq_solvers()
    with pytest.warns(deqkern.torchdeq_compat.UnusedBackwardSolverWarning, match="ift=True"):
        torchdeq.get_deq(f_solver="deqkern_anderson", b_solver="deqkern_anderson")  # torchdeq's ift defaults False
    with warnings.catch_warnings():
        warnings.simplefilter("error", deqkern.torchdeq_compat.UnusedBackwardSolverWarning)
        torchdeq.get_deq(f_solver="deqkern_anderson", b_solver="deqkern_anderson", ift=True)

"""deqkern.jacobian: Hutchinson Jacobian regularisation, its closed form for the dense layer, spectral norm/radius."""
import functools
import math
import warnings

import pytest
import torch
from torch import nn

import deqkern
from deqkern import jacobian as jac
from deqkern.activations import ACTIVATIONS

F64 = torch.float64


def explicit_blocks(f, z, x):
    """(B, n, n) per-sample Jacobians of f at z, one sample at a time with torch.autograd.functional.jacobian."""
    blocks = []
    for b in range(z.shape[0]):
        J = torch.autograd.functional.jacobian(lambda zb: f(zb[None], x[b:b + 1])[0], z[b])
        blocks.append(J.reshape(z[b].numel(), z[b].numel()))
    return torch.stack(blocks)


def dense_f(W, activation):
    act = ACTIVATIONS[activation].fn
    return lambda z, c: act(z @ W.T + c)


def dense_problem(B=5, d=6, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
    c = torch.randn(B, d, generator=g, dtype=F64) * scale
    z = torch.randn(B, d, generator=g, dtype=F64)
    return W, c, z


class MLPCell(nn.Module):
    """A generic (non-dense-layer) f(z, x): a two-layer cell on z (B, 3, 4) with an input injection."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(12, 20, dtype=F64)
        self.lin2 = nn.Linear(20, 12, dtype=F64)
        self.inj = nn.Linear(5, 20, dtype=F64)

    def forward(self, z, x):
        h = torch.nn.functional.softplus(self.lin1(z.flatten(1)) + self.inj(x))
        return torch.tanh(self.lin2(h)).reshape(z.shape) + 0.3 * z.sin()


# ---------------------------------------------------------------- closed form
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_dense_frobenius_matches_explicit_jacobian(activation):
    W, c, z = dense_problem(B=4, d=7, seed=1, scale=3.0)
    if activation == "relu6":
        c = c * 3  # put some pre-activations above 6 too
    J = explicit_blocks(dense_f(W, activation), z, c)
    exact = J.pow(2).sum() / z.numel()
    got = jac.dense_jacobian_frobenius_sq(W, z, c, activation)
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-14)


def test_dense_frobenius_with_layer_and_without_injection():
    torch.manual_seed(0)
    layer = deqkern.nn.DEQLinear(3, 6, activation="sigmoid", dtype=F64)
    x = torch.randn(4, 3, dtype=F64)
    z = torch.randn(4, 6, dtype=F64)
    expected = jac.dense_jacobian_frobenius_sq(layer.weight, z, layer.injection(x), "sigmoid")
    torch.testing.assert_close(jac.dense_jacobian_frobenius_sq(layer, z, x), expected)
    W = layer.weight.detach()
    J = explicit_blocks(lambda zz, _: torch.tanh(zz @ W.T), z, x)
    torch.testing.assert_close(jac.dense_jacobian_frobenius_sq(W, z, None, "tanh"), J.pow(2).sum() / z.numel())


def test_dense_frobenius_is_differentiable():
    W, c, z = dense_problem(B=3, d=4, seed=2)
    args = tuple(t.clone().requires_grad_() for t in (W, c, z))
    assert torch.autograd.gradcheck(lambda W, c, z: jac.dense_jacobian_frobenius_sq(W, z, c, "tanh"), args)


# ---------------------------------------------------------------- Hutchinson estimator
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_jacobian_reg_is_unbiased(probe):
    W, c, z = dense_problem(B=3, d=5, seed=3)
    f = dense_f(W, "tanh")
    J = explicit_blocks(f, z, c)
    exact = J.pow(2).sum() / z.numel()
    torch.testing.assert_close(jac.dense_jacobian_frobenius_sq(W, z, c, "tanh"), exact)
    # One probe estimates tr(A), A = J J^T block diagonal; variance 2||A||_F^2 (Gaussian),
    # 2(||A||_F^2 - sum A_ii^2) (Rademacher).
    A = J @ J.transpose(1, 2)
    var = 2 * A.pow(2).sum()
    if probe == "rademacher":
        var = var - 2 * torch.diagonal(A, dim1=1, dim2=2).pow(2).sum()
    n = 4000
    stderr = var.sqrt() / math.sqrt(n) / z.numel()
    est = deqkern.jacobian_reg(f, z, c, n_samples=n, generator=torch.Generator().manual_seed(0), probe=probe)
    print(f"{probe}: estimate {est.item():.6f}, exact {exact.item():.6f}, stderr {stderr.item():.2e}")
    assert stderr > 0
    assert abs(est - exact) < 4 * stderr
    # The default is Rademacher, and a single probe is reproducible with a fixed generator.
    one = [deqkern.jacobian_reg(f, z, c, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert one[0] == one[1]


def test_jacobian_reg_matches_torchdeq_normalisation():
    torchdeq_loss = pytest.importorskip("torchdeq.loss")
    W, c, z = dense_problem(B=2, d=4, seed=4)
    W = W * 0 + torch.eye(4, dtype=F64) * 0.5  # J = 0.5 I: every Gaussian probe gives a random value, but
    z = z.clone().requires_grad_()                # the Rademacher probe gives 0.25 ||v||^2 / numel exactly
    f = dense_f(W, "identity")
    ours = deqkern.jacobian_reg(f, z, c, n_samples=3)
    torch.manual_seed(0)
    theirs = torchdeq_loss.jac_reg(f(z, c), z, vecs=20000)
    assert ours.item() == pytest.approx(0.25, rel=1e-12)
    assert theirs.item() == pytest.approx(0.25, rel=0.02)


def test_jacobian_reg_gradcheck():
    W, c, z = dense_problem(B=2, d=3, seed=5)

    def penalty(W, c, z):
        gen = torch.Generator().manual_seed(11)  # the same probes on every call
        return deqkern.jacobian_reg(lambda zz, cc: torch.tanh(zz @ W.T + cc), z, c, n_samples=3, generator=gen)

    args = tuple(t.clone().requires_grad_() for t in (W, c, z))
    assert torch.autograd.gradcheck(penalty, args)
    for probe in ("rademacher", "gaussian"):
        out = deqkern.jacobian_reg(dense_f(args[0], "softsign"), args[2], args[1], n_samples=2, probe=probe)
        assert out.requires_grad and out.dim() == 0


def test_jacobian_reg_through_a_deq_layer_trains_weight():
    torch.manual_seed(6)
    layer = deqkern.nn.DEQLinear(3, 8, activation="tanh", tol=1e-10, max_iter=300, dtype=F64)
    x = torch.randn(4, 3, dtype=F64)
    z = layer(x)
    f = lambda zz, xx: torch.tanh(zz @ layer.weight.T + layer.injection(xx))  # noqa: E731
    for zz in (z, z.detach()):  # through the implicit backward, and with the fixed point held constant
        layer.zero_grad()
        deqkern.jacobian_reg(f, zz, x, n_samples=2).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    # Its expectation is the closed form (n_samples large, Rademacher).
    est = deqkern.jacobian_reg(f, z.detach(), x, n_samples=2000, generator=torch.Generator().manual_seed(1))
    exact = jac.dense_jacobian_frobenius_sq(layer, z.detach(), x)
    assert est.item() == pytest.approx(exact.item(), rel=0.05)


def test_jacobian_reg_of_f_independent_of_z_is_zero():
    z = torch.randn(2, 3, dtype=F64)
    assert deqkern.jacobian_reg(lambda zz, xx: xx, z, torch.ones(2, 3, dtype=F64)).item() == 0
    p = torch.ones(3, dtype=F64, requires_grad=True)
    assert deqkern.jacobian_reg(lambda zz, xx: xx * p, z, torch.ones(2, 3, dtype=F64)).item() == 0


# ---------------------------------------------------------------- spectral norm and radius
@pytest.mark.parametrize("use_op", [True, False])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_dense_spectral_matches_matrix_norm(activation, use_op, monkeypatch):
    if not use_op:
        monkeypatch.setattr(jac.norms, "dense_spectral_norm", functools.partial(jac.norms.dense_spectral_norm,
                                                                                 use_op=False))
    torch.manual_seed(8)
    layer = deqkern.nn.DEQLinear(5, 12, activation=activation, tol=1e-10, max_iter=300, dtype=F64)
    x = torch.randn(6, 5, dtype=F64)
    with torch.no_grad():
        z = layer(x)
        J = ACTIVATIONS[activation].derivative(z @ layer.weight.T + layer.injection(x))[:, :, None] * layer.weight
    expected = torch.linalg.matrix_norm(J, 2)
    got = jac.jacobian_norm(layer, z, x, kind="spectral", max_iter=2000, tol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    radius = jac.jacobian_norm(layer, z, x, kind="radius")
    torch.testing.assert_close(radius, torch.linalg.eigvals(J).abs().amax(-1), rtol=1e-10, atol=1e-12)
    assert (radius <= got * (1 + 1e-6)).all()
    # The same through (W, c, activation).
    c = layer.injection(x).detach()
    torch.testing.assert_close(jac.jacobian_norm(layer.weight.detach(), z, c, kind="radius", activation=activation),
                               radius)


def test_generic_module_spectral_and_radius():
    torch.manual_seed(9)
    cell = MLPCell()
    z = torch.randn(4, 3, 4, dtype=F64)
    x = torch.randn(4, 5, dtype=F64)
    J = explicit_blocks(cell, z, x)
    got = jac.jacobian_norm(cell, z, x, kind="spectral", max_iter=3000, tol=1e-13)
    torch.testing.assert_close(got, torch.linalg.matrix_norm(J, 2), rtol=1e-6, atol=1e-12)
    radius = jac.jacobian_norm(cell, z, x, kind="radius")
    torch.testing.assert_close(radius, torch.linalg.eigvals(J).abs().amax(-1), rtol=1e-10, atol=1e-12)
    assert got.shape == radius.shape == (4,)
    # A generic f that is a dense layer agrees with the dense fast path.
    W, c, zd = dense_problem(B=3, d=6, seed=10)
    f = dense_f(W, "softsign")
    for kind in ("spectral", "radius"):
        opts = dict(kind=kind, max_iter=3000, tol=1e-13)
        torch.testing.assert_close(jac.jacobian_norm(f, zd, c, **opts),
                                   jac.jacobian_norm(W, zd, c, activation="softsign", **opts), rtol=1e-6, atol=1e-12)


class _TanhNoBatching(torch.autograd.Function):
    """tanh whose backward reads a value on the host: vmap (is_grads_batched) cannot batch it."""

    @staticmethod
    def forward(u):
        return torch.tanh(u)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        assert math.isfinite(g.sum().item())
        return g * (1 - y * y)


def test_generic_radius_falls_back_when_vmap_cannot_batch():
    W, c, z = dense_problem(B=3, d=5, seed=18)
    f = lambda zz, cc: _TanhNoBatching.apply(zz @ W.T + cc)  # noqa: E731
    for kind in ("radius", "spectral"):
        torch.testing.assert_close(jac.jacobian_norm(f, z, c, kind=kind, max_iter=3000, tol=1e-13),
                                   jac.jacobian_norm(W, z, c, kind=kind, max_iter=3000, tol=1e-13, activation="tanh"),
                                   rtol=1e-6, atol=1e-12)


def nilpotent_W(d=6, seed=11):
    g = torch.Generator().manual_seed(seed)
    return torch.triu(torch.randn(d, d, generator=g, dtype=F64), diagonal=1)


@pytest.mark.parametrize("activation", ["identity", "tanh"])
def test_nilpotent_jacobian_radius_is_zero(activation):
    W = nilpotent_W()
    _, c, z = dense_problem(B=3, d=6, seed=12)
    radius = jac.jacobian_norm(W, z, c, kind="radius", activation=activation)
    assert torch.equal(radius, torch.zeros(3, dtype=F64))
    generic = jac.jacobian_norm(dense_f(W, activation), z, c, kind="radius")
    assert torch.equal(generic, torch.zeros(3, dtype=F64))
    spectral = jac.jacobian_norm(W, z, c, kind="spectral", activation=activation)
    assert torch.isfinite(spectral).all() and (spectral > 0).all()
    # J = 0 exactly (relu off everywhere): spectral norm 0, not NaN.
    zero = jac.jacobian_norm(W, z, torch.full_like(c, -1e3), kind="spectral", activation="relu")
    assert torch.equal(zero, torch.zeros(3, dtype=F64))
    zero = jac.jacobian_norm(dense_f(W, "relu"), z, torch.full_like(c, -1e3), kind="spectral")
    assert torch.equal(zero, torch.zeros(3, dtype=F64))


def rotation_W(r=0.8, theta=1.1):
    """Block diagonal: r * rotation(theta) and a smaller 2x2 block: eigenvalues r e^{+-i theta} dominate."""
    R = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=F64)
    W = torch.zeros(4, 4, dtype=F64)
    W[:2, :2] = r * R
    W[2:, 2:] = torch.tensor([[0.3, 0.1], [0.0, -0.2]], dtype=F64)
    return W


def test_complex_dominant_eigenvalues_radius():
    W = rotation_W()
    g = torch.Generator().manual_seed(13)
    Q = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))[0]
    W = Q @ W @ Q.T  # hide the structure
    z = torch.randn(2, 4, generator=g, dtype=F64)
    c = torch.zeros(2, 4, dtype=F64)
    for f in (W, dense_f(W, "identity")):
        kwargs = {"activation": "identity"} if isinstance(f, torch.Tensor) else {}
        radius = jac.jacobian_norm(f, z, c, kind="radius", **kwargs)
        torch.testing.assert_close(radius, torch.full((2,), 0.8, dtype=F64), rtol=1e-12, atol=0)
        spectral = jac.jacobian_norm(f, z, c, kind="spectral", max_iter=1000, tol=1e-13, **kwargs)
        torch.testing.assert_close(spectral, torch.full((2,), 0.8, dtype=F64), rtol=1e-8, atol=0)


def test_torchdeq_power_method_fails_where_ours_does_not():
    torchdeq_loss = pytest.importorskip("torchdeq.loss")
    _, c, z = dense_problem(B=3, d=6, seed=14)
    # Nilpotent J: J^T v reaches 0 after d steps, then torchdeq divides 0 by 0.
    W = nilpotent_W()
    zz = z.clone().requires_grad_()
    torch.manual_seed(0)
    _, theirs = torchdeq_loss.power_method(dense_f(W, "identity")(zz, c), zz, n_iters=20)
    assert torch.isnan(theirs).all()
    ours = jac.jacobian_norm(dense_f(W, "identity"), z, c, kind="radius")
    assert torch.isfinite(ours).all() and torch.equal(ours, torch.zeros(3, dtype=F64))
    # Complex dominant eigenvalues: torchdeq's Rayleigh quotient of a rotation is r cos(theta), not r.
    W = torch.zeros(6, 6, dtype=F64)
    W[:4, :4] = rotation_W(0.8, 1.1)
    zz = z.clone().requires_grad_()
    _, theirs = torchdeq_loss.power_method(dense_f(W, "identity")(zz, c), zz, n_iters=100)
    ours = jac.jacobian_norm(dense_f(W, "identity"), z, c, kind="radius")
    torch.testing.assert_close(ours, torch.full((3,), 0.8, dtype=F64), rtol=1e-12, atol=0)
    assert (abs(theirs - 0.8) > 0.1).all()


def test_power_iteration_nonconvergence_warns():
    W, c, z = dense_problem(B=2, d=8, seed=15)
    with pytest.warns(deqkern.NonConvergenceWarning, match="max_iter"):
        jac.jacobian_norm(dense_f(W, "tanh"), z, c, kind="spectral", max_iter=2, tol=1e-14)
    with pytest.warns(deqkern.NonConvergenceWarning, match="max_iter"):  # the dense path (fused op or fallback)
        jac.jacobian_norm(W, z, c, kind="spectral", max_iter=2, tol=1e-14, activation="tanh")


def test_float32_and_no_warning_when_converged():
    torch.manual_seed(16)
    layer = deqkern.nn.DEQLinear(4, 10)
    x = torch.randn(3, 4)
    with torch.no_grad():
        z = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = jac.jacobian_norm(layer, z, x, kind="spectral", tol=1e-5)
        r = jac.jacobian_norm(layer, z, x, kind="radius")
    assert s.dtype == r.dtype == torch.float32 and (r <= s + 1e-5).all() and (s <= 0.5 + 1e-5).all()


# ---------------------------------------------------------------- bad input
def test_bad_inputs():
    W, c, z = dense_problem(B=2, d=4, seed=17)
    f = dense_f(W, "tanh")
    with pytest.raises(ValueError, match="n_samples"):
        deqkern.jacobian_reg(f, z, c, n_samples=0)
    with pytest.raises(ValueError, match="probe"):
        deqkern.jacobian_reg(f, z, c, probe="sphere")
    with pytest.raises(TypeError, match="callable"):
        deqkern.jacobian_reg(W, z, c)
    with pytest.raises(ValueError, match="shape of z"):
        deqkern.jacobian_reg(lambda zz, cc: zz[:, :2], z, c)
    with pytest.raises(ValueError, match="non-empty"):
        deqkern.jacobian_reg(f, torch.zeros(0, 4, dtype=F64), c)
    with pytest.raises(ValueError, match="kind"):
        jac.jacobian_norm(f, z, c, kind="frobenius")
    with pytest.raises(ValueError, match="max_iter"):
        jac.jacobian_norm(f, z, c, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        jac.jacobian_norm(f, z, c, tol=0.0)
    with pytest.raises(ValueError, match="shape of z"):
        jac.jacobian_norm(lambda zz, cc: zz.sum(1), z, c)
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        jac.jacobian_norm(W, z[:, :3], c, activation="tanh")
    with pytest.raises(ValueError, match="shape of z"):
        jac.dense_jacobian_frobenius_sq(W, z, c[:1], "tanh")
    with pytest.raises(ValueError, match="square"):
        jac.dense_jacobian_frobenius_sq(W[:3], z, c, "tanh")
    with pytest.raises(ValueError, match="activation"):
        jac.dense_jacobian_frobenius_sq(W, z, c)
    with pytest.raises(ValueError, match="unknown activation"):
        jac.jacobian_norm(W, z, c, activation="gelu")
    with pytest.raises(TypeError, match="dtype"):
        jac.jacobian_norm(W.float(), z, c, activation="tanh")
    with pytest.raises(TypeError, match="float32 or float64"):
        jac.jacobian_norm(f, z.half(), c)
    for bad in (float("nan"), float("inf")):
        zb = z.clone()
        zb[1, 2] = bad
        with pytest.raises(ValueError, match="z contain NaN or Inf"):
            jac.jacobian_norm(f, zb, c)
        cb = c.clone()
        cb[0, 0] = bad
        with pytest.raises(ValueError, match="x contain NaN or Inf"):
            jac.jacobian_norm(f, z, cb, kind="radius")
    # A generic f too large for the explicit Jacobian, and one that mixes the samples of the batch.
    big = torch.randn(2, jac.MAX_EXPLICIT_JACOBIAN + 1, dtype=F64)
    with pytest.raises(NotImplementedError, match="kind='spectral'"):
        jac.jacobian_norm(lambda zz, xx: torch.tanh(zz), big, None, kind="radius")
    bn = nn.BatchNorm1d(4, dtype=F64).train()
    with pytest.raises(ValueError, match="mixes the samples"):
        jac.jacobian_norm(lambda zz, xx: bn(zz), z, c)
    layer = deqkern.nn.DEQLinear(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="input x"):
        jac.jacobian_norm(layer, z, None)
    with pytest.raises(ValueError, match="contradicts"):
        jac.dense_jacobian_frobenius_sq(layer, z, torch.zeros(2, 3, dtype=F64), activation="relu")


# ================================================================ every layer's own map
def _every_dense_layer():
    torch.manual_seed(21)
    return [
        deqkern.nn.DEQLinear(3, 5, activation="tanh", tol=1e-12, max_iter=500, dtype=F64),
        deqkern.nn.PositiveConcaveDEQ(3, 5, activation="sigmoid", tol=1e-12, max_iter=500, init_row_sum=2.0,
                                      dtype=F64),
        deqkern.nn.LinfContractiveDEQ(3, 5, mu=0.3, activation="tanh", tol=1e-12, max_iter=500, dtype=F64),
        deqkern.nn.LipschitzDEQ(3, 5, gamma=0.9, activation="tanh", tol=1e-12, max_iter=500, init_scale=3.0,
                                dtype=F64).eval(),
    ]


@pytest.mark.parametrize("index", range(4), ids=["DEQLinear", "PositiveConcaveDEQ", "LinfContractiveDEQ",
                                                 "LipschitzDEQ"])
def test_tools_use_each_layers_own_map(index):
    """layer.f is the map the forward solves (f(z*, x) = z*), and every Jacobian tool agrees with the Jacobian of
    layer.f built explicitly (a pcDEQ's injection is softplus(x U^T + b) + eps: the tools once used x U^T + b)."""
    layer = _every_dense_layer()[index]
    x = torch.randn(4, 3, dtype=F64)
    with torch.no_grad():
        z = layer(x)
        assert torch.allclose(layer.f(z, x), z, rtol=0, atol=1e-10)
    J = explicit_blocks(lambda zz, xx: layer.f(zz, xx), z, x)
    fro = jac.dense_jacobian_frobenius_sq(layer, z, x)
    assert fro.item() == pytest.approx(J.pow(2).sum().item() / z.numel(), rel=1e-10)
    radius = jac.jacobian_norm(layer, z, x, kind="radius")
    torch.testing.assert_close(radius, torch.linalg.eigvals(J).abs().amax(dim=-1), rtol=1e-9, atol=1e-12)
    spectral = jac.jacobian_norm(layer, z, x, kind="spectral", tol=1e-12, max_iter=5000)
    torch.testing.assert_close(spectral, torch.linalg.matrix_norm(J, ord=2), rtol=1e-5, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    reg = jac.jacobian_reg(layer, z, x, n_samples=4000, generator=g)  # the layer itself: its map is used
    assert reg.item() == pytest.approx(fro.item(), rel=0.1)


def test_tools_take_an_nn_deq_by_its_map():
    torch.manual_seed(22)
    cell = MLPCell()
    deq = deqkern.nn.DEQ(cell, solver_options=dict(tol=1e-10, max_iter=300), z_shape=(3, 4)).double()
    x = torch.randn(2, 5, dtype=F64)
    z = deq(x)
    expected = jac.jacobian_norm(cell, z.detach(), x, kind="spectral")
    torch.testing.assert_close(jac.jacobian_norm(deq, z.detach(), x, kind="spectral"), expected)


def test_look_alike_modules_are_not_read_as_dense_layers():
    class LookAlike(nn.Module):  # weight, injection and activation, but not a deqkern layer: no guessing
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.eye(3, dtype=F64))
            self.injection = nn.Linear(3, 3, dtype=F64)
            self.activation = "tanh"

    with pytest.raises(TypeError, match="deqkern dense layer or a"):
        jac.dense_jacobian_frobenius_sq(LookAlike(), torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64))
    with pytest.raises(TypeError, match="expected a layer"):
        jac.jacobian_reg(42, torch.zeros(2, 3))


# ================================================================ jac_reg= on the dense layers
@pytest.mark.parametrize("index", range(4), ids=["DEQLinear", "PositiveConcaveDEQ", "LinfContractiveDEQ",
                                                 "LipschitzDEQ"])
def test_jac_reg_option_adds_the_exact_penalty_gradient(index):
    """jac_reg=w: the parameters' gradient is that of loss + w ||J_f(z*)||_F^2 / numel (z* held constant), the
    loss value is unchanged and the penalty is reported after the backward; eval mode adds nothing."""
    weight = 0.7
    plain = _every_dense_layer()[index].train()
    regularised = _every_dense_layer()[index].train()
    regularised.set_jac_reg(weight)
    if isinstance(plain, deqkern.nn.LipschitzDEQ):  # its training forward takes a few power steps; the penalty
        plain.n_power_iterations = regularised.n_power_iterations = 2000  # below is built on the converged W
    x = torch.randn(4, 3, dtype=F64)
    probe = torch.linspace(-1, 1, 4 * 5, dtype=F64).reshape(4, 5)

    z_plain = plain(x)
    expected_penalty = jac.dense_jacobian_frobenius_sq(plain, z_plain.detach(), x)
    ((z_plain * probe).sum() + weight * expected_penalty).backward()
    z = regularised(x)
    (z * probe).sum().backward()
    torch.testing.assert_close(z, z_plain)
    assert regularised.last_jac_loss.item() == pytest.approx(expected_penalty.item(), rel=1e-12)
    for (name, p), (_, q) in zip(regularised.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10)
    regularised.eval()
    regularised(x)
    assert regularised.last_jac_loss is None


def test_jac_reg_probability_and_bad_values():
    torch.manual_seed(23)
    layer = deqkern.nn.DEQLinear(3, 5, jac_reg=(0.1, 0.5), dtype=F64)
    drawn = 0
    for _ in range(200):
        layer(torch.randn(2, 3, dtype=F64)).sum().backward()
        drawn += layer.last_jac_loss is not None
    assert 60 < drawn < 140
    with torch.no_grad():
        layer(torch.randn(2, 3, dtype=F64))
    assert layer.last_jac_loss is None
    for bad in (-1.0, float("nan"), (0.1, 0.0), (0.1, 1.5), "big", True):
        with pytest.raises(ValueError, match="jac_reg must be"):
            deqkern.nn.DEQLinear(3, 5, jac_reg=bad)


def test_jac_reg_lowers_the_jacobian_and_the_iterations_when_training():
    """The paper's direction on digits: the same short training with the penalty ends with a smaller Jacobian
    and fewer forward iterations."""
    from deqkern.apps.digits import load_digits_split

    (x_all, y_all), _ = load_digits_split("cpu", torch.float32)
    result = {}
    for weight in (None, 2.0):
        torch.manual_seed(24)
        layer = deqkern.nn.DEQLinear(64, 64, tol=1e-4, max_iter=200, jac_reg=weight, init_scale=0.95)
        head = torch.nn.Linear(64, 10)
        opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=3e-3)
        for step in range(60):
            i = (step * 128) % 1024
            x, y = x_all[i:i + 128], y_all[i:i + 128]
            loss = torch.nn.functional.cross_entropy(head(layer(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        layer.eval()
        with torch.no_grad():
            z = layer(x_all[:256])
        result[weight] = (jac.dense_jacobian_frobenius_sq(layer, z, x_all[:256]).item(),
                          layer.last_info.iterations.double().mean().item())
    assert result[2.0][0] < 0.8 * result[None][0]
    assert result[2.0][1] < result[None][1]

"""deqkern.nn.certified: the certified implicit layers, tested against the theory they certify."""
import math

import pytest
import torch

import deqkern
import kit
from deqkern import lipschitz
from deqkern.nn.certified import (
    LinfContractiveDEQ,
    LipschitzDEQ,
    PositiveConcaveDEQ,
    picard_iteration_bound,
    positive_concave_fixed_point,
)

F64 = torch.float64
ACT = {name: a.fn for name, a in deqkern.ACTIVATIONS.items()}


def _iterates(step, z0, k):
    """[z_0, z_1, ..., z_k] of z <- step(z)."""
    zs = [z0]
    for _ in range(k):
        zs.append(step(zs[-1]))
    return zs


# ================================================================ positive concave DEQ
def _large_pc_problem(activation, d=16, batch=5, scale=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = scale * torch.rand(d, d, generator=g, dtype=F64) / d
    c = torch.nn.functional.softplus(torch.randn(batch, d, generator=g, dtype=F64)) + 1e-3
    return W, c


@pytest.mark.parametrize("activation", ["tanh", "softsign", "relu6", "sigmoid"])
def test_pc_unique_fixed_point_from_any_nonnegative_start_without_a_norm_bound(activation):
    W, c = _large_pc_problem(activation)
    assert torch.linalg.matrix_norm(W, ord=2) > 10  # far from a contraction in any usual norm
    z_ref, info = positive_concave_fixed_point(W, c, activation, tol=1e-13, max_iter=5000, on_nonconvergence="raise")
    torch.testing.assert_close(z_ref, ACT[activation](z_ref @ W.T + c), rtol=1e-11, atol=1e-11)
    assert (z_ref > 0).all()
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 0.1, 1.0, 10.0, 1e3):
        for _ in range(4):
            z0 = scale * torch.rand(c.shape, generator=g, dtype=F64)
            z, _ = positive_concave_fixed_point(W, c, activation, tol=1e-13, max_iter=5000, z0=z0,
                                                on_nonconvergence="raise")
            torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)


def test_pc_uniqueness_is_in_the_orthant_for_odd_activations():
    """tanh with a large W has another (negative) fixed point: the nonnegative start is what the theory needs."""
    W, c = _large_pc_problem("tanh")
    z_pos, _ = positive_concave_fixed_point(W, c, "tanh", tol=1e-12, max_iter=1000)
    z_neg, _ = deqkern.fixed_point_dense(W, c, activation="tanh", tol=1e-12, max_iter=1000, z0=-torch.ones_like(c))
    assert (z_neg < 0).any() and not torch.allclose(z_neg, z_pos)
    with pytest.raises(ValueError, match="z0 must be >= 0"):
        positive_concave_fixed_point(W, c, "tanh", z0=-torch.ones_like(c))
    # sigmoid and relu6 are >= 0 everywhere: any start, even a negative one, reaches the same fixed point
    for activation in ("sigmoid", "relu6"):
        z0, _ = positive_concave_fixed_point(W, c, activation, tol=1e-13, max_iter=5000)
        z1, _ = positive_concave_fixed_point(W, c, activation, tol=1e-13, max_iter=5000, z0=-5 * torch.ones_like(c))
        torch.testing.assert_close(z1, z0, rtol=1e-10, atol=1e-10)


def _pc_variant(variant):
    """(activation, keywords) of a pcDEQ variant: "<activation>" is pcDEQ-1 (softplus injection), "sigmoid+relu"
    pcDEQ-2 (a ReLU injection with no floor, so that some entries are exactly 0)."""
    if variant == "sigmoid+relu":
        return "sigmoid", dict(injection="relu", injection_eps=0.0)
    return variant, {}


@pytest.mark.parametrize("scale", [1.0, 8.0, 50.0])
@pytest.mark.parametrize("variant", ["tanh", "softsign", "relu6", "sigmoid", "sigmoid+relu"])
def test_pc_monotone_geometric_convergence_from_zero_within_the_certified_rate(variant, scale):
    torch.manual_seed(2)
    activation, keywords = _pc_variant(variant)
    layer = PositiveConcaveDEQ(6, 12, activation=activation, tol=1e-10, max_iter=2000, dtype=F64, **keywords)
    with torch.no_grad():
        layer.weight_raw.add_(math.log(scale))  # W about `scale` times larger than at init
    if scale > 1:
        assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2) > 2
    x = torch.randn(8, 6, dtype=F64)
    with torch.no_grad():
        layer(x)
        W, c = layer.weight, layer.injection_values(x)
        cert = layer.certificate(x)
    if keywords:
        assert (c == 0).any() and (c >= 0).all()  # pcDEQ-2: an injection that is 0 in places
    act = ACT[activation]
    z_star = _iterates(lambda z: act(z @ W.T + c), torch.zeros_like(c), 3000)[-1]  # to rounding level
    assert cert.weight_nonnegative and cert.min_weight >= 0 and 0 < cert.rate_bound < 1
    assert (cert.sample_rate_bound < 1).all() and (cert.sample_rate_bound <= cert.rate_bound + 1e-12).all()
    # the sharpest rate the theorem allows is 1 - min_i act(c_i) / z*_i: the proven one is that, up to rounding
    q_at_fixed_point = 1 - (act(c) / z_star).min(dim=1).values
    assert (cert.sample_rate_bound >= q_at_fixed_point - 1e-12).all()
    assert (cert.sample_rate_bound <= q_at_fixed_point + 1e-9).all()
    assert (cert.measured_rate <= cert.sample_rate_bound + 1e-9).all()
    assert (layer.last_info.iterations <= cert.forward_iterations_bound).all()
    assert torch.equal(cert.forward_iterations, layer.last_info.iterations)
    zs = _iterates(lambda z: act(z @ W.T + c), torch.zeros_like(c), 200)
    q_rigorous, q_sharp = cert.sample_rate_bound[:, None], q_at_fixed_point[:, None]
    for k in range(1, len(zs)):
        assert (zs[k] >= zs[k - 1] - 1e-15).all(), "iterates from 0 must increase monotonically"
        assert (zs[k] <= z_star + 1e-12).all()
        # the certified componentwise error bound 0 <= z* - z_k <= q^k z*
        assert (z_star - zs[k] <= q_rigorous ** k * z_star + 1e-12).all()
        assert (z_star - zs[k] <= q_sharp ** k * z_star + 1e-9).all()
    # the observed rate is geometric: the step ratios over the tail (steps between 1e-3 and 1e-11 of the largest;
    # early ratios may exceed 1 when W is large) stay below the certified rate < 1. With a large W the activation
    # saturates and the convergence is faster than geometric: then there is little or no tail.
    steps = torch.stack([(zs[k + 1] - zs[k]).norm(dim=1) for k in range(len(zs) - 1)])  # (K, batch)
    for b in range(c.shape[0]):
        top = steps[:, b].max()
        tail = [k for k in range(1, steps.shape[0]) if 1e-11 * top < steps[k - 1, b] < 1e-3 * top]
        assert len(tail) >= (3 if scale == 1.0 else 0)
        for k in tail:
            assert steps[k, b] / steps[k - 1, b] <= cert.sample_rate_bound[b] + 1e-3


@pytest.mark.parametrize("activation", ["tanh", "relu6", "sigmoid"])
def test_pc_backward_converges_for_a_large_weight(activation):
    torch.manual_seed(3)
    layer = PositiveConcaveDEQ(5, 10, activation=activation, tol=1e-10, max_iter=2000, dtype=F64)
    with torch.no_grad():
        layer.weight_raw.add_(math.log(50.0))
    x = torch.randn(7, 5, dtype=F64)
    (layer(x) * torch.randn(7, 10, dtype=F64)).sum().backward()
    assert layer.last_info.converged.all() and layer.last_info.backward.converged.all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_pc2_relu_injection_needs_sigmoid():
    for activation in ("tanh", "softsign", "relu6"):
        with pytest.raises(ValueError, match="injection='relu' \\(pcDEQ-2\\) needs activation='sigmoid'"):
            PositiveConcaveDEQ(3, 4, activation=activation, injection="relu")
    with pytest.raises(ValueError, match="injection"):
        PositiveConcaveDEQ(3, 4, activation="sigmoid", injection="exp")
    layer = PositiveConcaveDEQ(3, 4, activation="sigmoid", injection="relu", injection_eps=0.0)
    assert "injection='relu'" in repr(layer) and layer.certificate().rate_bound == pytest.approx(0.5)


def test_pc_functional_rejects_bad_weights_injections_and_activations():
    W, c = _large_pc_problem("tanh", d=4, batch=2, scale=1.0)
    W_neg = W.clone()
    W_neg[1, 2] = -1e-3
    with pytest.raises(ValueError, match="W must be elementwise nonnegative"):
        positive_concave_fixed_point(W_neg, c)
    W_nan = W.clone()
    W_nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="W must be elementwise nonnegative"):
        positive_concave_fixed_point(W_nan, c)
    for activation in ("tanh", "softsign", "relu6"):
        with pytest.raises(ValueError, match="injection c must be > 0"):
            positive_concave_fixed_point(W, torch.zeros_like(c), activation)
    with pytest.raises(ValueError, match="injection c must be >= 0"):
        positive_concave_fixed_point(W, c - 10, "sigmoid")
    z, info = positive_concave_fixed_point(W, torch.zeros_like(c), "sigmoid", tol=1e-10)  # c = 0 is fine for sigmoid
    assert info.converged.all() and (z > 0).all()
    for activation in ("relu", "identity"):
        with pytest.raises(ValueError, match="not positive and concave"):
            positive_concave_fixed_point(W, c, activation)
        with pytest.raises(ValueError, match="not positive and concave"):
            PositiveConcaveDEQ(3, 4, activation=activation)
    with pytest.raises(ValueError, match="injection_eps"):
        PositiveConcaveDEQ(3, 4, injection_eps=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_pc_parameterisation_never_produces_nan(dtype):
    torch.manual_seed(4)
    layer = PositiveConcaveDEQ(4, 6, tol=1e-6, max_iter=500, dtype=dtype)
    with torch.no_grad():
        layer.weight_raw[0].fill_(-1e4)  # whole rows "clipped" to 0: no row sum anywhere to divide by
        layer.weight_raw[1].fill_(-1e30)
        layer.weight_raw[2].fill_(-float("inf"))
        layer.weight_raw[3].fill_(1e4)   # and a huge row
        layer.injection.weight[4].fill_(-1e4)  # injection at its floor eps
        layer.injection.bias[4] = -1e4
    W = layer.weight
    assert torch.isfinite(W).all() and (W >= 0).all() and (W[:3] == 0).all()
    x = torch.randn(3, 4, dtype=dtype)
    z = layer(x)
    z.sum().backward()
    assert torch.isfinite(z).all() and (z > 0).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert layer.last_info.converged.all() and layer.last_info.backward.converged.all()
    assert layer.certificate(x).weight_nonnegative


@pytest.mark.parametrize("variant", ["tanh", "sigmoid", "sigmoid+relu"])
def test_pc_gradcheck(variant):
    torch.manual_seed(5)
    activation, keywords = _pc_variant(variant)
    keywords.pop("injection_eps", None)  # a floor keeps the ReLU injection off its kink for the finite differences
    layer = PositiveConcaveDEQ(3, 4, activation=activation, tol=1e-13, max_iter=2000, dtype=F64, **keywords)
    kit.gradcheck_layer(layer, torch.randn(2, 3, dtype=F64))


def test_pc_layer_trains_and_stays_nonnegative():
    torch.manual_seed(6)
    layer = PositiveConcaveDEQ(10, 16, tol=1e-6, max_iter=500)
    head = torch.nn.Linear(16, 3)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=0.05)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(head(layer(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert layer.certificate().weight_nonnegative
    assert losses[-1] < 0.8 * losses[0]
    assert "activation='tanh'" in repr(layer)


# ================================================================ l-infinity contractive DEQ
def _mu_inf_exact(A):
    d = A.diagonal()
    return (d + A.abs().sum(dim=1) - d.abs()).max().item()


@pytest.mark.parametrize("mu", [-0.5, 0.0, 0.5, 0.99])
def test_linf_parameterisation_bounds_mu_inf(mu):
    g = torch.Generator().manual_seed(7)
    for scale in (1e-3, 1.0, 30.0):
        for _ in range(5):
            T = scale * torch.randn(9, 9, generator=g, dtype=F64)
            T.diagonal().mul_(3).sub_(scale)  # strongly negative and mixed diagonals too
            A = LinfContractiveDEQ.weight_from(T, mu)
            assert _mu_inf_exact(A) <= mu + 1e-13 * (1 + 9 * scale)
            assert lipschitz.one_sided_linf(A) <= mu + 1e-13 * (1 + 9 * scale)
    # every A with mu_inf(A) <= mu is reached
    A = torch.randn(5, 5, generator=g, dtype=F64)
    A.diagonal().sub_(A.abs().sum(dim=1) + 0.3 - mu)
    assert _mu_inf_exact(A) <= mu
    T = A.clone()
    T.diagonal().copy_((A.diagonal() + A.abs().sum(dim=1) - A.diagonal().abs() - mu) / 2)
    torch.testing.assert_close(LinfContractiveDEQ.weight_from(T, mu), A)


def test_linf_bound_survives_optimizer_steps():
    torch.manual_seed(8)
    layer = LinfContractiveDEQ(6, 12, mu=0.7, activation="tanh", tol=1e-6, max_iter=1000)
    x, target = torch.randn(32, 6), 3 * torch.randn(32, 12)
    opt = torch.optim.Adam(layer.parameters(), lr=0.3)
    for _ in range(15):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        cert = layer.certificate()
        assert cert.mu_inf <= 0.7 + 1e-9 and 0 < cert.alpha <= 1 and cert.contraction_factor < 1
        assert layer.last_info.converged.all() and layer.last_info.backward.converged.all()
    assert layer.weight_raw.abs().max() > 0.1  # the steps really moved T


@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
def test_linf_measured_contraction_is_within_the_certified_factor(activation):
    torch.manual_seed(9)
    layer = LinfContractiveDEQ(4, 10, mu=0.6, activation=activation, tol=1e-12, max_iter=5000, dtype=F64)
    with torch.no_grad():
        layer.weight_raw.mul_(20)
        layer.weight_raw.diagonal().sub_(0.5)  # negative diagonal entries: alpha* < 1
    cert = layer.certificate()
    assert cert.alpha < 1 and cert.mu_inf <= 0.6 + 1e-12
    assert cert.contraction_factor == pytest.approx(1 - cert.alpha * (1 - max(cert.mu_inf, 0)))
    A, alpha, act = layer.weight.detach(), cert.alpha, ACT[activation]
    u = torch.randn(6, 4, dtype=F64)
    with torch.no_grad():
        c = layer.injection(u)
        x_star = layer(u)
    step = lambda x: (1 - alpha) * x + alpha * act(x @ A.T + c)  # noqa: E731
    n_steps = math.ceil(math.log(1e-9) / math.log(cert.contraction_factor)) + 20
    worst = 0.0
    for start in (torch.zeros_like(c), 10 * torch.randn_like(c), -10 * torch.rand_like(c)):
        xs = _iterates(step, start, n_steps)
        for k in range(1, len(xs) - 1):
            prev = (xs[k] - xs[k - 1]).abs().amax(dim=1)
            ratio = (xs[k + 1] - xs[k]).abs().amax(dim=1) / prev
            ratio = ratio[prev > 1e-9]  # ratios of rounding noise mean nothing
            if ratio.numel():
                worst = max(worst, ratio.max().item())
        torch.testing.assert_close(xs[-1], x_star, rtol=0, atol=1e-6 * (1 + x_star.abs().max().item()))
    assert worst <= cert.contraction_factor + 1e-9
    assert worst > 0.3 * cert.contraction_factor  # the check is not vacuous


def test_linf_input_output_lipschitz_bound():
    torch.manual_seed(10)
    layer = LinfContractiveDEQ(5, 8, mu=0.8, activation="tanh", tol=1e-12, max_iter=5000, dtype=F64)
    with torch.no_grad():
        layer.weight_raw.mul_(5)
    bound = layer.certificate().input_lipschitz_bound
    assert math.isfinite(bound)
    with torch.no_grad():
        u, du = torch.randn(256, 5, dtype=F64), torch.randn(256, 5, dtype=F64)
        for size in (1e-4, 1e-1, 1.0, 10.0):
            dx = layer(u + size * du) - layer(u)
            ratio = dx.abs().amax(dim=1) / (size * du.abs().amax(dim=1))
            assert ratio.max() <= bound * (1 + 1e-8)
    # adversarial pairs: gradient ascent on ||x*(u) - x*(u')||_inf / ||u - u'||_inf
    worst = 0.0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(4, 5, generator=g, dtype=F64).requires_grad_(True)
        v = (u.detach() + 0.5 * torch.randn(4, 5, generator=g, dtype=F64)).requires_grad_(True)
        opt = torch.optim.Adam([u, v], lr=0.05)
        for _ in range(40):
            ratio = (layer(u) - layer(v)).abs().amax(dim=1) / (u - v).abs().amax(dim=1)
            opt.zero_grad()
            (-ratio.sum()).backward()
            opt.step()
            worst = max(worst, ratio.max().item())
    assert worst <= bound * (1 + 1e-8)
    assert worst > 0.05 * bound  # the ascent found something


def test_linf_gradcheck_and_bad_parameters():
    torch.manual_seed(11)
    layer = LinfContractiveDEQ(3, 4, mu=0.5, activation="tanh", tol=1e-13, max_iter=5000, dtype=F64)
    with torch.no_grad():
        layer.weight_raw.mul_(3)
    kit.gradcheck_layer(layer, torch.randn(2, 3, dtype=F64))
    for mu in (1.0, 1.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="mu must be a finite number < 1"):
            LinfContractiveDEQ(3, 4, mu=mu)
    with pytest.raises(ValueError, match="unknown activation"):
        LinfContractiveDEQ(3, 4, activation="bogus")


# ================================================================ Lipschitz DEQ
def test_picard_iteration_bound_formula():
    for q in (0.0, 0.3, 0.9, 0.999):
        for tol in (1e-2, 1e-6, 1e-12):
            k = picard_iteration_bound(q, tol)
            assert q ** (k - 1) * (1 + q) / (1 - q ** k) <= tol
            assert k == 1 or q ** (k - 2) * (1 + q) / (1 - q ** (k - 1)) > tol  # the smallest such k
    assert picard_iteration_bound(1.0, 1e-3) is None


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "identity"])
def test_lipschitz_iteration_counts_within_the_certified_bound(activation):
    torch.manual_seed(12)
    layer = LipschitzDEQ(6, 24, gamma=0.95, activation=activation, tol=1e-10, max_iter=1000, dtype=F64)
    with torch.no_grad():  # a near-worst case: every singular value of V equal, far above the bound
        layer.weight_raw.copy_(10 * torch.linalg.qr(torch.randn(24, 24, dtype=F64))[0])
    layer.reset_power_iteration()
    layer.eval()
    cert = layer.certificate()
    assert cert.contraction_factor == pytest.approx(0.95, rel=1e-9) and cert.within_max_iter
    x = torch.randn(32, 6, dtype=F64, requires_grad=True)
    z = layer(x)
    (z * torch.randn_like(z)).sum().backward()
    fwd, bwd = layer.last_info.iterations, layer.last_info.backward.iterations
    assert layer.last_info.converged.all() and layer.last_info.backward.converged.all()
    assert fwd.max() <= cert.forward_iterations_bound and bwd.max() <= cert.backward_iterations_bound
    if activation == "identity":  # the linear case comes close to the bound
        assert fwd.max() >= 0.5 * cert.forward_iterations_bound


def test_lipschitz_input_output_bound():
    torch.manual_seed(13)
    layer = LipschitzDEQ(5, 12, gamma=0.9, tol=1e-12, max_iter=1000, dtype=F64).eval()
    bound = layer.certificate().input_lipschitz_bound
    with torch.no_grad():
        u, du = torch.randn(512, 5, dtype=F64), torch.randn(512, 5, dtype=F64)
        ratio = (layer(u + 1e-3 * du) - layer(u)).norm(dim=1) / (1e-3 * du.norm(dim=1))
    assert ratio.max() <= bound * (1 + 1e-8)


@pytest.mark.parametrize("activation,n_power", [("tanh", 1), ("sigmoid", 3)])
def test_lipschitz_spectral_norm_stays_bounded_at_every_training_step(activation, n_power):
    """The guarantee holds for the W of every training forward, checked by SVD, even with one power step per
    forward and a learning rate large enough to move the top singular vector (the estimate alone was up to 11%
    low under these conditions before the bound was proven)."""
    torch.manual_seed(14)
    layer = LipschitzDEQ(8, 20, gamma=0.9, activation=activation, tol=1e-6, max_iter=500,
                         n_power_iterations=n_power, dtype=F64)
    head = torch.nn.Linear(20, 1, dtype=F64)
    x = torch.randn(64, 8, dtype=F64)
    y = 5 * torch.randn(64, 1, dtype=F64)  # hard targets: the loss pushes the weight up against the bound
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=0.05)
    bound = 0.9 / deqkern.ACTIVATIONS[activation].lipschitz
    estimates_low, methods = 0, set()
    torch_u = torch.randn(20, dtype=F64)
    for _ in range(30):
        V = layer.weight_raw.detach().clone()
        loss = (head(layer(x)) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        true_norm = torch.linalg.svdvals(layer.last_weight)[0].item()
        proof = layer.last_weight_bound
        assert true_norm <= bound * (1 + 1e-12)  # the guarantee, by SVD, at this step
        assert true_norm <= proof.weight_norm_bound * (1 + 1e-12)
        assert proof.weight_norm_bound <= bound * (1 + 1e-12)
        raw_norm = torch.linalg.svdvals(V)[0].item()
        assert raw_norm <= proof.raw_norm_bound * (1 + 1e-12)
        if proof.method == "carried":  # an earlier proof carried: within the budget of the truth, or W = V anyway
            assert proof.raw_norm_bound <= max(bound, raw_norm * (1 + layer.proof_budget)) * (1 + 1e-12)
        else:  # and the proof is not much looser than the truth
            assert proof.raw_norm_bound <= raw_norm * 1.02
        # torch.nn.utils.spectral_norm's estimate: n_power warm-started steps per forward, no proof
        for _ in range(n_power):
            torch_u = V.T @ (V @ torch_u)
            torch_u = torch_u / torch_u.norm()
        estimates_low += torch.linalg.vector_norm(V @ torch_u).item() < raw_norm * (1 - 1e-6)
        methods.add(proof.method)
        assert layer.last_info.converged.all() and layer.last_info.backward.converged.all()
    assert estimates_low > 0  # torch's estimate lags here: scaling by it would break the bound
    assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() <= bound * (1 + 1e-12)
    assert torch.linalg.matrix_norm(layer.weight_raw.detach(), ord=2).item() > bound  # the rescaling is active
    cert = layer.certificate()
    assert cert.contraction_factor <= 0.9 * (1 + 1e-7) and cert.within_max_iter
    assert cert.weight_spectral_norm <= cert.weight_norm_bound


@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (24, 24), (7, 3), (3, 9), (64, 64)])
@pytest.mark.parametrize("estimate_ratio", [1.0, 1 - 1e-9, 1 - 1e-5, 0.995, 0.5, 1e-3, 0.0, float("nan"), 3.0])
def test_spectral_norm_upper_bound_is_never_below_the_norm(shape, estimate_ratio):
    from deqkern.lipschitz import spectral_norm_upper_bound
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    for V in (torch.randn(shape, generator=g, dtype=F64),
              # equal singular values (no gap: the hardest case for every bound) and a rank-one matrix
              10 * torch.linalg.qr(torch.randn(max(shape), max(shape), generator=g, dtype=F64))[0][:shape[0], :shape[1]],
              torch.randn(shape[0], 1, generator=g, dtype=F64) @ torch.randn(1, shape[1], generator=g, dtype=F64)):
        truth = torch.linalg.svdvals(V)[0].item()
        result = spectral_norm_upper_bound(V, truth * estimate_ratio)
        assert result.value.item() >= truth
        if result.method == "cholesky":  # the estimate proven: the given one or the Lanczos one, the larger
            given = truth * estimate_ratio if math.isfinite(estimate_ratio) else 0.0
            assert result.value.item() <= max(truth, given) * (1 + result.slack) * (1 + 1e-15)
        else:  # the squaring fallback: within rank^(1/1024) of the norm
            assert result.method == "squaring" and result.value.item() <= truth * min(shape) ** (1 / 1024) * 1.000001
        if estimate_ratio == 1.0:
            assert result.method == "cholesky" and result.slack <= 1e-6  # an exact estimate is proven tightly


def test_carried_spectral_bound_is_a_bound():
    """sigma_bar(W0) + ||W - W0||_F, rounded up: above ||W||_2 for large, small and underflowing changes, and not a
    number (so no comparison accepts it) for a weight that is not finite."""
    from deqkern.lipschitz.carried_bound import carried_spectral_bound
    g = torch.Generator().manual_seed(3)
    for shape in ((5, 5), (7, 3), (40, 40)):
        W0 = torch.randn(shape, generator=g, dtype=F64)
        proven = torch.linalg.svdvals(W0)[0]
        for size in (1.0, 1e-3, 1e-12, 0.0):
            W = W0 + size * torch.randn(shape, generator=g, dtype=F64)
            carried = carried_spectral_bound(W, W0, proven)
            assert carried.dtype == F64 and carried >= torch.linalg.svdvals(W)[0]
            assert carried <= proven + size * math.sqrt(W.numel()) * 3 + 1e-12  # and no looser than Frobenius
        # a change so small that its squares underflow: the bound still covers it
        tiny = 1e-170 * torch.randn(shape, generator=g, dtype=F64)
        assert carried_spectral_bound(tiny, torch.zeros(shape, dtype=F64), torch.zeros((), dtype=F64)) >= \
            torch.linalg.svdvals(tiny)[0] > 0
        # a float32 weight against its float64 proof
        assert carried_spectral_bound(W0.float(), W0, proven) >= torch.linalg.svdvals(W0.float().double())[0]
        bad = W0.clone()
        bad[0, 0] = float("nan")
        assert not bool(carried_spectral_bound(bad, W0, proven) <= 1e300)


def test_carried_spectral_bound_in_float32():
    """Both weights float32: the difference and its sum of squares in float32 (one BLAS dot product) with their
    rounding bounded: above ||W||_2 for large, small and underflowing changes (squares below float32's range), the
    drift above the float64 figure's by at most its rounding bound, and not a number for a weight that is not
    finite."""
    from deqkern.lipschitz.carried_bound import carried_spectral_bound
    g = torch.Generator().manual_seed(4)
    for shape in ((5, 5), (7, 3), (64, 64)):
        W0 = torch.randn(shape, generator=g)
        proven = torch.linalg.svdvals(W0.double())[0] * (1 + 1e-12)
        for size in (1.0, 1e-3, 1e-7, 1e-30, 0.0):
            W = W0 + (size * torch.randn(shape, generator=g)).float()
            carried = carried_spectral_bound(W, W0, proven)
            in_float64 = carried_spectral_bound(W.double(), W0.double(), proven)
            assert carried.dtype == F64 and carried >= torch.linalg.svdvals(W.double())[0]
            # looser than the float64 figure by the float32 sum's rounding bound only: gamma_N, N = 4096, 2.4e-4
            drift = in_float64 - proven
            assert carried >= in_float64 and carried <= proven + drift * (1 + 3e-4) + 1e-12 * proven
        tiny = (1e-25 * torch.randn(shape, generator=g)).float()  # squares of 1e-50: below float32's range
        assert (tiny != 0).any()
        assert carried_spectral_bound(tiny, torch.zeros(shape), torch.zeros((), dtype=F64)) >= \
            torch.linalg.svdvals(tiny.double())[0] > 0
        bad = W0.clone()
        bad[0, 0] = float("inf")
        assert not bool(carried_spectral_bound(bad, W0, proven) <= 1e300)


@pytest.mark.parametrize("shape", [(256, 256), (300, 240), (240, 300), (400, 400)])
def test_spectral_norm_upper_bound_with_a_float32_gram_matrix(shape, monkeypatch):
    """float32_gram=True: a float32 W's Gram matrix in float32, its rounding bound (gamma_m || |W| ||_2^2, the Perron
    root bounded by Collatz-Wielandt) added to the proof: never below the norm (checked by SVD in float64), on a
    Gaussian W, an entrywise positive one (|W| = W: the bound's worst case) and a rank-one one; `gram_rounding`
    says what it cost, part of `slack`; where float32 products may not be IEEE (matmul precision "medium", oneDNN's
    fpmath mode, off the CPU) or the float32 product overflows, the float64 Gram matrix is used (gram_rounding 0)."""
    from deqkern.lipschitz import spectral_norm_upper_bound
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    gaussian = torch.randn(shape, generator=g) / math.sqrt(shape[0])
    for V in (gaussian, gaussian.abs(), torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g)):
        truth = torch.linalg.svdvals(V.double())[0].item()
        fast = spectral_norm_upper_bound(V, float32_gram=True)
        exact = spectral_norm_upper_bound(V)
        assert fast.method == exact.method == "cholesky" and fast.value.item() >= truth
        assert 0 < fast.gram_rounding < 1e-2 and exact.gram_rounding == 0.0
        assert fast.slack >= fast.gram_rounding
        assert fast.value.item() <= truth * (1 + fast.slack) * (1 + 1e-6)  # the estimate is float32-rounded
        assert fast.value.item() >= exact.value.item() * (1 - 1e-6)  # the rounding bound loosens, never tightens
    # the rounding bound covers the float32 product's actual error, for a Gaussian, an entrywise positive and a
    # rank-one W
    from deqkern.lipschitz.spectral_bound import _gram
    for V in (gaussian, gaussian.abs(), torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g)):
        fast, exact = _gram(V, float32_gram=True), _gram(V)
        actual = torch.linalg.matrix_norm(fast.G - exact.G, ord=2)
        assert fast.error >= actual > 0 and fast.frobenius_sq >= exact.frobenius_sq
    # a float64 W is never multiplied in float32, nor a narrow one (the float64 product is the faster there)
    assert spectral_norm_upper_bound(gaussian.double(), float32_gram=True).gram_rounding == 0.0
    assert spectral_norm_upper_bound(gaussian[:, :200], float32_gram=True).gram_rounding == 0.0
    # products beyond float32's range: the float64 Gram matrix
    huge = spectral_norm_upper_bound(gaussian * 1e20, float32_gram=True)
    assert huge.gram_rounding == 0.0 and huge.value.item() >= torch.linalg.svdvals(gaussian.double() * 1e20)[0]
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # oneDNN may multiply float32 in bfloat16 here
        assert spectral_norm_upper_bound(gaussian, float32_gram=True).gram_rounding == 0.0
    finally:
        torch.set_float32_matmul_precision(previous)
    assert spectral_norm_upper_bound(gaussian, float32_gram=True).gram_rounding > 0
    from deqkern.lipschitz.spectral_bound import float32_products_are_ieee
    monkeypatch.setenv("ONEDNN_DEFAULT_FPMATH_MODE", "BF16")  # oneDNN's own switch, which torch does not see
    assert not float32_products_are_ieee(torch.device("cpu"))
    monkeypatch.setenv("ONEDNN_DEFAULT_FPMATH_MODE", "strict")
    assert float32_products_are_ieee(torch.device("cpu")) and not float32_products_are_ieee(torch.device("meta"))


def _lipschitz_step_checked(layer, head, opt, x, y, raw_slack=1e-12):
    """One Adam step of (head(layer(x)) - y)^2, then by SVD in float64: the W that step used has ||W||_2 <= 0.9 (up to
    W's rounding: 8 eps of its dtype) and the V it used ||V||_2 <= its proof's raw_norm_bound (1 + raw_slack).
    Returns (||V||_2, the proof)."""
    V = layer.weight_raw.detach().double().clone()
    loss = (head(layer(x)) - y).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    proof = layer.last_weight_bound
    raw_norm = torch.linalg.svdvals(V)[0].item()
    eps = 8 * torch.finfo(layer.weight_raw.dtype).eps
    assert torch.linalg.svdvals(layer.last_weight.double())[0].item() <= 0.9 * (1 + eps)
    assert raw_norm <= proof.raw_norm_bound * (1 + raw_slack)
    return raw_norm, proof


def test_lipschitz_float32_gram_proofs_hold_at_every_training_step():
    """A float32 LipschitzDEQ wide enough for float32 Gram matrices (256): its training proofs use them (their
    rounding bound recorded in last_weight_bound.gram_rounding), and ||W||_2 <= gamma / Lip(act) and ||V||_2 <=
    raw_norm_bound hold by SVD in float64 at every step; with proof_budget=0 every proof is in float64."""
    torch.manual_seed(18)
    x = torch.randn(32, 8)
    y = torch.randn(32, 1)
    for budget in (1e-2, 0.0):
        layer = LipschitzDEQ(8, 256, gamma=0.9, init_scale=2.0, proof_budget=budget)
        head = torch.nn.Linear(256, 1)
        opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=3e-2)
        roundings = []
        for _ in range(5):
            _, proof = _lipschitz_step_checked(layer, head, opt, x, y, raw_slack=0.0)
            if proof.method == "cholesky":
                roundings.append(proof.gram_rounding)
        assert roundings and (all(r > 0 for r in roundings) if budget else all(r == 0 for r in roundings))


def test_lipschitz_backs_off_carrying_while_its_weight_moves_fast():
    """A carried bound that misses the budget by far (a large learning rate) makes the layer skip 1, 3, ... attempts
    before the next; once the weight moves little again a carried bound is accepted and the count resets. The bound
    holds by SVD at every step throughout."""
    torch.manual_seed(17)
    x = torch.randn(32, 8)
    y = 5 * torch.randn(32, 1)
    layer = LipschitzDEQ(8, 40, gamma=0.9, tol=1e-6, max_iter=500, init_scale=2.0)
    head = torch.nn.Linear(40, 1)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=0.1)
    skipped, methods = [], []
    for step in range(20):
        if step == 8:
            for group in opt.param_groups:
                group["lr"] = 1e-7
        _lipschitz_step_checked(layer, head, opt, x, y)
        skipped.append(layer._carry_skips)
        methods.append(layer.last_weight_bound.method)
    assert max(skipped[:8]) >= 1 and "carried" not in methods[:8]  # far misses: attempts skipped
    assert "carried" in methods[8:] and layer._carry_misses == 0 and layer._carry_skips == 0


@pytest.mark.parametrize("case", ["active", "inactive", "zero_direction"])
def test_lipschitz_scaled_weight_gradient_is_spectral_norms(case):
    """The one-node W = V min(1, c / sigma_bar) has the gradient of the formula it replaces (sigma_bar = sigma
    (upper / sigma_d), sigma = ||V u||, through torch's autograd), first and second derivatives, where the scale is
    active, where it is 1, and where V u = 0 (no sigma path; there the formula's second derivative is NaN, the
    node's 0); its ratio given as a float (eager) and as a tensor (traced)."""
    from deqkern.nn.certified.lipschitz_deq import _SpectrallyScaledWeight
    g = torch.Generator().manual_seed(5)
    V = torch.randn(6, 6, generator=g, dtype=F64)
    u = torch.randn(6, generator=g, dtype=F64)
    u = u / u.norm()
    if case == "zero_direction":  # V u = 0 exactly
        u = torch.zeros(6, dtype=F64)
        u[0] = 1.0
        V[:, 0] = 0.0
    V.requires_grad_(True)
    upper = torch.tensor(0.5 if case == "inactive" else 3.0, dtype=F64)

    def formula(V):
        sigma = torch.linalg.vector_norm(V @ u)
        sigma_d = sigma.detach()
        sigma_bar = torch.where(sigma_d > 0, sigma * (upper / torch.where(sigma_d > 0, sigma_d, 1.0)), upper)
        return V * torch.clamp(0.9 / sigma_bar.clamp_min(torch.finfo(F64).tiny), max=1.0)

    G = torch.randn(6, 6, generator=g, dtype=F64)
    for weight in (formula, lambda V: _SpectrallyScaledWeight.apply(V, u, 0.9 / upper.item()),  # eager: a float
                   lambda V: _SpectrallyScaledWeight.apply(V, u, 0.9 / upper)):  # traced: a 0-dim tensor
        W = weight(V)
        plain, = torch.autograd.grad((W * G).sum(), V, retain_graph=True)  # no create_graph: the eager CPU path
        first, = torch.autograd.grad((W * G).sum(), V, create_graph=True)
        torch.testing.assert_close(plain, first.detach(), rtol=1e-13, atol=1e-14)
        second, = torch.autograd.grad((first * G).sum() + first.square().sum(), V)
        if weight is formula:
            expected = (W.detach(), first.detach(), second)
        else:
            torch.testing.assert_close(W.detach(), expected[0], rtol=0, atol=1e-15)
            torch.testing.assert_close(first.detach(), expected[1], rtol=1e-13, atol=1e-14)
            if case == "zero_direction":  # the formula's norm at V u = 0 gives NaN; the scale is then constant
                assert torch.isnan(expected[2]).all() and (second == 0).all()
            else:
                torch.testing.assert_close(second, expected[2], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lipschitz_scaled_weight_gradient_in_low_precision(dtype):
    """The one-node scale's first-order gradient (the CPU path that reads two scalars) in float32 and float16 equals
    the float64 formula's to the dtype's precision, with ||V u|| = 600 (its square overflows float16)."""
    from deqkern.nn.certified.lipschitz_deq import _SpectrallyScaledWeight
    g = torch.Generator().manual_seed(7)
    V64 = 150 * torch.randn(6, 6, generator=g, dtype=F64)
    u64 = torch.randn(6, generator=g, dtype=F64)
    u64 = u64 / u64.norm()
    V64 = V64 * (600 / torch.linalg.vector_norm(V64 @ u64))
    G = torch.randn(6, 6, generator=g, dtype=F64)
    upper = torch.linalg.svdvals(V64)[0] * 1.01
    grads = []
    for V, u in ((V64, u64), (V64.to(dtype), u64.to(dtype))):
        V = V.clone().requires_grad_(True)
        W = _SpectrallyScaledWeight.apply(V, u, 0.9 / upper.item())
        grads.append(torch.autograd.grad((W * G.to(dtype if V.dtype != F64 else F64)).sum(), V)[0])
    assert torch.isfinite(grads[1]).all()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grads[1].double(), grads[0], rtol=tol, atol=tol * grads[0].abs().max().item())


def test_lipschitz_two_forwards_then_one_backward():
    """Two training forwards (gradient accumulation over two batches) before one backward: the scale's node keeps a
    power vector of its own, not the buffer the second forward overwrites; the gradient is the sum of each's."""
    torch.manual_seed(19)
    layer = LipschitzDEQ(8, 24, init_scale=2.0, tol=1e-8, max_iter=400, dtype=F64)
    x1, x2 = torch.randn(5, 8, dtype=F64), torch.randn(5, 8, dtype=F64)
    loss = layer(x1).square().sum() + layer(x2).square().sum()
    loss.backward()
    assert torch.isfinite(layer.weight_raw.grad).all() and layer.weight_raw.grad.abs().sum() > 0


def test_warm_gram_steps_are_power_iterations():
    from deqkern.lipschitz.matrix_norms import warm_gram_steps
    g = torch.Generator().manual_seed(6)
    W = torch.randn(30, 20, generator=g, dtype=F64)
    u = torch.randn(20, generator=g, dtype=F64)
    u = u / u.norm()
    reference = lipschitz.power_iteration(W, u[None], mode="gram", max_iter=3, tol=1e-300,
                                          on_nonconvergence="ignore").u[0]
    torch.testing.assert_close(warm_gram_steps(W, u, 3), reference, rtol=1e-13, atol=1e-14)


def test_blocked_cholesky_decides_as_lapack():
    """From BLOCKED_CHOLESKY_MIN rows the factorisation is blocked: it completes above lambda_max and fails below,
    as LAPACK's does, and a NaN below the diagonal fails it; a bound of a large matrix goes through it."""
    from deqkern.lipschitz.spectral_bound import BLOCKED_CHOLESKY_MIN, _cholesky_completes, spectral_norm_upper_bound
    g = torch.Generator().manual_seed(4)
    n = BLOCKED_CHOLESKY_MIN + 17  # a last block shorter than the others
    V = torch.randn(n, n, generator=g, dtype=F64)
    G = V.T @ V
    top = torch.linalg.eigvalsh(G)[-1].item()
    for t, completes in ((top * (1 + 1e-9), True), (top * (1 - 1e-9), False), (0.5 * top, False)):
        A = -G
        A.diagonal().add_(t)
        assert _cholesky_completes(A.clone()) is completes
        assert (int(torch.linalg.cholesky_ex(A)[1]) == 0) is completes
    A = -G
    A.diagonal().add_(2 * top)
    A[n - 3, 5] = float("nan")
    assert _cholesky_completes(A) is False
    truth = torch.linalg.svdvals(V)[0].item()
    result = spectral_norm_upper_bound(V)
    assert result.method == "cholesky" and truth <= result.value.item() <= truth * (1 + 1e-3)


def test_spectral_norm_upper_bound_from_a_ritz_block():
    """With a block start the estimate is one block power step and a Rayleigh-Ritz projection: the bound holds
    from a random block, and the block a proof returns (Lanczos's or the exact eigenvectors', then the projection's)
    starts a tight proof of the matrix moved a little."""
    from deqkern.lipschitz.spectral_bound import RITZ_BLOCK, spectral_norm_upper_bound
    g = torch.Generator().manual_seed(5)
    for shape in ((64, 64), (100, 40), (40, 100), (120, 120)):
        W = torch.randn(shape, generator=g, dtype=F64)
        n = min(shape)
        # a random block's estimate is too low to prove: Lanczos from its top vector proves instead of the squaring
        cold = spectral_norm_upper_bound(W, block=torch.randn(n, RITZ_BLOCK, generator=g, dtype=F64))
        assert cold.method == "cholesky" and cold.value.item() >= torch.linalg.svdvals(W)[0].item()
        block = spectral_norm_upper_bound(W).ritz_block
        for _ in range(3):
            result = spectral_norm_upper_bound(W, block=block)
            truth = torch.linalg.svdvals(W)[0].item()
            assert result.value.item() >= truth and result.ritz_block.shape == (n, RITZ_BLOCK)
            assert result.method == "cholesky" and result.value.item() <= truth * 1.01
            block = result.ritz_block
            W = W + 1e-3 * torch.randn(shape, generator=g, dtype=F64)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_lipschitz_carries_its_proof_between_steps(dtype):
    """A training forward carries the latest proof (sigma_bar(V0) + ||V - V0||_F) while V moves little and proves
    again when it moves much: checked by SVD at every step of a run that alternates tiny and large learning rates,
    both kinds of step seen, a carried bound within the budget of the truth where the scale is active, and with
    proof_budget=0 none carried while the scale is active. The layer is wide enough for the Ritz-block estimate."""
    torch.manual_seed(16)
    x = torch.randn(32, 8, dtype=dtype)
    y = 5 * torch.randn(32, 1, dtype=dtype)
    for budget in (1e-2, 0.0):
        layer = LipschitzDEQ(8, 40, gamma=0.9, tol=1e-6, max_iter=500, proof_budget=budget, init_scale=2.0,
                             dtype=dtype)
        head = torch.nn.Linear(40, 1, dtype=dtype)
        opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=1e-2)
        methods = []
        for step in range(24):
            for group in opt.param_groups:
                group["lr"] = 3e-2 if step % 6 == 5 else 1e-6
            raw_norm, proof = _lipschitz_step_checked(layer, head, opt, x, y)
            eps = 8 * torch.finfo(dtype).eps
            assert raw_norm > 0.9  # the scale is active throughout
            if proof.method == "carried":
                assert proof.raw_norm_bound <= raw_norm * (1 + budget) * (1 + eps)
            methods.append(proof.method)
        assert layer._last_proof[2].shape == (40, deqkern.lipschitz.spectral_bound.RITZ_BLOCK)
        if budget:
            assert "carried" in methods and "cholesky" in methods
        else:
            assert "carried" not in methods
    with pytest.raises(ValueError, match="proof_budget"):
        LipschitzDEQ(3, 4, proof_budget=-0.1)


def test_spectral_norm_upper_bound_edge_cases():
    from deqkern.lipschitz import spectral_norm_upper_bound
    assert spectral_norm_upper_bound(torch.zeros(3, 4), 0.0).value.item() == 0.0
    tiny = torch.full((4, 4), 1e-150, dtype=F64)  # G = V^T V underflows towards 1e-300
    assert spectral_norm_upper_bound(tiny, 4e-150).value.item() >= 4e-150
    for bad in (float("nan"), float("inf")):
        V = torch.eye(3)
        V[1, 2] = bad
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            spectral_norm_upper_bound(V, 1.0)


def test_lipschitz_gradcheck_and_bad_parameters():
    torch.manual_seed(15)
    layer = LipschitzDEQ(3, 4, gamma=0.8, tol=1e-13, max_iter=2000, init_scale=3.0, dtype=F64).eval()
    assert torch.linalg.matrix_norm(layer.weight_raw.detach(), ord=2) > 0.8  # the gradient flows through sigma
    kit.gradcheck_layer(layer, torch.randn(2, 3, dtype=F64))
    for gamma in (1.0, 1.2, 0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="gamma must be a number in"):
            LipschitzDEQ(3, 4, gamma=gamma)


def test_layers_are_exported_from_nn():
    assert deqkern.nn.PositiveConcaveDEQ is PositiveConcaveDEQ
    assert deqkern.nn.LinfContractiveDEQ is LinfContractiveDEQ
    assert deqkern.nn.LipschitzDEQ is LipschitzDEQ


# ================================================================ every certificate, at every training step
def _digits(n=256):
    from deqkern.apps.digits import load_digits_split

    (x, y), _ = load_digits_split("cpu", F64)
    return x[:n], y[:n]


def _mu_inf_weighted(A, eta):
    S = eta[:, None] * A / eta[None, :]
    return (S.abs().sum(dim=1) - S.diagonal().abs() + S.diagonal()).max().item()


def _train_and_check(layer, check, steps=24, lr=0.05, batch=64):
    """A few epochs of digits (256 samples, 4 batches) with a linear head; `check(layer, x)` after every step's
    forward and backward, on the weights that step used."""
    x_all, y_all = _digits()
    head = torch.nn.Linear(layer.weight_raw.shape[0], 10, dtype=F64)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=lr)
    for step in range(steps):
        i = (step * batch) % x_all.shape[0]
        x, y = x_all[i:i + batch], y_all[i:i + batch]
        loss = torch.nn.functional.cross_entropy(head(layer(x)), y)
        opt.zero_grad()
        loss.backward()
        check(layer, x)
        opt.step()
    return loss.item()


@pytest.mark.parametrize("variant,method", [("tanh", "picard"), ("sigmoid", "picard"), ("sigmoid", "anderson"),
                                            ("sigmoid+relu", "picard")])
def test_pc_certificate_holds_at_every_training_step(variant, method):
    torch.manual_seed(30)
    activation, keywords = _pc_variant(variant)
    layer = PositiveConcaveDEQ(64, 24, activation=activation, tol=1e-8, max_iter=500, method=method, dtype=F64,
                               **keywords)
    bounds = []

    def check(layer, x):
        W = layer.weight.detach()
        assert (W >= 0).all() and torch.isfinite(W).all()
        with torch.no_grad():
            cert = layer.certificate(x)
            c = layer.injection_values(x)
            z = layer(x)
        act = ACT[activation]
        assert torch.allclose(act(z @ W.T + c), z, atol=1e-6)  # the fixed point of the layer's map
        assert (cert.sample_rate_bound < 1).all()
        assert (cert.measured_rate <= cert.sample_rate_bound + 1e-9).all()  # the theorem's rate, measured
        if method == "picard":
            assert (cert.forward_iterations <= cert.forward_iterations_bound).all()
        assert (cert.sample_rate_bound <= cert.rate_bound + 1e-12).all()
        bounds.append(cert.forward_iterations_bound.double().median().item())

    _train_and_check(layer, check)
    # the proven iteration bound is of the order of what the solve takes, not thousands of iterations
    assert max(bounds) < 200


@pytest.mark.parametrize("weighted,floor,method", [(False, None, "picard"), (True, 1.0, "picard"),
                                                   (False, 0.5, "anderson")])
def test_linf_certificate_holds_at_every_training_step(weighted, floor, method):
    torch.manual_seed(31)
    layer = LinfContractiveDEQ(64, 24, mu=0.5, activation="relu", tol=1e-8, max_iter=2000, weighted=weighted,
                               diagonal_floor=floor, method=method, dtype=F64)
    if weighted:
        with torch.no_grad():
            layer.log_eta.normal_(0, 0.3)
    factors = []

    def check(layer, x):
        A = layer.weight.detach()
        eta = torch.ones(A.shape[0], dtype=F64) if layer.eta is None else layer.eta.detach()
        cert = layer.certificate()
        assert _mu_inf_weighted(A, eta) <= 0.5 + 1e-12 and cert.mu_inf <= 0.5 + 1e-12
        if floor is not None:
            assert A.diagonal().min().item() >= -floor - 1e-12
            assert cert.contraction_factor <= 1 - (1 - 0.5) / (1 + floor) + 1e-12  # fixed by construction
        info = layer.last_info
        if method == "picard":
            assert (info.iterations <= cert.forward_iterations_bound).all()
            assert (info.backward.iterations <= cert.backward_iterations_bound).all()
        # the measured contraction of the averaged map in ||.||_eta is within the factor
        with torch.no_grad():
            c = layer.injection_values(x)
            step = lambda v: (1 - cert.alpha) * v + cert.alpha * torch.relu(v @ A.T + c)  # noqa: E731
            a, b = torch.randn_like(c), torch.randn_like(c)
            ratio = ((step(a) - step(b)) * eta).abs().amax(1) / ((a - b) * eta).abs().amax(1)
        assert ratio.max().item() <= cert.contraction_factor + 1e-12
        factors.append(cert.contraction_factor)
        bounds = layer.bounds()
        assert bounds.contraction_factor.item() == pytest.approx(cert.contraction_factor, rel=1e-10)
        assert bounds.input_lipschitz_bound.item() == pytest.approx(cert.input_lipschitz_bound, rel=1e-10)

    _train_and_check(layer, check, lr=0.1)
    if floor is not None:
        assert max(factors) <= 1 - 0.5 / (1 + floor) + 1e-12


def test_linf_diagonal_floor_keeps_the_iteration_count_from_growing():
    """Training pushes the diagonal of A down (alpha* and the contraction factor towards 1, the iteration count
    up: 40 -> 56-70 in the issue's run); with a floor the factor has a bound no step can move."""
    counts = {}
    for floor in (None, 0.5):
        torch.manual_seed(32)
        layer = LinfContractiveDEQ(64, 32, mu=0.5, activation="relu", tol=1e-6, max_iter=5000,
                                   diagonal_floor=floor, dtype=F64)
        seen = []
        _train_and_check(layer, lambda layer, x: seen.append(layer.certificate().forward_iterations_bound),
                         steps=24, lr=0.1)
        counts[floor] = seen
    assert max(counts[0.5]) <= LinfContractiveDEQ(2, 2, mu=0.5, diagonal_floor=0.5, tol=1e-6)._iteration_bound(
        1 - 0.5 / 1.5, 1e-6, math.sqrt(32))
    assert counts[None][-1] > counts[None][0]  # without the floor the bound does grow here
    assert counts[0.5][-1] < counts[None][-1]


def test_linf_bounds_are_differentiable_and_bound_the_output_map():
    torch.manual_seed(33)
    layer = LinfContractiveDEQ(5, 8, mu=0.3, activation="tanh", tol=1e-12, max_iter=5000, weighted=True,
                               dtype=F64)
    with torch.no_grad():
        layer.weight_raw.mul_(5)
        layer.log_eta.normal_(0, 0.5)
    readout, skip = torch.nn.Linear(8, 3, dtype=F64), 0.1 * torch.randn(3, 5, dtype=F64)
    b = layer.bounds(readout, skip)
    penalty = b.input_lipschitz_bound + b.output_lipschitz_bound + b.contraction_factor
    penalty.backward()
    for p in (layer.weight_raw, layer.injection.weight, layer.log_eta, readout.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    cert = layer.certificate()
    assert b.input_lipschitz_bound.item() == pytest.approx(cert.input_lipschitz_bound, rel=1e-12)
    with torch.no_grad():
        u, du = torch.randn(512, 5, dtype=F64), torch.randn(512, 5, dtype=F64)
        for size in (1e-3, 1.0):
            v = u + size * du
            x_u, x_v = layer(u), layer(v)
            dy = readout(x_u) + u @ skip.T - readout(x_v) - v @ skip.T
            ratio_y = dy.abs().amax(1) / (size * du.abs().amax(1))
            ratio_x = (x_u - x_v).abs().amax(1) / (size * du.abs().amax(1))
            assert ratio_y.max() <= b.output_lipschitz_bound.item() * (1 + 1e-9)
            assert ratio_x.max() <= b.input_lipschitz_bound.item() * (1 + 1e-9)


@pytest.mark.parametrize("make", [
    lambda: PositiveConcaveDEQ(4, 9, activation="relu6", tol=1e-12, max_iter=3000, dtype=F64),
    lambda: LinfContractiveDEQ(4, 9, mu=0.5, activation="tanh", tol=1e-12, max_iter=3000, dtype=F64),
    lambda: LipschitzDEQ(4, 9, gamma=0.9, tol=1e-12, max_iter=3000, init_scale=3.0, dtype=F64).eval(),
], ids=["pc", "linf", "lipschitz"])
def test_anderson_reaches_the_same_fixed_point_and_gradients(make):
    torch.manual_seed(34)
    picard, anderson = make(), make()
    anderson.load_state_dict(picard.state_dict())
    anderson.solver_options.update(method="anderson", m=5, beta=1.0)
    x = torch.randn(6, 4, dtype=F64)
    outs = []
    for layer in (picard, anderson):
        xx = x.clone().requires_grad_(True)
        z = layer(xx)
        (z * torch.linspace(-1, 1, z.numel(), dtype=F64).reshape(z.shape)).sum().backward()
        outs.append((z.detach(), xx.grad, layer.weight_raw.grad))
        assert layer.last_info.converged.all()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_anderson_refused_where_the_guarantee_does_not_allow_it():
    with pytest.raises(ValueError, match="nonnegative range"):
        PositiveConcaveDEQ(3, 4, activation="tanh", method="anderson")
    with pytest.raises(ValueError, match="method"):
        LipschitzDEQ(3, 4, method="broyden")
    with pytest.raises(ValueError, match="diagonal_floor must be"):
        LinfContractiveDEQ(3, 4, mu=-0.5, diagonal_floor=0.2)


def test_linf_bounds_gradcheck():
    """The differentiable certificate figures (a training penalty) against finite differences."""
    from torch.func import functional_call

    torch.manual_seed(35)
    layer = LinfContractiveDEQ(3, 5, mu=0.3, activation="tanh", weighted=True, diagonal_floor=2.0, dtype=F64)
    with torch.no_grad():  # away from ties (equal weights: max and min have no derivative there)
        layer.log_eta.normal_(0, 0.3)
        layer.weight_raw.mul_(3)
    readout = torch.randn(2, 5, dtype=F64)

    class Figures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, readout):
            b = self.layer.bounds(readout)
            return b.contraction_factor, b.input_lipschitz_bound, b.output_lipschitz_bound

    names = ["layer.weight_raw", "layer.log_eta", "layer.injection.weight"]
    module = Figures()
    params = tuple(dict(module.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(lambda *p: functional_call(module, dict(zip(names, p)), (readout,)), params,
                                    eps=1e-7, atol=1e-6, rtol=1e-5)

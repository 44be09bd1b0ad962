"""deqkern.nn.certified.conv: the certified convolutional DEQs, tested against the explicitly built conv matrix (the
convolution as the (C H W) x (C H W) linear map it is) and against the theory they certify."""
import math

import pytest
import torch
import torch.nn.functional as F

import deqkern
import kit
from deqkern.nn.certified.conv import LinfContractiveConvDEQ, LipschitzConvDEQ, PositiveConcaveConvDEQ
from deqkern.lipschitz import conv_operator_norm_upper_bound

F64 = torch.float64
ACT = {name: a.fn for name, a in deqkern.ACTIVATIONS.items()}


def conv_matrix(kernel, input_shape, padding):
    """The (C_out H W, C_in H W) matrix of z -> conv2d(z, kernel, padding=padding) on (C_in, H, W) inputs."""
    n = math.prod(input_shape)
    basis = torch.eye(n, dtype=kernel.dtype).reshape(n, *input_shape)
    return F.conv2d(basis, kernel, None, 1, padding).reshape(n, -1).T


def exact_norm(kernel, input_shape, padding):
    return torch.linalg.matrix_norm(conv_matrix(kernel.double(), input_shape, padding), ord=2).item()


def exact_mu_inf(kernel, input_shape, padding):
    A = conv_matrix(kernel.double(), input_shape, padding)
    d = A.diagonal()
    return (d + A.abs().sum(dim=1) - d.abs()).max().item()


def _pairs_ratio(step, shape, seed=0, n=8):
    """max ||step(a) - step(b)|| / ||a - b|| (flattened 2-norm) over random pairs."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(n):
        a = torch.randn(shape, dtype=F64, generator=g)
        b = a + 0.3 * torch.randn(shape, dtype=F64, generator=g)
        worst = max(worst, ((step(a) - step(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)).max().item())
    return worst


# ================================================================ the operator-norm upper bound on the layers' shapes
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_upper_bound_is_above_the_exact_norm_on_same_padded_shapes(kernel_size):
    """The proven bound the LipschitzConvDEQ uses is >= the exact norm of the explicit matrix on every shape, down
    to 1x1 maps (where a 'same' 3x3 conv sees only its centre tap), and close to it; the reshaped kernel's norm is
    below the exact norm (the trap the bound avoids)."""
    ratios, below = [], 0
    for seed, (c, shape) in enumerate([(1, (1, 1)), (3, (2, 5)), (3, (6, 6)), (2, (7, 4)), (3, (9, 9))]):
        K = torch.randn(c, c, kernel_size, kernel_size, dtype=F64, generator=torch.Generator().manual_seed(seed))
        exact = exact_norm(K, (c, *shape), kernel_size // 2)
        bound = conv_operator_norm_upper_bound(K, (c, *shape), padding=kernel_size // 2).item()
        ratios.append(bound / exact)
        assert bound >= exact
        below += torch.linalg.matrix_norm(K.reshape(c, -1), ord=2).item() < exact * (1 - 1e-9)
    print(f"k={kernel_size}: bound / exact norm", [f"{r:.4f}" for r in ratios])
    # measured: k=3 1.00 (1x1 map: only the centre tap is live) to 1.26 (2x5), k=5 1.00 to 1.51 (2x5): looser when
    # the kernel is as large as the map, tighter on larger maps
    assert max(ratios) <= {1: 1 + 1e-9, 3: 1.3, 5: 1.55}[kernel_size]
    assert ratios[0] <= 1 + 1e-9  # a 1x1 map (and a 1x1 kernel): a per-pixel matrix, bounded exactly
    assert below >= (0 if kernel_size == 1 else 2)


# ================================================================ LipschitzConvDEQ
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "identity"])
def test_lipschitz_conv_fixed_point_contraction_and_certificate(activation):
    torch.manual_seed(0)
    layer = LipschitzConvDEQ(2, 3, gamma=0.9, activation=activation, tol=1e-11, max_iter=1000, init_scale=4.0,
                             dtype=F64)
    x = torch.randn(2, 2, 6, 6, dtype=F64, requires_grad=True)
    z = layer(x)
    assert z.shape == (2, 3, 6, 6) and layer.last_info.converged.all()
    torch.testing.assert_close(layer.f(z.detach(), x.detach()), z.detach(), rtol=0, atol=1e-9)
    (z * torch.randn_like(z)).sum().backward()
    assert layer.last_info.backward.converged.all() and torch.isfinite(x.grad).all()
    K, target = layer.last_kernel, layer.max_kernel_norm
    exact = exact_norm(K, (3, 6, 6), 1)
    raw_exact = exact_norm(layer.weight_raw.detach(), (3, 6, 6), 1)
    assert raw_exact > 1.5 * target  # the rescaling is active
    assert exact <= target * (1 + 1e-12)
    assert exact >= 0.75 * target  # and not much more conservative than needed on 6x6 maps
    cert = layer.certificate()
    assert cert.input_shape == (6, 6) and cert.within_max_iter
    assert cert.kernel_operator_norm <= exact * (1 + 1e-12) and cert.kernel_operator_norm >= exact * (1 - 1e-5)
    assert cert.kernel_norm_bound >= exact and cert.contraction_factor <= 0.9 * (1 + 1e-9)
    assert cert.injection_norm_bound >= exact_norm(layer.injection.weight.detach(), (2, 6, 6), 1)
    # the measured Lipschitz constant of the map and the observed iterations are within the certificate
    with torch.no_grad():
        c = layer.injection_values(x)
        ratio = _pairs_ratio(lambda v: ACT[activation](F.conv2d(v, K, None, 1, 1) + c), (2, 3, 6, 6))
    assert ratio <= cert.contraction_factor * (1 + 1e-12)
    assert layer.last_info.iterations.max() <= cert.forward_iterations_bound
    assert layer.last_info.backward.iterations.max() <= cert.backward_iterations_bound
    if activation == "identity":  # the linear map: random directions see a good part of the norm
        assert ratio >= 0.5 * cert.contraction_factor
    # ||z*(x) - z*(x')||_2 <= input_lipschitz_bound ||x - x'||_2
    with torch.no_grad():
        dx = 1e-3 * torch.randn_like(x)
        moved = (layer(x + dx) - layer(x)).flatten(1).norm(dim=1) / dx.flatten(1).norm(dim=1)
    assert moved.max() <= cert.input_lipschitz_bound


def test_lipschitz_conv_kernel_follows_the_input_shape():
    """One layer on maps of several sizes: each forward's K is bounded on its own (H, W)."""
    torch.manual_seed(1)
    layer = LipschitzConvDEQ(1, 2, kernel_size=5, gamma=0.7, tol=1e-8, max_iter=500, init_scale=3.0, dtype=F64)
    for shape in ((1, 1), (3, 8), (7, 7)):
        layer(torch.randn(2, 1, *shape, dtype=F64))
        assert layer.last_kernel_bound.input_shape == shape
        assert exact_norm(layer.last_kernel, (2, *shape), 2) <= 0.7 * (1 + 1e-12)
        assert layer.last_kernel_bound.kernel_norm_bound <= 0.7 * (1 + 1e-12)
        assert exact_norm(layer.weight_raw.detach(), (2, *shape), 2) <= layer.last_kernel_bound.raw_norm_bound


def test_lipschitz_conv_gradcheck():
    torch.manual_seed(2)
    layer = LipschitzConvDEQ(2, 2, gamma=0.5, tol=1e-13, max_iter=2000, init_scale=3.0, dtype=F64)
    assert exact_norm(layer.weight_raw.detach(), (2, 4, 4), 1) > 0.5  # the gradient flows through the bound
    kit.gradcheck_layer(layer, torch.randn(2, 2, 4, 4, dtype=F64))


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_lipschitz_conv_guarantee_holds_at_every_training_step(activation):
    """At every step of a training run pushed against the bound (large learning rate, hard targets), the K the
    forward used has exact operator norm <= gamma / Lip(act) (explicit matrix, SVD), and the certificate's
    iteration bounds hold. A kernel normalised by its reshaped-matrix norm (the trap) is not a contraction."""
    torch.manual_seed(3)
    layer = LipschitzConvDEQ(2, 3, gamma=0.9, activation=activation, tol=1e-6, max_iter=500, dtype=F64)
    target_norm = layer.max_kernel_norm
    x = torch.randn(2, 2, 6, 6, dtype=F64)
    y = 3 * torch.randn(2, 3, 6, 6, dtype=F64)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    trap_broken = 0
    for _ in range(15):
        V = layer.weight_raw.detach().clone()
        loss = (layer(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        proof = layer.last_kernel_bound
        exact = exact_norm(layer.last_kernel, (3, 6, 6), 1)
        assert exact <= target_norm * (1 + 1e-12)  # the guarantee, by SVD of the explicit matrix, at this step
        assert exact <= proof.kernel_norm_bound * (1 + 1e-12) and proof.kernel_norm_bound <= target_norm * (1 + 1e-12)
        raw_exact = exact_norm(V, (3, 6, 6), 1)
        assert raw_exact <= proof.raw_norm_bound <= 1.2 * raw_exact
        trap = V * (target_norm / torch.linalg.matrix_norm(V.reshape(3, -1), ord=2))
        trap_broken += exact_norm(trap, (3, 6, 6), 1) > target_norm
        cert = layer.certificate(power_tol=1e-6)
        assert layer.last_info.converged.all() and layer.last_info.backward.converged.all()
        assert layer.last_info.iterations.max() <= cert.forward_iterations_bound
        assert layer.last_info.backward.iterations.max() <= cert.backward_iterations_bound
    assert raw_exact > target_norm  # the rescaling is active
    assert trap_broken == 15


# ================================================================ PositiveConcaveConvDEQ
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu6"])
def test_pc_conv_unique_fixed_point_and_certified_rate_without_a_norm_bound(activation):
    torch.manual_seed(4)
    layer = PositiveConcaveConvDEQ(2, 3, activation=activation, tol=1e-10, max_iter=2000, dtype=F64)
    with torch.no_grad():
        layer.weight_raw.add_(math.log(40.0))  # K about 40 times larger than at init
    K = layer.kernel.detach()
    assert exact_norm(K, (3, 6, 6), 1) > 5  # far from a contraction
    assert (conv_matrix(K, (3, 6, 6), 1) >= 0).all()  # a nonnegative matrix: the theory's condition
    x = torch.randn(2, 2, 6, 6, dtype=F64)
    with torch.no_grad():
        z = layer(x)
        cert = layer.certificate(x)
    assert layer.last_info.converged.all() and (z > 0).all()
    torch.testing.assert_close(layer.f(z, x), z, rtol=0, atol=1e-9)
    assert cert.weight_nonnegative and cert.min_weight >= 0 and 0 < cert.rate_bound < 1
    assert (cert.sample_rate_bound < 1).all() and (cert.sample_rate_bound <= cert.rate_bound + 1e-12).all()
    assert (cert.measured_rate <= cert.sample_rate_bound + 1e-9).all()
    assert (layer.last_info.iterations <= cert.forward_iterations_bound).all()
    assert torch.equal(cert.forward_iterations, layer.last_info.iterations)
    # the sharpest rate the theorem allows is 1 - min act(c) / z*: the proven one is that, up to rounding
    c = layer.injection_values(x).detach()
    q_at_fixed_point = 1 - (ACT[activation](c) / z).flatten(1).min(dim=1).values
    assert (cert.sample_rate_bound >= q_at_fixed_point - 1e-9).all()
    # unique: every nonnegative start reaches z*
    g = torch.Generator().manual_seed(5)
    for scale in (0.1, 1.0, 5.0):
        with torch.no_grad():
            z1 = layer(x, z0=scale * torch.rand(z.shape, dtype=F64, generator=g))
        torch.testing.assert_close(z1, z, rtol=1e-8, atol=1e-8)


def test_pc_conv_gradcheck():
    torch.manual_seed(6)
    layer = PositiveConcaveConvDEQ(2, 2, activation="tanh", tol=1e-13, max_iter=2000, dtype=F64)
    with torch.no_grad():
        layer.weight_raw.add_(math.log(5.0))
    kit.gradcheck_layer(layer, torch.randn(2, 2, 4, 4, dtype=F64))


def test_pc_conv_guarantee_holds_at_every_training_step():
    torch.manual_seed(7)
    layer = PositiveConcaveConvDEQ(2, 3, tol=1e-6, max_iter=1000, dtype=F64)
    x = torch.randn(2, 2, 6, 6, dtype=F64)
    y = torch.full((2, 3, 6, 6), 0.99, dtype=F64)  # hard: targets near saturation push K up
    opt = torch.optim.Adam(layer.parameters(), lr=0.2)
    for _ in range(15):
        loss = (layer(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        K = layer.last_kernel
        assert torch.isfinite(K).all() and K.min() >= 0  # the guarantee, for the K of this forward
        assert layer.last_info.converged.all() and layer.last_info.backward.converged.all()
        cert = layer.certificate(x)
        assert (cert.sample_rate_bound < 1).all()
        assert (layer.last_info.iterations <= cert.forward_iterations_bound).all()
        assert (cert.measured_rate <= cert.sample_rate_bound + 1e-9).all()
    assert layer.kernel.detach().sum(dim=(1, 2, 3)).max() > 1  # the steps grew K past a row sum of 1


# ================================================================ LinfContractiveConvDEQ
@pytest.mark.parametrize("mu", [-0.5, 0.0, 0.5, 0.95])
def test_linf_conv_parameterisation_bounds_mu_inf_of_the_conv_matrix(mu):
    g = torch.Generator().manual_seed(8)
    for k in (1, 3, 5):
        for scale in (1e-3, 1.0, 30.0):
            T = scale * torch.randn(3, 3, k, k, dtype=F64, generator=g)
            K = LinfContractiveConvDEQ.kernel_from(T, mu)
            bound = LinfContractiveConvDEQ.mu_inf_bound(K).item()
            assert bound <= mu + 1e-13 * (1 + 9 * k * k * scale)
            for shape in ((1, 1), (2, 4), (k, k + 1)):
                assert exact_mu_inf(K, (3, *shape), k // 2) <= bound + 1e-12 * (1 + k * k * scale)
            # once H, W >= k an interior pixel sees every tap: the bound is mu_inf of the matrix itself
            torch.testing.assert_close(exact_mu_inf(K, (3, k, k + 1), k // 2), bound, rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
def test_linf_conv_measured_contraction_and_iterations_within_the_certificate(activation):
    torch.manual_seed(9)
    layer = LinfContractiveConvDEQ(2, 3, mu=0.6, activation=activation, tol=1e-10, max_iter=2000, dtype=F64)
    with torch.no_grad():
        layer.weight_raw.mul_(20)
        layer.weight_raw[:, :, 1, 1].diagonal().sub_(0.5)  # negative centre taps: alpha* < 1
    x = torch.randn(2, 2, 5, 5, dtype=F64, requires_grad=True)
    z = layer(x)
    (z * torch.randn_like(z)).sum().backward()
    cert = layer.certificate()
    assert cert.input_shape == (5, 5) and cert.alpha < 1 and cert.mu_inf_bound <= 0.6 + 1e-12
    assert exact_mu_inf(layer.last_kernel, (3, 5, 5), 1) <= cert.mu_inf_bound + 1e-12
    assert cert.contraction_factor == pytest.approx(1 - cert.alpha * (1 - max(cert.mu_inf_bound, 0)))
    torch.testing.assert_close(layer.f(z.detach(), x.detach()), z.detach(), rtol=0, atol=1e-8)
    assert layer.last_info.converged.all() and layer.last_info.backward.converged.all()
    assert layer.last_info.iterations.max() <= cert.forward_iterations_bound
    assert layer.last_info.backward.iterations.max() <= cert.backward_iterations_bound
    # the averaged map contracts in the l-infinity norm by at most the certified factor
    K, alpha, act = layer.last_kernel, cert.alpha, ACT[activation]
    with torch.no_grad():
        c = layer.injection_values(x)
        g = torch.Generator().manual_seed(10)
        worst = 0.0
        for _ in range(20):
            a = 5 * torch.randn(z.shape, dtype=F64, generator=g)
            b = a + torch.randn(z.shape, dtype=F64, generator=g)
            step = lambda v: (1 - alpha) * v + alpha * act(F.conv2d(v, K, None, 1, 1) + c)  # noqa: E731
            ratio = (step(a) - step(b)).flatten(1).abs().amax(dim=1) / (a - b).flatten(1).abs().amax(dim=1)
            worst = max(worst, ratio.max().item())
        # ||z*(x) - z*(x')||_inf <= input_lipschitz_bound ||x - x'||_inf
        dx = 1e-3 * torch.randn_like(x)
        moved = (layer(x + dx) - layer(x)).flatten(1).abs().amax(dim=1) / dx.flatten(1).abs().amax(dim=1)
    assert worst <= cert.contraction_factor + 1e-12 and worst > 0.3 * cert.contraction_factor
    assert moved.max() <= cert.input_lipschitz_bound


def test_linf_conv_gradcheck():
    torch.manual_seed(11)
    layer = LinfContractiveConvDEQ(2, 2, mu=0.5, activation="tanh", tol=1e-13, max_iter=5000, dtype=F64)
    with torch.no_grad():
        layer.weight_raw.mul_(10)
    kit.gradcheck_layer(layer, torch.randn(2, 2, 4, 4, dtype=F64))


def test_linf_conv_guarantee_holds_at_every_training_step():
    torch.manual_seed(12)
    layer = LinfContractiveConvDEQ(2, 3, mu=0.7, activation="tanh", tol=1e-6, max_iter=1000, dtype=F64)
    x, y = torch.randn(2, 2, 6, 6, dtype=F64), 3 * torch.randn(2, 3, 6, 6, dtype=F64)
    opt = torch.optim.Adam(layer.parameters(), lr=0.3)
    for _ in range(15):
        loss = (layer(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert exact_mu_inf(layer.last_kernel, (3, 6, 6), 1) <= 0.7 + 1e-9  # explicit matrix, this step's K
        cert = layer.certificate()
        assert cert.contraction_factor < 1 and 0 < cert.alpha <= 1
        assert layer.last_info.converged.all() and layer.last_info.backward.converged.all()
        assert layer.last_info.iterations.max() <= cert.forward_iterations_bound
        assert layer.last_info.backward.iterations.max() <= cert.backward_iterations_bound
    assert layer.weight_raw.abs().max() > 0.1  # the steps really moved T


# ================================================================ bad input
LAYERS = [pytest.param(cls, id=cls.__name__)
          for cls in (LipschitzConvDEQ, PositiveConcaveConvDEQ, LinfContractiveConvDEQ)]


@pytest.mark.parametrize("cls", LAYERS)
def test_conv_layers_reject_bad_input(cls):
    name = cls.__name__
    for kernel_size in (2, 4, 0, -1, 3.0, True):
        with pytest.raises(ValueError, match=f"deqkern.{name}: kernel_size must be an odd integer"):
            cls(2, 3, kernel_size=kernel_size)
    for bad in (0, 2.0):
        with pytest.raises(ValueError, match=f"deqkern.{name}: channels"):
            cls(2, bad)
        with pytest.raises(ValueError, match=f"deqkern.{name}: in_channels"):
            cls(bad, 3)
    with pytest.raises(ValueError, match=f"deqkern.{name}: unknown activation 'bogus'"):
        cls(2, 3, activation="bogus")
    with pytest.raises(ValueError, match=f"deqkern.{name}: tol"):
        cls(2, 3, tol=0.0)
    layer = cls(2, 3, dtype=F64)
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    for bad_x in (torch.randn(2, 3, 5, 5, dtype=F64), torch.randn(2, 2, 5, dtype=F64), torch.randn(2, 5, 5, dtype=F64),
                  torch.randn(2, 2, 0, 5, dtype=F64)):
        with pytest.raises(ValueError, match=rf"deqkern.{name}: x must be a non-empty \(batch, in_channels=2, H, W\)"):
            layer(bad_x)
    with pytest.raises(TypeError, match=f"deqkern.{name}: x has dtype torch.float32"):
        layer(x.float())
    with pytest.raises(ValueError, match=rf"deqkern.{name}: z0 must be \(batch, channels, H, W\) = \(2, 3, 5, 5\)"):
        layer(x, z0=torch.zeros(2, 2, 5, 5, dtype=F64))
    with pytest.raises(ValueError, match=rf"deqkern.{name}: z must be \(batch, channels, H, W\)"):
        layer.f(torch.zeros(2, 3, 4, 5, dtype=F64), x)
    if cls is not PositiveConcaveConvDEQ:
        with pytest.raises(ValueError, match=f"deqkern.{name}: input_shape must be the spatial shape"):
            layer.certificate((3, 5, 5))


def test_conv_layers_reject_bad_parameters():
    for gamma in (1.0, 0.0, -0.5, float("nan"), True):
        with pytest.raises(ValueError, match="deqkern.LipschitzConvDEQ: gamma must be a number in"):
            LipschitzConvDEQ(2, 3, gamma=gamma)
    with pytest.raises(ValueError, match="deqkern.LipschitzConvDEQ: pass input_shape"):
        LipschitzConvDEQ(2, 3).certificate()
    for mu in (1.0, 1.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="deqkern.LinfContractiveConvDEQ: mu must be a finite number < 1"):
            LinfContractiveConvDEQ(2, 3, mu=mu)
    with pytest.raises(ValueError, match="deqkern.LinfContractiveConvDEQ: unknown activation 'softplus'"):
        LinfContractiveConvDEQ(2, 3, activation="softplus")
    for activation in ("relu", "identity"):
        with pytest.raises(ValueError, match="deqkern.PositiveConcaveConvDEQ: activation .* is not positive and"):
            PositiveConcaveConvDEQ(2, 3, activation=activation)
    with pytest.raises(ValueError, match="deqkern.PositiveConcaveConvDEQ: injection_eps"):
        PositiveConcaveConvDEQ(2, 3, injection_eps=0.0)
    layer = PositiveConcaveConvDEQ(2, 3, activation="tanh", dtype=F64)
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    with pytest.raises(ValueError, match="deqkern.PositiveConcaveConvDEQ: z0 must be >= 0"):
        layer(x, z0=-torch.ones(2, 3, 5, 5, dtype=F64))
    layer = PositiveConcaveConvDEQ(2, 3, activation="sigmoid", tol=1e-10, max_iter=500, dtype=F64)
    with torch.no_grad():  # sigmoid (nonnegative range): any start, even a negative one, reaches the fixed point
        torch.testing.assert_close(layer(x, z0=-5 * torch.ones(2, 3, 5, 5, dtype=F64)), layer(x), rtol=1e-8, atol=1e-8)


def test_conv_layers_pickle_and_deepcopy():
    import copy
    import pickle
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    for cls in (LipschitzConvDEQ, PositiveConcaveConvDEQ, LinfContractiveConvDEQ):
        layer = cls(2, 3, tol=1e-10, max_iter=500, dtype=F64)
        with torch.no_grad():
            z = layer(x)
            for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
                torch.testing.assert_close(other(x), z, rtol=0, atol=0)

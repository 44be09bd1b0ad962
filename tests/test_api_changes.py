"""The spellings renamed in 0.2.0 (CHANGELOG.md) raise a TypeError that names the new spelling, and every layer
checks its options at construction."""
import pytest
import torch

import deqkern
from deqkern import jacobian, lipschitz

W4 = 0.5 * torch.eye(4)
C2 = torch.ones(2, 4)
CONV_W = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))


def _identity_map(z, x):
    return 0.5 * z + x


OLD_SPELLINGS = [
    ("fixed_point_dense positional activation", lambda: deqkern.fixed_point_dense(W4, C2, "relu"), "activation="),
    ("solve positional method", lambda: deqkern.solve(torch.tanh, C2, "picard"), "method="),
    ("DEQ solver=", lambda: deqkern.nn.DEQ(_identity_map, solver="picard"), "method="),
    ("DEQ backward solver", lambda: deqkern.nn.DEQ(_identity_map, backward_options=dict(solver="picard")),
     r"backward_options\['method'\]"),
    ("DEQLinear positional activation", lambda: deqkern.nn.DEQLinear(4, 4, "relu"), "activation="),
    ("LipschitzDEQ positional gamma", lambda: deqkern.nn.LipschitzDEQ(4, 4, 0.5), "gamma="),
    ("LinfContractiveDEQ forward u=", lambda: deqkern.nn.LinfContractiveDEQ(4, 4)(u=C2), "x="),
    ("LinfContractiveDEQ forward x0=", lambda: deqkern.nn.LinfContractiveDEQ(4, 4)(C2, x0=C2), "z0="),
    ("spectral_norm n_iter=", lambda: lipschitz.spectral_norm(W4, n_iter=5), "max_iter="),
    ("spectral_norm positional", lambda: lipschitz.spectral_norm(W4, 5), "max_iter="),
    ("one_sided_l2 n_iter=", lambda: lipschitz.one_sided_l2(W4, n_iter=5), "max_iter="),
    ("conv_operator_norm n_iter=", lambda: lipschitz.conv_operator_norm(CONV_W, (2, 5, 5), n_iter=5), "max_iter="),
    ("conv_operator_norm positional stride", lambda: lipschitz.conv_operator_norm(CONV_W, (2, 5, 5), 1), "stride="),
    ("jacobian_norm n_iter=", lambda: jacobian.jacobian_norm(W4, C2, C2, n_iter=5, activation="tanh"), "max_iter="),
]


@pytest.mark.parametrize("call, new", [pytest.param(c, n, id=i) for i, c, n in OLD_SPELLINGS])
def test_old_spellings_name_the_new_one(call, new):
    with pytest.raises(TypeError, match=new):
        call()


@pytest.mark.parametrize("make, what", [
    (lambda: deqkern.nn.DEQLinear(4, 4, max_iter=0), "DEQLinear: max_iter"),
    (lambda: deqkern.nn.DEQLinear(4, 4, tol=-1.0), "DEQLinear: tol"),
    (lambda: deqkern.nn.DEQLinear(4, 4, backend="tpu"), "DEQLinear: unknown backend"),
    (lambda: deqkern.nn.DEQLinear(4, 4, on_backward_overflow="ignore"), "DEQLinear: unknown on_backward_overflow"),
    (lambda: deqkern.nn.LipschitzDEQ(4, 4, max_iter=0), "LipschitzDEQ: max_iter"),
    (lambda: deqkern.nn.LipschitzConvDEQ(1, 2, method="newton"), "LipschitzConvDEQ: unknown method"),
    (lambda: deqkern.nn.DEQ(_identity_map, solver_options=dict(max_iter=0)), r"nn.DEQ: solver_options\['max_iter'\]"),
])
def test_layers_check_their_options_at_construction(make, what):
    with pytest.raises(ValueError, match=what):
        make()


def test_every_layer_returns_z_and_keeps_its_statistics():
    x = torch.randn(3, 4, dtype=torch.float64)
    layers = [deqkern.nn.DEQLinear(4, 5, dtype=torch.float64), deqkern.nn.LipschitzDEQ(4, 5, dtype=torch.float64),
              deqkern.nn.LinfContractiveDEQ(4, 5, dtype=torch.float64),
              deqkern.nn.PositiveConcaveDEQ(4, 5, dtype=torch.float64),
              deqkern.nn.DEQ(lambda z, x: torch.tanh(0.5 * z + x))]
    for layer in layers:
        z = layer(x, z0=None)
        assert isinstance(z, torch.Tensor) and z.shape[0] == 3, type(layer).__name__
        assert isinstance(layer.last_info, deqkern.SolverInfo) and layer.last_info.converged.all()


@pytest.mark.parametrize("make", [
    pytest.param(lambda **kw: deqkern.nn.LipschitzConvDEQ(1, 3, **kw), id="LipschitzConvDEQ"),
    pytest.param(lambda **kw: deqkern.nn.LinfContractiveConvDEQ(1, 3, **kw), id="LinfContractiveConvDEQ"),
    pytest.param(lambda **kw: deqkern.nn.PositiveConcaveConvDEQ(1, 3, activation="sigmoid", **kw),
                 id="PositiveConcaveConvDEQ"),
])
def test_conv_layers_take_anderson_and_keep_their_fixed_point(make):
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)  # the layers' random init: without a seed it followed the tests run before (one draw of
    # LinfContractiveConvDEQ had Anderson and Picard both at 13 iterations)
    picard = make(tol=1e-10, max_iter=500, dtype=torch.float64)
    anderson = make(tol=1e-10, max_iter=500, method="anderson", m=4, dtype=torch.float64)
    anderson.load_state_dict(picard.state_dict())
    torch.testing.assert_close(anderson(x), picard(x), atol=1e-8, rtol=1e-8)
    assert anderson.last_info.iterations.max() < picard.last_info.iterations.max()


def test_positive_concave_layers_refuse_anderson_where_it_may_leave_the_orthant():
    for make in (lambda: deqkern.nn.PositiveConcaveDEQ(4, 4, activation="tanh", method="anderson"),
                 lambda: deqkern.nn.PositiveConcaveConvDEQ(1, 3, activation="tanh", method="anderson")):
        with pytest.raises(ValueError, match="nonnegative range"):
            make()


def test_available_backends_says_why_not():
    status = deqkern.core.backends.backend_status("cpu")
    assert status["cpu"] is None and status["reference"] is None
    assert set(status) == {"cpu", "cuda", "triton", "reference"}
    assert deqkern.available_backends("cpu") == tuple(b for b, why in status.items() if why is None)
    assert all(isinstance(why, str) and why for why in status.values() if why is not None)


def test_a_cuda_build_without_a_gpu_offers_no_gpu_backend(monkeypatch):
    # CI's second run: the CUDA extension built and loaded from the wheel, on a machine with no GPU or driver. Every
    # backend on CUDA tensors must then say why not, or the tests' kit would try to make CUDA tensors.
    monkeypatch.setattr(deqkern._extension, "CUDA_EXTENSION_BUILT", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = deqkern.core.backends.backend_status("cuda")
    assert all(isinstance(why, str) and why for why in status.values()), status
    assert all("no CUDA device" in status[b] for b in ("cuda", "triton", "reference")), status
    assert deqkern.available_backends("cuda") == ()
    assert deqkern.core.backends.backend_status("cpu")["cpu"] is None

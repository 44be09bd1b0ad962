"""Every public entry point walked through a table of bad inputs: each gets a clear error (its type and a message
naming the problem) or an explicit, documented status; never a silent wrong answer, a crash or a hang.

Rows: shapes, empty batches and zero widths, dtypes, devices, NaN/Inf, option ranges (tol, max_iter, alpha, beta,
m, lam, check_every, policies), misbehaving f, the layers' constructor arguments, the Lipschitz and Jacobian tools
and the command line. Divergent layers are in test_divergence.py; strides and stride 0 in the per-op tests
(test_any_strides); training across processes in test_distributed.py.
"""
import copy
import io
import math
import pickle

import pytest
import torch

import deqkern
from deqkern import jacobian, lipschitz
from deqkern.nn.certified import positive_concave_fixed_point

import kit

NAN = float("nan")
W4 = 0.5 * torch.eye(4)
C2 = torch.ones(2, 4)


def tanh_f(z):
    return torch.tanh(0.5 * z + 1.0)


def misbehaving(kind):
    """An f that behaves for two evaluations, then returns something else at the third."""
    calls = []

    def f(z):
        calls.append(1)
        if len(calls) < 3:
            return tanh_f(z)
        return {"int": lambda: tanh_f(z).to(torch.int64), "float64": lambda: tanh_f(z).double(),
                "list": lambda: [tanh_f(z)], "shape": lambda: tanh_f(z)[:, :2],
                "nan": lambda: torch.full_like(z, NAN)}[kind]()

    return f


# (id, call, expected exception, message regex). Every call must raise exactly that.
ERRORS = [
    # ------------------------------------------------ fixed_point_dense
    ("fpd-W-not-square", lambda: deqkern.fixed_point_dense(torch.ones(3, 4), C2), ValueError, "square"),
    ("fpd-W-3d", lambda: deqkern.fixed_point_dense(torch.eye(3)[None], C2), ValueError, "square"),
    ("fpd-zero-width", lambda: deqkern.fixed_point_dense(torch.zeros(0, 0), torch.zeros(2, 0)), ValueError, "width"),
    ("fpd-c-width", lambda: deqkern.fixed_point_dense(W4, torch.ones(2, 5)), ValueError, r"\(batch, 4\)"),
    ("fpd-c-1d", lambda: deqkern.fixed_point_dense(W4, torch.ones(4)), ValueError, r"\(batch, 4\)"),
    ("fpd-int", lambda: deqkern.fixed_point_dense(torch.eye(4, dtype=torch.int64), C2), TypeError, "float32"),
    ("fpd-complex", lambda: deqkern.fixed_point_dense(W4.cfloat(), C2.cfloat()), TypeError, "float32 or float64"),
    ("fpd-half-with-float", lambda: deqkern.fixed_point_dense(W4.half(), C2), TypeError, "one dtype"),
    ("fpd-mixed-dtype", lambda: deqkern.fixed_point_dense(W4, C2.double()), TypeError, "one dtype"),
    ("fpd-mixed-device", lambda: deqkern.fixed_point_dense(W4, C2.to("meta")), ValueError, "one device"),
    ("fpd-list", lambda: deqkern.fixed_point_dense(W4, [[1.0] * 4]), TypeError, "torch.Tensor"),
    ("fpd-z0-shape", lambda: deqkern.fixed_point_dense(W4, C2, z0=torch.ones(3, 4)), ValueError, "z0"),
    ("fpd-nan-W", lambda: deqkern.fixed_point_dense(W4.clone().fill_diagonal_(NAN), C2), ValueError, "W contain"),
    ("fpd-inf-c", lambda: deqkern.fixed_point_dense(W4, C2 * float("inf")), ValueError, "c contain"),
    ("fpd-nan-z0", lambda: deqkern.fixed_point_dense(W4, C2, z0=C2 * NAN), ValueError, "z0 contain"),
    ("fpd-tol-0", lambda: deqkern.fixed_point_dense(W4, C2, tol=0.0), ValueError, "tol"),
    ("fpd-tol-nan", lambda: deqkern.fixed_point_dense(W4, C2, tol=NAN), ValueError, "tol"),
    ("fpd-tol-bool", lambda: deqkern.fixed_point_dense(W4, C2, tol=True), ValueError, "tol"),
    ("fpd-max-iter-0", lambda: deqkern.fixed_point_dense(W4, C2, max_iter=0), ValueError, "max_iter"),
    ("fpd-max-iter-float", lambda: deqkern.fixed_point_dense(W4, C2, max_iter=2.5), ValueError, "max_iter"),
    ("fpd-max-iter-bool", lambda: deqkern.fixed_point_dense(W4, C2, max_iter=True), ValueError, "max_iter"),
    ("fpd-alpha-0", lambda: deqkern.fixed_point_dense(W4, C2, alpha=0.0), ValueError, "alpha"),
    ("fpd-alpha-big", lambda: deqkern.fixed_point_dense(W4, C2, alpha=1.5), ValueError, "alpha"),
    ("fpd-method", lambda: deqkern.fixed_point_dense(W4, C2, method="newton"), ValueError, "unknown method"),
    ("fpd-m-0", lambda: deqkern.fixed_point_dense(W4, C2, method="anderson", m=0), ValueError, "m"),
    ("fpd-m-17", lambda: deqkern.fixed_point_dense(W4, C2, method="anderson", m=17), ValueError, "m"),
    ("fpd-beta", lambda: deqkern.fixed_point_dense(W4, C2, method="anderson", beta=0.0), ValueError, "beta"),
    ("fpd-lam", lambda: deqkern.fixed_point_dense(W4, C2, method="anderson", lam=-1.0), ValueError, "lam"),
    ("fpd-activation", lambda: deqkern.fixed_point_dense(W4, C2, activation="gelu"), ValueError, "activation"),
    ("fpd-backend", lambda: deqkern.fixed_point_dense(W4, C2, backend="tpu"), ValueError, "backend"),
    ("fpd-backend-device", lambda: deqkern.fixed_point_dense(W4, C2, backend="cuda"), ValueError, "CUDA"),
    ("fpd-policy", lambda: deqkern.fixed_point_dense(W4, C2, on_nonconvergence="silent"), ValueError, "on_nonconv"),
    ("fpd-backward-tol", lambda: deqkern.fixed_point_dense(W4, C2, backward_tol=-1.0), ValueError, "backward_tol"),
    # ------------------------------------------------ solve
    ("solve-f", lambda: deqkern.solve(3, C2), TypeError, "callable"),
    ("solve-z0-list", lambda: deqkern.solve(tanh_f, [1.0]), TypeError, "torch.Tensor"),
    ("solve-z0-int", lambda: deqkern.solve(tanh_f, torch.ones(2, 3, dtype=torch.int64)), TypeError, "z0"),
    ("solve-z0-scalar", lambda: deqkern.solve(tanh_f, torch.tensor(1.0)), ValueError, "batch dimension"),
    ("solve-zero-width", lambda: deqkern.solve(tanh_f, torch.ones(2, 0)), ValueError, "at least one entry"),
    ("solve-z0-nan", lambda: deqkern.solve(tanh_f, C2 * NAN), ValueError, "z0 contain"),
    ("solve-method", lambda: deqkern.solve(tanh_f, C2, method="newton"), ValueError, "unknown method"),
    ("solve-m-17", lambda: deqkern.solve(tanh_f, C2, m=17), ValueError, "m"),
    ("solve-m-bool", lambda: deqkern.solve(tanh_f, C2, m=True), ValueError, "m"),
    ("solve-beta", lambda: deqkern.solve(tanh_f, C2, beta=1.5), ValueError, "beta"),
    ("solve-lam", lambda: deqkern.solve(tanh_f, C2, lam=NAN), ValueError, "lam"),
    ("solve-tol-bool", lambda: deqkern.solve(tanh_f, C2, tol=True), ValueError, "tol"),
    ("solve-max-iter", lambda: deqkern.solve(tanh_f, C2, max_iter=0), ValueError, "max_iter"),
    ("solve-check-every", lambda: deqkern.solve(tanh_f, C2, check_every=0), ValueError, "check_every"),
    ("solve-check-every-bool", lambda: deqkern.solve(tanh_f, C2, check_every=True), ValueError, "check_every"),
    ("solve-policy", lambda: deqkern.solve(tanh_f, C2, on_nonconvergence="never"), ValueError, "on_nonconv"),
    ("solve-unknown-option", lambda: deqkern.solve(tanh_f, C2, tau=0.5), TypeError, "tau"),
    ("solve-f-returns-int-later", lambda: deqkern.solve(misbehaving("int"), C2), TypeError, "evaluation 3"),
    ("solve-f-returns-float64-later", lambda: deqkern.solve(misbehaving("float64"), C2), TypeError, "evaluation 3"),
    ("solve-f-returns-list-later", lambda: deqkern.solve(misbehaving("list"), C2), TypeError, "evaluation 3"),
    ("solve-f-returns-shape-later", lambda: deqkern.solve(misbehaving("shape"), C2), ValueError, "evaluation 3"),
    ("solve-f-returns-nan-later", lambda: deqkern.solve(misbehaving("nan"), C2), FloatingPointError, "overflowed"),
    ("broyden-f-returns-int-later", lambda: deqkern.solve(misbehaving("int"), C2, method="broyden"), TypeError,
     "evaluation"),
    # ------------------------------------------------ layers
    ("DEQLinear-hidden-0", lambda: deqkern.nn.DEQLinear(4, 0), ValueError, "hidden_features"),
    ("DEQLinear-in-0", lambda: deqkern.nn.DEQLinear(0, 4), ValueError, "in_features"),
    ("DEQLinear-activation", lambda: deqkern.nn.DEQLinear(4, 4, activation="gelu")(torch.ones(2, 4)), ValueError,
     "activation"),
    ("pcDEQ-hidden-0", lambda: deqkern.nn.PositiveConcaveDEQ(4, 0), ValueError, "hidden_features"),
    ("pcDEQ-activation", lambda: deqkern.nn.PositiveConcaveDEQ(4, 4, activation="relu"), ValueError,
     "not positive and concave"),
    ("linf-hidden-0", lambda: deqkern.nn.LinfContractiveDEQ(4, 0), ValueError, "hidden_features"),
    ("linf-mu", lambda: deqkern.nn.LinfContractiveDEQ(4, 4, mu=1.0), ValueError, "mu"),
    ("lipschitz-hidden-0", lambda: deqkern.nn.LipschitzDEQ(4, 0), ValueError, "hidden_features"),
    ("lipschitz-gamma", lambda: deqkern.nn.LipschitzDEQ(4, 4, gamma=1.0), ValueError, "gamma"),
    ("DEQ-f", lambda: deqkern.nn.DEQ(3), TypeError, "callable"),
    ("DEQ-method", lambda: deqkern.nn.DEQ(lambda z, x: z, method="newton"), ValueError, "method"),
    ("DEQ-backward", lambda: deqkern.nn.DEQ(lambda z, x: z, backward="adjoint"), ValueError, "backward"),
    ("DEQ-option", lambda: deqkern.nn.DEQ(lambda z, x: z, solver_options=dict(tolerance=1e-3)), TypeError, "tolerance"),
    ("DEQ-tol-bool", lambda: deqkern.nn.DEQ(lambda z, x: z, solver_options=dict(tol=True)), ValueError, "tol"),
    ("DEQ-phantom", lambda: deqkern.nn.DEQ(lambda z, x: z, phantom_steps=0), ValueError, "phantom_steps"),
    ("DEQ-f-dtype", lambda: deqkern.nn.DEQ(lambda z, x: (0.5 * z + x).double())(torch.ones(2, 3)), TypeError,
     "dtype"),
    ("pc-fixed-point-negative-W", lambda: positive_concave_fixed_point(-W4, C2), ValueError, "nonnegative"),
    ("pc-fixed-point-c", lambda: positive_concave_fixed_point(W4, -C2), ValueError, "injection c"),
    # ------------------------------------------------ Lipschitz and Jacobian tools
    ("spectral-norm-1d", lambda: lipschitz.spectral_norm(torch.ones(3)), ValueError, "2-D"),
    ("spectral-norm-empty", lambda: lipschitz.spectral_norm(torch.ones(0, 3)), ValueError, "non-empty"),
    ("spectral-norm-int", lambda: lipschitz.spectral_norm(torch.ones(3, 3, dtype=torch.int32)), TypeError, "float32"),
    ("spectral-norm-nan", lambda: lipschitz.spectral_norm(torch.full((3, 3), NAN)), ValueError, "NaN"),
    ("spectral-norm-u0-zero", lambda: lipschitz.spectral_norm(torch.eye(3), u0=torch.zeros(3)), ValueError,
     "nonzero"),
    ("spectral-norm-tol-bool", lambda: lipschitz.spectral_norm(torch.eye(3), tol=True), ValueError, "tol"),
    ("spectral-norm-n-iter", lambda: lipschitz.spectral_norm(torch.eye(3), max_iter=0), ValueError, "max_iter"),
    ("power-iteration-mode", lambda: lipschitz.power_iteration(torch.eye(3), torch.ones(1, 3), mode="eig"),
     ValueError, "mode"),
    ("power-iteration-shift", lambda: lipschitz.power_iteration(torch.eye(3), torch.ones(1, 3), shift=math.inf),
     ValueError, "shift"),
    ("one-sided-l2-square", lambda: lipschitz.one_sided_l2(torch.ones(3, 4)), ValueError, "square"),
    ("one-sided-linf-weights", lambda: lipschitz.one_sided_linf(torch.eye(3), weights=torch.zeros(3)), ValueError,
     "> 0"),
    ("linf-norm-inf", lambda: lipschitz.linf_norm(torch.full((2, 2), math.inf)), ValueError, "NaN or Inf"),
    ("jacobian-reg-f", lambda: deqkern.jacobian_reg(3, C2), TypeError, "callable"),
    ("jacobian-reg-samples", lambda: deqkern.jacobian_reg(lambda z, x: z, C2, n_samples=0), ValueError, "n_samples"),
    ("jacobian-reg-probe", lambda: deqkern.jacobian_reg(lambda z, x: z, C2, probe="uniform"), ValueError, "probe"),
    ("jacobian-norm-kind", lambda: jacobian.jacobian_norm(W4, C2, C2, kind="frobenius", activation="tanh"),
     ValueError, "kind"),
    ("jacobian-norm-nan", lambda: jacobian.jacobian_norm(W4, C2 * NAN, C2, activation="tanh"), ValueError, "z"),
    ("jacobian-frobenius-W", lambda: jacobian.dense_jacobian_frobenius_sq(torch.ones(3, 4), C2, activation="tanh"),
     ValueError, "square"),
]


@pytest.mark.parametrize("call,error,message", [pytest.param(c, e, m, id=i) for i, c, e, m in ERRORS])
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------- documented statuses instead of errors
def test_empty_batches_return_empty_results_everywhere():
    for method in ("picard", "anderson"):
        z, info = deqkern.fixed_point_dense(W4, torch.ones(0, 4), method=method)
        assert z.shape == (0, 4) and info.iterations.shape == info.converged.shape == (0,)
    for method in ("anderson", "picard", "broyden"):
        z, info = deqkern.solve(tanh_f, torch.ones(0, 3, 2), method=method, return_trace=True)
        assert z.shape == (0, 3, 2) and info.iterations.shape == (0,) and info.trace.shape == (0, 0)
    for layer in (deqkern.nn.DEQLinear(4, 5), deqkern.nn.PositiveConcaveDEQ(4, 5), deqkern.nn.LinfContractiveDEQ(4, 5),
                  deqkern.nn.LipschitzDEQ(4, 5)):
        x = torch.ones(0, 4, requires_grad=True)
        z = layer(x)
        z.sum().backward()
        assert z.shape == (0, 5) and x.grad.shape == (0, 4)
    lin = torch.nn.Linear(4, 4)
    for solver in ("anderson", "picard", "broyden"):
        for backward in ("ift", "phantom", "one_step"):
            for z_shape in (None, (4,)):
                x = torch.ones(0, 4, requires_grad=True)
                z = deqkern.nn.DEQ(lambda z, x: torch.tanh(lin(z)) + x, method=solver, backward=backward,
                                   z_shape=z_shape)(x)
                z.sum().backward()
                assert z.shape == (0, 4)
    assert lipschitz.power_iteration(torch.eye(3), torch.ones(0, 3)).value.shape == (0,)


def test_empty_batches_on_every_backend(backend):
    device = kit.device_of(backend)
    for method in ("picard", "anderson"):
        W = (0.5 * torch.eye(4)).to(device).requires_grad_(True)
        z, info = deqkern.fixed_point_dense(W, torch.ones(0, 4, device=device), method=method, backend=backend)
        z.sum().backward()
        assert z.shape == (0, 4) and info.converged.shape == (0,) and W.grad.shape == (4, 4)
    z, info = deqkern.solve(tanh_f, torch.ones(0, 3, device=device), backend=backend)
    assert z.shape == (0, 3)
    assert lipschitz.power_iteration(torch.eye(3, device=device), torch.ones(0, 3, device=device),
                                     backend=backend).value.shape == (0,)


def test_the_trace_grows_with_the_iterations_actually_run():
    """return_trace with a huge max_iter allocates per iteration run, not max_iter rows up front."""
    z, info = deqkern.solve(tanh_f, torch.zeros(2, 3), tol=1e-6, max_iter=10**9, return_trace=True)
    assert info.trace.shape == (int(info.iterations.max()), 2)


def test_user_errors_inside_f_propagate_unchanged():
    class Boom(Exception):
        pass

    error = Boom("mine")

    def f(z, x):
        raise error

    for call in (lambda: deqkern.solve(lambda z: f(z, None), C2), lambda: deqkern.nn.DEQ(f)(C2),
                 lambda: deqkern.nn.DEQ(f, z_shape=(4,))(C2)):
        with pytest.raises(Boom) as raised:
            call()
        assert raised.value is error


LAYERS = [lambda **kw: deqkern.nn.DEQLinear(4, 5, **kw), lambda **kw: deqkern.nn.PositiveConcaveDEQ(4, 5, **kw),
          lambda **kw: deqkern.nn.LinfContractiveDEQ(4, 5, **kw), lambda **kw: deqkern.nn.LipschitzDEQ(4, 5, **kw)]


@pytest.mark.parametrize("make", LAYERS, ids=["DEQLinear", "PositiveConcaveDEQ", "LinfContractiveDEQ", "LipschitzDEQ"])
def test_every_layer_pickles_saves_copies_and_builds_on_meta(make):
    layer = make()
    x = torch.randn(3, 4)
    layer.eval()
    z = layer(x)
    _ = getattr(layer, "weight")  # LipschitzDEQ caches its converged power iteration here (weak references)
    for copied in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(copied(x), z)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), z)
    meta = make(device="meta")
    assert all(p.is_meta for p in meta.parameters())


def test_the_command_line_validates_its_arguments():
    from deqkern.apps.demo import parse_args

    for bad in (["--epochs", "0"], ["--epochs", "-1"], ["--batch-size", "0"], ["--lr", "0"], ["--epochs", "two"]):
        with pytest.raises(SystemExit) as raised:
            parse_args(bad)
        assert raised.value.code == 2


class _TanhMap(torch.nn.Module):
    def __init__(self, d=3):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


@pytest.mark.parametrize("make", [lambda: deqkern.nn.DEQLinear(3, 5), lambda: deqkern.nn.LipschitzDEQ(3, 5),
                                  lambda: deqkern.nn.DEQ(_TanhMap())], ids=["DEQLinear", "LipschitzDEQ", "DEQ"])
def test_a_non_finite_x_is_named_as_the_users_x_with_its_samples(make):
    x = torch.randn(4, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(samples \[2\]\)"):
        make()(x)


def test_a_non_finite_parameter_of_f_is_named():
    f = _TanhMap()
    with torch.no_grad():
        f.lin.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="f's parameter 'lin.weight' contains NaN or Inf"):
        deqkern.nn.DEQ(f)(torch.randn(4, 3))


def test_divergence_gets_advice_that_fits_divergence():
    with pytest.raises(FloatingPointError, match="diverged: use a contractive f") as raised:
        deqkern.nn.DEQ(lambda z, x: 3 * z + x + 1, method="picard", solver_options=dict(max_iter=300))(
            torch.randn(2, 3))
    assert "max_iter" not in str(raised.value)


def test_a_one_dimensional_input_asks_for_a_batch_dimension():
    with pytest.raises(ValueError, match="no batch dimension"):
        deqkern.nn.DEQ(lambda z, x: 0.5 * z + x)(torch.randn(16))
    z = deqkern.nn.DEQ(lambda z, x: 0.5 * z + x, z_shape=(16,))(torch.randn(1, 16))  # what the error suggests works
    assert z.shape == (1, 16)

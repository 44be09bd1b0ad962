"""deqkern.solve and nn.DEQ under torch.compile(fullgraph=True) and torch.export: the traced solve is one
torch.while_loop (deqkern/solvers/traced.py). Few and small: each compile costs seconds on CI's two cores."""
import pytest
import torch

import deqkern
from deqkern.reference import anderson_step_ref
from deqkern.solvers.traced import anderson_step_traced

F64 = torch.float64
TIGHT = dict(tol=1e-10, max_iter=200)


class ConvCell(torch.nn.Module):
    def __init__(self, channels=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, dtype=F64)
        with torch.no_grad():
            self.conv.weight.mul_(0.5)

    def forward(self, z, x):
        return torch.tanh(self.conv(z) + x)


def _inputs(batch=4, seed=0):
    return torch.randn(batch, 3, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [0, 2, 5, 9])
def test_the_traced_step_is_the_specification(k):
    """anderson_step_traced (k a tensor, functional) against anderson_step_ref (k an int, in place), float64, with
    a sample already stopped and the history partly filled."""
    g = torch.Generator().manual_seed(k)
    B, m, n = 3, 4, 6
    X, G = torch.randn(B, m, n, dtype=F64, generator=g), torch.randn(B, m, n, dtype=F64, generator=g)
    x, fx = torch.randn(B, n, dtype=F64, generator=g), torch.randn(B, n, dtype=F64, generator=g)
    z_best = torch.randn(B, n, dtype=F64, generator=g)
    residual_best = torch.tensor([float("nan"), 0.5, 10.0], dtype=F64)
    residual = torch.rand(B, dtype=F64, generator=g)
    active = torch.tensor([True, True, False])
    iterations = torch.tensor([k, k, 1], dtype=torch.int32)
    expected = [t.clone() for t in (X, G, x, fx, x, z_best, residual_best, residual, active, iterations)]
    H = torch.zeros(B, m, m, dtype=F64)
    X_e, G_e, x_e, fx_e, x_next_e, z_best_e, rb_e, r_e, active_e, it_e = expected
    anderson_step_ref(X_e, G_e, H, x_e, fx_e, x_next_e, z_best_e, rb_e, r_e, active_e, it_e, k, 1.0, 1e-4, 1e-8)
    got = anderson_step_traced(torch.tensor(k), x, fx, X, G, z_best, residual_best, residual, active, iterations,
                               beta=1.0, lam=1e-4, tol=1e-8)
    filled = min(k + 1, m)  # the specification's history beyond the filled slots is never read
    for name, out, ref in zip(("x_next", "X_hist", "G_hist", "z_best", "residual_best", "residual", "active",
                               "iterations"), got, (x_next_e, X_e, G_e, z_best_e, rb_e, r_e, active_e, it_e)):
        if name in ("X_hist", "G_hist"):
            out, ref = out[:, :filled], ref[:, :filled]
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_solve_compiles_to_one_graph_that_equals_eager(method):
    cell, x = ConvCell(), _inputs()

    def run(x):
        return deqkern.solve(lambda z: cell(z, x), torch.zeros_like(x), method=method, **TIGHT)

    explanation = torch._dynamo.explain(run)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    z_eager, info_eager = run(x)
    z, info = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(z, z_eager, rtol=1e-10, atol=1e-10)
    assert torch.equal(info.iterations, info_eager.iterations) and bool(info.converged.all())


def test_phantom_training_compiles_fullgraph_and_equals_eager():
    torch.manual_seed(0)
    deq = deqkern.nn.DEQ(ConvCell(), backward="phantom", solver_options=TIGHT)
    x = _inputs()
    deq(x).square().sum().backward()
    expected = [p.grad.clone() for p in deq.parameters()]
    deq.zero_grad()
    torch.compile(lambda x: deq(x).square().sum(), fullgraph=True, backend="aot_eager")(x).backward()
    for p, g in zip(deq.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-10)


def test_export_with_a_dynamic_batch_and_one_recompile_for_a_new_batch_size():
    deq = deqkern.nn.DEQ(ConvCell(), solver_options=TIGHT).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(deq, (_inputs(4),), dynamic_shapes=({0: batch},))
    for size in (2, 7, 16):
        x = _inputs(size, seed=size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), deq(x), rtol=1e-8, atol=1e-9)

    compilations = []

    def counting_backend(graph_module, example_inputs):
        compilations.append(len(example_inputs))
        return graph_module.forward

    compiled = torch.compile(deq, fullgraph=True, backend=counting_backend)
    with torch.no_grad():
        for size in (3, 5, 8):
            compiled(_inputs(size, seed=size))
    assert len(compilations) <= 2  # the first batch size, then one dynamic graph for every other


def test_what_a_traced_solve_cannot_do_is_refused_by_name():
    x = _inputs(2)
    with pytest.raises(Exception, match="return_trace=True is not available under torch.compile"):
        torch.compile(lambda x: deqkern.solve(lambda z: 0.5 * z + x, torch.zeros_like(x), return_trace=True)[0],
                      fullgraph=True, backend="eager")(x)
    with pytest.raises(ValueError, match="loop"):
        deqkern.solve(lambda z: 0.5 * z + x, torch.zeros_like(x), loop="while")


def _compiled_fullgraph_equals_eager(layer, x, rtol, check):
    """layer(x).square().sum() backpropagated eagerly and through torch.compile(fullgraph=True) of a deep copy, in
    train then eval mode: the parameters' gradients agree to rtol (atol 1e-12) and check(layer, twin) holds."""
    import copy

    twin = copy.deepcopy(layer)
    compiled = torch.compile(lambda x: twin(x).square().sum(), fullgraph=True, backend="aot_eager")
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        twin.train(mode == "train")
        layer(x).square().sum().backward()
        compiled(x).backward()
        check(layer, twin)
        for p, q in zip(layer.parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=1e-12)
        layer.zero_grad()
        twin.zero_grad()


def test_lipschitz_deq_compiles_fullgraph_with_its_proof_as_one_op():
    """LipschitzDEQ proves ||W||_2 at every forward with host decisions (a Cholesky ladder): traced, the proof is one
    opaque op (deqkern::proven_spectral_bound), so the layer compiles with fullgraph=True, train and eval, and equals
    eager exactly, the bound holding by SVD."""
    torch.manual_seed(0)
    layer = deqkern.nn.LipschitzDEQ(4, 8, tol=1e-10, max_iter=300, dtype=F64)

    def same_state(layer, twin):
        assert torch.equal(twin.power_u, layer.power_u)
        assert torch.linalg.matrix_norm(twin.last_weight, ord=2).item() <= 0.9 * (1 + 1e-12)

    _compiled_fullgraph_equals_eager(layer, torch.randn(3, 4, dtype=F64), rtol=1e-12, check=same_state)


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_linf_contractive_deq_compiles_fullgraph_with_its_averaging_as_a_tensor(method):
    """LinfContractiveDEQ's averaging alpha* = 1 / (1 - min(min_i a_ii, 0)) is a function of its weight: traced, it
    stays a 0-dim tensor that the solve op reads (Picard's damping: deqkern::fixed_point_dense_tensor_alpha;
    Anderson's mixing beta alpha*: deqkern::fixed_point_dense_anderson_tensor_beta), so the layer compiles with
    fullgraph=True, train and eval, and equals eager (the same fused solve)."""
    torch.manual_seed(0)
    layer = deqkern.nn.LinfContractiveDEQ(4, 8, tol=1e-10, max_iter=300, method=method, dtype=F64)
    with torch.no_grad():
        layer.weight_raw.mul_(5.0)  # a negative diagonal: alpha* < 1, so the averaging is exercised
    assert layer.averaging_from(layer.weight) < 0.9

    def same_iterations(layer, twin):  # the same averaged iteration
        assert torch.equal(twin.last_info.iterations, layer.last_info.iterations)

    _compiled_fullgraph_equals_eager(layer, torch.randn(3, 4, dtype=F64), rtol=1e-10, check=same_iterations)


def test_tensor_option_ops_pass_opcheck_and_equal_the_float_option_solve():
    g = torch.Generator().manual_seed(2)
    W = 0.3 * torch.randn(5, 5, generator=g, dtype=F64)
    c = torch.randn(3, 5, generator=g, dtype=F64)
    alpha = torch.tensor(0.7, dtype=F64)
    args = (W, c, torch.zeros_like(c), "tanh", alpha, 1e-10, 200, "cpu")
    torch.library.opcheck(torch.ops.deqkern.fixed_point_dense_tensor_alpha.default, args)
    z, _ = deqkern.fixed_point_dense(W, c, alpha=alpha, tol=1e-10, max_iter=200)
    z_float, _ = deqkern.fixed_point_dense(W, c, alpha=0.7, tol=1e-10, max_iter=200)
    assert torch.equal(z, z_float)
    backward_args = (W, c, z, torch.ones_like(z), "tanh", alpha, 1e-10, 200, 0.3, "cpu")  # with a Jacobian penalty
    torch.library.opcheck(torch.ops.deqkern.fixed_point_dense_tensor_alpha_backward.default, backward_args)
    with pytest.raises(ValueError, match="0-dim"):
        deqkern.fixed_point_dense(W, c, alpha=torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="alpha"):
        deqkern.fixed_point_dense(W, c, alpha=torch.tensor(1.5, dtype=F64))
    with pytest.raises(ValueError, match="Picard"):
        deqkern.fixed_point_dense(W, c, alpha=alpha, method="anderson")
    # Anderson's mixing beta, likewise
    beta = torch.tensor(0.7, dtype=F64)
    anderson = dict(method="anderson", m=3, tol=1e-10, max_iter=200)
    torch.library.opcheck(torch.ops.deqkern.fixed_point_dense_anderson_tensor_beta.default,
                          (W, c, torch.zeros_like(c), "tanh", 3, beta, 0.0, 1e-10, 200, "cpu"))
    z, _ = deqkern.fixed_point_dense(W, c, beta=beta, **anderson)
    z_float, _ = deqkern.fixed_point_dense(W, c, beta=0.7, **anderson)
    assert torch.equal(z, z_float)
    torch.library.opcheck(torch.ops.deqkern.fixed_point_dense_anderson_tensor_beta_backward.default,
                          (W, c, z, torch.ones_like(z), "tanh", 3, beta, 0.0, 1e-10, 200, 0.3, "cpu"))
    W_grad = W.clone().requires_grad_()
    (grad,) = torch.autograd.grad(deqkern.fixed_point_dense(W_grad, c, beta=beta, **anderson)[0].sum(), W_grad)
    (grad_float,) = torch.autograd.grad(deqkern.fixed_point_dense(W_grad, c, beta=0.7, **anderson)[0].sum(), W_grad)
    assert torch.equal(grad, grad_float)
    with pytest.raises(ValueError, match="beta"):
        deqkern.fixed_point_dense(W, c, beta=torch.tensor(0.0, dtype=F64), method="anderson")
    with pytest.raises(ValueError, match="Anderson"):
        deqkern.fixed_point_dense(W, c, beta=beta)


def test_conv_norm_proof_runs_eagerly_under_default_compile():
    """conv_operator_norm_upper_bound reads the host (its maximising frequency): under the default torch.compile it
    runs behind a graph break (it failed inside Dynamo: every layer that proves a conv's norm, LipschitzConvDEQ and
    LipschitzMultiscaleDEQ, could not be compiled), its value and gradient those of eager."""
    torch.manual_seed(0)
    layer = deqkern.nn.LipschitzConvDEQ(1, 3, tol=1e-10, max_iter=200, dtype=F64)
    x = torch.randn(2, 1, 6, 6, dtype=F64)
    eager = layer(x).square().sum()
    (grad,) = torch.autograd.grad(eager, layer.weight_raw)
    compiled = torch.compile(lambda x: layer(x).square().sum(), backend="eager")(x)
    (compiled_grad,) = torch.autograd.grad(compiled, layer.weight_raw)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compiled_grad, grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("refine", [True, False])
def test_proven_spectral_bound_op_passes_opcheck_and_is_a_bound(refine):
    g = torch.Generator().manual_seed(1)
    W, u = torch.randn(6, 6, dtype=F64, generator=g), torch.randn(6, dtype=F64, generator=g)
    u = u / u.norm()
    torch.library.opcheck(torch.ops.deqkern.proven_spectral_bound.default, (W, u, refine))
    value, vector = torch.ops.deqkern.proven_spectral_bound(W, u, refine)
    assert torch.linalg.svdvals(W)[0].item() <= value.item() and abs(vector.norm().item() - 1) < 1e-12

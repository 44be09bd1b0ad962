"""States made of several tensors (a multiscale DEQ's one state per resolution): deqkern.solve and nn.DEQ with tuple
and list states, against the same problem written by hand on one flat tensor and against unrolled autograd."""
import pytest
import torch

import deqkern

DT = torch.float64
B = 3
SHAPES = ((2, 3, 3), (4,))  # a 2-channel 3x3 map and a 4-vector: 22 numbers per sample
N = sum(torch.Size(s).numel() for s in SHAPES)
TIGHT = dict(tol=1e-12, max_iter=400)


def _coupled_map(seed=0):
    """f((hi, lo), x) = (tanh(A [hi; lo] + x)[:18] as (2, 3, 3), tanh(...)[18:]): one dense contraction (||A|| = 0.6)
    written on the two tensors, so that the flat problem z = tanh(z A^T + x) is its exact twin."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, N, generator=g, dtype=DT)
    A = torch.nn.Parameter(0.6 * A / torch.linalg.matrix_norm(A, 2))

    def flat(z, x):
        return torch.tanh(z @ A.T + x)

    def f(state, x):
        hi, lo = state
        out = flat(torch.cat([hi.reshape(hi.shape[0], -1), lo], dim=1), x)
        return type(state)((out[:, :18].reshape(-1, *SHAPES[0]), out[:, 18:]))

    x = torch.randn(B, N, generator=g, dtype=DT)
    return f, flat, A, x


def _zeros(kind=tuple):
    return kind(torch.zeros(B, *s, dtype=DT) for s in SHAPES)


def _flatten(state):
    return torch.cat([t.reshape(B, -1) for t in state], dim=1)


@pytest.mark.parametrize("method", ["anderson", "picard", "broyden"])
@pytest.mark.parametrize("kind", [tuple, list])
def test_solve_takes_a_state_of_several_tensors(method, kind):
    f, flat, _, x = _coupled_map()
    with torch.no_grad():
        z, info = deqkern.solve(lambda s: f(s, x), _zeros(kind), method=method, **TIGHT)
        z_flat, info_flat = deqkern.solve(lambda v: flat(v, x), torch.zeros(B, N, dtype=DT), method=method, **TIGHT)
        long = torch.zeros(B, N, dtype=DT)
        for _ in range(300):
            long = flat(long, x)
    assert type(z) is kind and [tuple(t.shape) for t in z] == [(B, *s) for s in SHAPES]
    torch.testing.assert_close(_flatten(z), z_flat, rtol=0, atol=0)  # the same solve, bit for bit
    assert torch.equal(info.iterations, info_flat.iterations) and info.converged.all()
    torch.testing.assert_close(_flatten(z), long, rtol=0, atol=1e-9)


def test_solve_warm_starts_from_a_structured_state_and_checks_it():
    f, _, _, x = _coupled_map()
    with torch.no_grad():
        z, info = deqkern.solve(lambda s: f(s, x), _zeros(), **TIGHT)
        again, info_again = deqkern.solve(lambda s: f(s, x), z, **TIGHT)
    assert int(info_again.iterations.max()) <= 2 < int(info.iterations.max())
    torch.testing.assert_close(_flatten(again), _flatten(z), rtol=0, atol=1e-11)


def _unrolled(f, x, steps=300):
    z = _zeros()
    for _ in range(steps):
        z = f(z, x)
    return z


@pytest.mark.parametrize("method", ["anderson", "picard", "broyden"])
def test_deq_ift_gradients_of_a_tuple_state_match_unrolled_autograd(method):
    f, _, A, x = _coupled_map(seed=1)
    x = x.requires_grad_()
    deq = deqkern.nn.DEQ(f, method=method, solver_options=TIGHT,
                         backward_options=dict(method=method, tol=1e-12, max_iter=400), z_shape=SHAPES)
    z = deq(x)
    assert isinstance(z, tuple) and [tuple(t.shape) for t in z] == [(B, *s) for s in SHAPES]
    w = [torch.randn_like(t) for t in z]
    loss = sum((a * b).sum() for a, b in zip(z, w))
    grads = torch.autograd.grad(loss, (x, A))
    z_ref = _unrolled(f, x)
    ref = torch.autograd.grad(sum((a * b).sum() for a, b in zip(z_ref, w)), (x, A))
    for a, r in zip(z, z_ref):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-9)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-8)
    assert deq.last_info.converged.all() and deq.last_info.backward.converged.all()


@pytest.mark.parametrize("backward", ["phantom", "one_step"])
def test_deq_phantom_and_one_step_on_a_list_state_equal_the_flat_problem(backward):
    f, flat, A, x = _coupled_map(seed=2)
    x = x.requires_grad_()
    opts = dict(backward=backward, solver_options=TIGHT)
    z = deqkern.nn.DEQ(f, **opts)(x, z0=_zeros(list))
    assert type(z) is list
    g = torch.autograd.grad(_flatten(z).square().sum(), (x, A))
    z_flat = deqkern.nn.DEQ(flat, **opts)(x, z0=torch.zeros(B, N, dtype=DT))
    g_flat = torch.autograd.grad(z_flat.square().sum(), (x, A))
    torch.testing.assert_close(_flatten(z), z_flat, rtol=0, atol=1e-12)
    for a, b in zip(g, g_flat):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_deq_with_an_input_per_branch_and_jacobian_regularisation():
    """x a tuple too (one input per branch): the default state is zeros_like of each; jac_reg works on the state."""
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(8, 8, dtype=DT)

    def f(state, x):
        a, b = state
        return (torch.tanh(0.3 * lin(a) + 0.2 * b + x[0]), torch.tanh(0.3 * a + x[1]))

    x = (torch.randn(B, 8, generator=g, dtype=DT), torch.randn(B, 8, generator=g, dtype=DT))
    deq = deqkern.nn.DEQ(f, solver_options=TIGHT, jac_reg=1.0).train()
    z = deq(x)
    z[0].sum().backward()
    assert deq.last_jac_loss is not None and deq.last_jac_loss > 0
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


BAD_STATES = [
    ("empty", lambda: (), ValueError, "empty tuple"),
    ("batch", lambda: (torch.zeros(3, 2), torch.zeros(4, 2)), ValueError, "batch size 4"),
    ("dtype", lambda: (torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.float64)), TypeError, "one dtype"),
    ("device", lambda: (torch.zeros(3, 2), torch.zeros(3, 2, device="meta")), ValueError, "one device"),
    ("not-a-tensor", lambda: (torch.zeros(3, 2), [1.0]), TypeError, r"z0\[1\] must be a torch.Tensor"),
    ("no-batch-dim", lambda: (torch.zeros(3, 2), torch.tensor(1.0)), ValueError, "batch dimension"),
]


@pytest.mark.parametrize("make, error, match", [pytest.param(m, e, r, id=i) for i, m, e, r in BAD_STATES])
def test_bad_structured_states_get_a_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        deqkern.solve(lambda s: s, make())
    with pytest.raises(error, match=match):
        deqkern.nn.DEQ(lambda s, x: s)(torch.zeros(3, 2), z0=make())


def _later_changing_map(change):
    calls = [0]

    def f(state, x=None):
        calls[0] += 1
        out = tuple(0.5 * t for t in state)
        if calls[0] < 3:
            return out
        if change == "structure":
            return out[:1]
        if change == "shape":
            return (out[0][:, :1], out[1])
        if change == "tensor":
            return out[0]
        return (out[0].double(), out[1])

    return f


@pytest.mark.parametrize("change, error, match", [
    ("structure", TypeError, "evaluation 3.*same structure"),
    ("shape", ValueError, "evaluation 3.*shape"),
    ("tensor", TypeError, "returned a Tensor at evaluation 3"),
    ("dtype", TypeError, "evaluation 3.*dtype"),
])
def test_a_map_whose_output_changes_structure_later_is_stopped_there(change, error, match):
    state = (torch.ones(2, 3), torch.ones(2, 2))
    with pytest.raises(error, match=match):
        deqkern.solve(_later_changing_map(change), state, tol=1e-12, max_iter=10)
    with pytest.raises(error, match=match):
        deqkern.nn.DEQ(_later_changing_map(change), solver_options=dict(tol=1e-12, max_iter=10))(
            torch.zeros(2, 3), z0=state)


def test_torchdeq_adapter_solves_list_states():
    torchdeq = pytest.importorskip("torchdeq")
    deqkern.register_torchdeq_solvers()
    f, _, _, x = _coupled_map(seed=4)
    deq = torchdeq.get_deq(f_solver="deqkern_anderson", b_solver="deqkern_anderson", ift=True, f_tol=1e-10,
                           f_max_iter=200).eval()
    with torch.no_grad():
        z_out, _ = deq(lambda hi, lo: f((hi, lo), x), _zeros(list))  # torchdeq calls func(*states)
        z, _ = deqkern.solve(lambda s: f(s, x), _zeros(list), **TIGHT)
    torch.testing.assert_close(_flatten(z_out[-1]), _flatten(z), rtol=0, atol=1e-8)

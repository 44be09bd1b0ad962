"""The power_iteration op (batched power iteration on diag(row_scale_b) W) on every backend (cpu, cuda, triton)
against deqkern/reference/power_iteration.py."""
import pytest
import torch

from deqkern.core.backends import kernel
from deqkern.reference import power_iteration_ref

import kit

power_op = torch.ops.deqkern.power_iteration


# ---------------------------------------------------------------- the batched op against the reference
def batched_problem(B, m, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, dtype=torch.float64, generator=g)
    scale = torch.rand(B, m, dtype=torch.float64, generator=g) * torch.logspace(-1, 0, B, dtype=torch.float64)[:, None]
    u0 = torch.randn(B, n, dtype=torch.float64, generator=g)
    return [t.to(dtype=dtype, device=device) for t in (W, scale, u0)]


def call_op(backend, *args):
    return kernel("power_iteration", backend)(*args)


OP_CASES = [("gram", 5, 37, 17), ("gram", 3, 5, 33), ("gram", 2, 1, 1), ("symmetric", 4, 17, 17),
            ("symmetric", 3, 1, 1), ("gram", 4, 130, 129), ("symmetric", 3, 130, 130)]


def case_id(case):
    mode, B, m, n, dtype = case
    return f"{mode}-B{B}-{m}x{n}-{kit.dtype_id(dtype)}"


CASES = [(mode, B, m, n, t) for mode, B, m, n in OP_CASES for t in (torch.float64, torch.float32)]


@pytest.mark.parametrize("backend,mode,B,m,n,dtype",
                         kit.backend_params([(case_id(c), c) for c in CASES],
                                            small={case_id(c) for c in CASES if max(c[2], c[3]) <= 40}))
def test_op_with_row_scale_matches_reference(backend, mode, B, m, n, dtype):
    B = min(B, 2) if kit.small_only(backend) else B
    W, scale, u0 = batched_problem(B, m, n, dtype, kit.device_of(backend))
    shift = float(W.abs().sum(1).max()) if mode == "symmetric" else 0.0  # >= ||S|| >= -lambda_min(S)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    max_iter = 60 if kit.small_only(backend) else 300
    args = (W, scale, u0, mode, shift, max_iter, tol)
    value, u, iterations, converged = call_op(backend, *args)
    ref = power_iteration_ref(*args)
    kit.report("value", value, ref[0])
    kit.report("u", u, ref[1])
    print("iterations", iterations.tolist(), ref[2].tolist())
    assert value.dtype == u.dtype == dtype and iterations.dtype == torch.int32 and converged.dtype == torch.bool
    assert value.shape == (B,) and u.shape == (B, n)
    it_slack = 1 if dtype == torch.float64 else 5  # the reordered sums can move a stop by an iteration (or a few, f32)
    assert (iterations.cpu() - ref[2].cpu()).abs().max() <= it_slack
    if dtype == torch.float64:
        torch.testing.assert_close(value, ref[0], rtol=1e-9, atol=1e-12)
        assert torch.equal(converged, ref[3])
    else:
        torch.testing.assert_close(value, ref[0], rtol=1e-4, atol=1e-6)
    # the truth per sample
    J = scale.cpu().double()[:, :, None] * W.cpu().double()[None]
    truth = torch.linalg.matrix_norm(J, 2) if mode == "gram" else torch.linalg.eigvalsh(0.5 * (J + J.mT))[:, -1]
    print("max |value - truth|", (value.cpu().double() - truth).abs().max().item())


def test_samples_are_independent(backend):
    W, scale, u0 = batched_problem(4 if kit.small_only(backend) else 6, 20, 12, torch.float64,
                                   kit.device_of(backend))
    out = call_op(backend, W, scale, u0, "gram", 0.0, 500, 1e-12)
    assert out[2].unique().numel() > 1
    for b in (0, 3):
        alone = call_op(backend, W, scale[b:b + 1], u0[b:b + 1], "gram", 0.0, 500, 1e-12)
        torch.testing.assert_close(alone[0][0], out[0][b], rtol=1e-13, atol=0)
        torch.testing.assert_close(alone[1][0], out[1][b], rtol=1e-12, atol=1e-13)
        assert alone[2][0] == out[2][b]


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_any_strides(backend, layout):
    """The one contiguity rule: W, row_scale and u0 may have any strides."""
    W, scale, u0 = batched_problem(3, 9, 7, torch.float64, kit.device_of(backend))
    change = kit.strided if layout == "strided" else (lambda t: t.T.contiguous().T)
    out = call_op(backend, change(W), change(scale), change(u0), "gram", 0.0, 100, 1e-10)
    ref = power_iteration_ref(W.cpu(), scale.cpu(), u0.cpu(), "gram", 0.0, 100, 1e-10)
    torch.testing.assert_close(out[0].cpu(), ref[0], rtol=1e-9, atol=1e-12)


def test_empty_batch(backend):
    W, scale, u0 = batched_problem(0, 4, 3, torch.float64, kit.device_of(backend))
    value, u, iterations, converged = call_op(backend, W, scale, u0, "gram", 0.0, 10, 1e-6)
    assert value.shape == iterations.shape == converged.shape == (0,) and u.shape == (0, 3)


def test_raw_op_nan_gives_nan_not_converged(backend):
    W = torch.eye(3, dtype=torch.float64, device=kit.device_of(backend))
    W[1, 2] = float("nan")
    u0 = torch.ones(2, 3, dtype=torch.float64, device=W.device)
    value, u, iterations, converged = call_op(backend, W, None, u0, "gram", 0.0, 50, 1e-6)
    assert torch.isnan(value).all() and not converged.any() and (iterations == 1).all()


# ---------------------------------------------------------------- opcheck
def test_opcheck(backend):
    W, scale, u0 = batched_problem(2, 9, 9, torch.float64, kit.device_of(backend))
    op = torch.ops.deqkern.power_iteration_triton if backend == "triton" else power_op
    torch.library.opcheck(op, (W, scale, u0, "gram", 0.0, 30, 1e-8))
    torch.library.opcheck(op, (W, None, u0, "symmetric", 5.0, 30, 1e-8))
    torch.library.opcheck(op, (W[:, :4].contiguous(), None, u0[:, :4].contiguous(), "gram", 0.0, 30, 1e-8))


def test_compile_fullgraph():
    W, scale, u0 = batched_problem(3, 9, 7, torch.float64, "cpu")
    fn = torch.compile(lambda W, s, u: power_op(W, s, u, "gram", 0.0, 100, 1e-10)[0] * 2, fullgraph=True,
                       backend="eager")
    torch.testing.assert_close(fn(W, scale, u0), 2 * power_op(W, scale, u0, "gram", 0.0, 100, 1e-10)[0])


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.ones(3), None, torch.ones(1, 3), "gram", 0.0, 10, 1e-6), "matrix"),
        ((torch.ones(3, 4), None, torch.ones(1, 4), "symmetric", 0.0, 10, 1e-6), "square"),
        ((torch.ones(3, 3), None, torch.ones(1, 4), "gram", 0.0, 10, 1e-6), "u0 must be"),
        ((torch.ones(3, 3), torch.ones(1, 2), torch.ones(1, 3), "gram", 0.0, 10, 1e-6), "row_scale"),
        ((torch.ones(3, 3), None, torch.ones(1, 3, dtype=torch.float64), "gram", 0.0, 10, 1e-6), "dtypes differ"),
        ((torch.ones(3, 3), None, torch.ones(1, 3), "eig", 0.0, 10, 1e-6), "unknown mode"),
        ((torch.ones(3, 3), None, torch.ones(1, 3), "gram", 0.0, 0, 1e-6), "max_iter"),
        ((torch.ones(3, 3), None, torch.ones(1, 3), "gram", 0.0, 10, 0.0), "tol"),
        ((torch.ones(3, 3).int(), None, torch.ones(1, 3).int(), "gram", 0.0, 10, 1e-6), "float32 or float64"),
        # 2^31 columns as stride-0 views (no memory): an int index would truncate them, so they are refused.
        ((torch.ones(1, 1).expand(1, 2**31), None, torch.ones(1, 1).expand(1, 2**31), "gram", 0.0, 10, 1e-6),
         "at most 2"),
    ],
)
def test_raw_op_rejects_bad_arguments(args, message):
    with pytest.raises(RuntimeError, match=message):
        power_op(*args)

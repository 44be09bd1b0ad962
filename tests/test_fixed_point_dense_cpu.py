"""The CPU C++ kernels against the pure-PyTorch reference."""
import pytest
import torch

import deqkern
from deqkern.reference import fixed_point_dense_backward_ref, fixed_point_dense_ref
from problems import dense_problem, report

forward_op = torch.ops.deqkern.fixed_point_dense
backward_op = torch.ops.deqkern.fixed_point_dense_backward

SHAPES = [(1, 1), (3, 5), (37, 33), (130, 129), (5, 300), (64, 64)]
ACTIVATIONS = sorted(deqkern.ACTIVATIONS)


def assert_solves_match(out, ref, dtype):
    z, iterations, residual, converged = out
    z_ref, iterations_ref, residual_ref, converged_ref = ref
    report("z", z, z_ref)
    assert z.dtype == dtype and iterations.dtype == torch.int32 and converged.dtype == torch.bool
    if dtype == torch.float64:
        torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10, equal_nan=True)
        torch.testing.assert_close(residual, residual_ref, rtol=1e-6, atol=1e-14, equal_nan=True)
        assert torch.equal(iterations, iterations_ref)
        assert torch.equal(converged, converged_ref)
    else:
        # float32 rounding can move a sample across tol by one iteration; the results then differ by ~tol.
        assert (iterations - iterations_ref).abs().max() <= 1
        assert ((z - z_ref).norm() / z_ref.norm().clamp_min(1e-30)) < 2e-3
        assert converged.all() == converged_ref.all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch,d", SHAPES, ids=[f"B{b}-D{d}" for b, d in SHAPES])
def test_forward_matches_reference(batch, d, activation, alpha, dtype):
    W, c, z0 = dense_problem(batch, d, dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    out = forward_op(W, c, z0, activation, alpha, tol, 300)
    ref = fixed_point_dense_ref(W, c, z0, activation, alpha, tol, 300)
    assert_solves_match(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch,d", SHAPES, ids=[f"B{b}-D{d}" for b, d in SHAPES])
def test_backward_matches_reference(batch, d, activation, alpha, dtype):
    W, c, z0 = dense_problem(batch, d, dtype, seed=1)
    z = fixed_point_dense_ref(W, c, z0, activation, 1.0, 1e-10, 500)[0]
    grad_z = torch.randn(batch, d, dtype=dtype, generator=torch.Generator().manual_seed(2))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    out = backward_op(W, c, z, grad_z, activation, alpha, tol, 300)
    ref = fixed_point_dense_backward_ref(W, c, z, grad_z, activation, alpha, tol, 300)
    assert_solves_match(out, ref, dtype)


def test_samples_stop_independently():
    """Each sample stops at its own iteration count and its result does not depend on the batch."""
    W, c, z0 = dense_problem(40, 24)
    z, iterations, residual, converged = forward_op(W, c, z0, "tanh", 1.0, 1e-8, 500)
    assert converged.all() and (residual <= 1e-8).all()
    assert iterations.unique().numel() > 3, iterations
    for row in (0, 17, 39):
        alone = forward_op(W, c[row : row + 1], z0[row : row + 1], "tanh", 1.0, 1e-8, 500)
        torch.testing.assert_close(alone[0][0], z[row], rtol=1e-12, atol=1e-12)
        assert alone[1][0] == iterations[row]


def test_max_iter_reached_is_reported():
    W, c, z0 = dense_problem(6, 16, norm=0.99)
    z, iterations, residual, converged = forward_op(W, c, z0, "identity", 1.0, 1e-12, 3)
    assert (iterations == 3).all() and not converged.any() and (residual > 1e-12).all()
    torch.testing.assert_close(z, fixed_point_dense_ref(W, c, z0, "identity", 1.0, 1e-12, 3)[0])


def test_nan_in_one_row_flags_that_row_only():
    W, c, z0 = dense_problem(5, 9)
    c[2, 4] = float("nan")
    z, iterations, residual, converged = forward_op(W, c, z0, "tanh", 1.0, 1e-9, 200)
    assert torch.isnan(residual[2]) and not converged[2] and iterations[2] == 0
    assert torch.equal(z[2], z0[2])  # never iterated
    keep = torch.tensor([0, 1, 3, 4])
    ref = fixed_point_dense_ref(W, c[keep], z0[keep], "tanh", 1.0, 1e-9, 200)
    torch.testing.assert_close(z[keep], ref[0], rtol=1e-10, atol=1e-10)
    assert converged[keep].all()
    assert_solves_match((z, iterations, residual, converged), fixed_point_dense_ref(W, c, z0, "tanh", 1.0, 1e-9, 200),
                        torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_inf_input_is_flagged_even_where_tanh_would_hide_it(dtype):
    W, c, z0 = dense_problem(4, 6, dtype)
    c[1, 0] = float("inf")  # tanh(inf) = 1 would give a finite, converged, meaningless sample
    z0[3, 5] = float("-inf")
    out = forward_op(W, c, z0, "tanh", 1.0, 1e-6, 100)
    assert out[1].tolist()[1] == 0 and out[1].tolist()[3] == 0 and torch.isnan(out[2][[1, 3]]).all()
    assert out[3].tolist() == [True, False, True, False]


def test_nan_in_W_flags_every_sample():
    W, c, z0 = dense_problem(3, 7)
    W[6, 0] = float("nan")
    z, iterations, residual, converged = forward_op(W, c, z0, "relu", 1.0, 1e-6, 100)
    assert (iterations == 0).all() and torch.isnan(residual).all() and not converged.any()
    assert torch.equal(z, z0)


def test_backward_flags_non_finite_rows():
    W, c, z0 = dense_problem(4, 5)
    z = fixed_point_dense_ref(W, c, z0, "tanh", 1.0, 1e-10, 300)[0]
    grad_z = torch.ones_like(z)
    grad_z[0, 2] = float("nan")
    z[2, 1] = float("inf")
    out = backward_op(W, c, z, grad_z, "tanh", 1.0, 1e-9, 100)
    assert out[1].tolist()[0] == 0 and out[1].tolist()[2] == 0 and out[3].tolist() == [False, True, False, True]
    assert_solves_match(out, fixed_point_dense_backward_ref(W, c, z, grad_z, "tanh", 1.0, 1e-9, 100), torch.float64)


def test_empty_batch():
    W = torch.eye(4, dtype=torch.float64) * 0.5
    c = torch.empty(0, 4, dtype=torch.float64)
    z, iterations, residual, converged = forward_op(W, c, c.clone(), "tanh", 1.0, 1e-6, 10)
    assert z.shape == (0, 4) and iterations.shape == residual.shape == converged.shape == (0,)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.ones(3, 4), torch.ones(2, 4), torch.ones(2, 4), "tanh", 1.0, 1e-4, 10), "square"),
        ((torch.eye(4), torch.ones(2, 3), torch.ones(2, 3), "tanh", 1.0, 1e-4, 10), "expected"),
        ((torch.eye(4), torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 4), "tanh", 1.0, 1e-4, 10), "dtype"),
        ((torch.eye(4), torch.ones(2, 4), torch.ones(2, 4), "gelu", 1.0, 1e-4, 10), "unknown activation"),
        ((torch.eye(4), torch.ones(2, 4), torch.ones(2, 4), "tanh", 0.0, 1e-4, 10), "alpha"),
        ((torch.eye(4), torch.ones(2, 4), torch.ones(2, 4), "tanh", 1.0, 0.0, 10), "tol"),
        ((torch.eye(4), torch.ones(2, 4), torch.ones(2, 4), "tanh", 1.0, 1e-4, 0), "max_iter"),
        ((torch.eye(4).int(), torch.ones(2, 4).int(), torch.ones(2, 4).int(), "tanh", 1.0, 1e-4, 5), "float32"),
    ],
)
def test_raw_op_rejects_bad_arguments(args, message):
    with pytest.raises(RuntimeError, match=message):
        forward_op(*args)


def test_opcheck():
    W, c, z0 = dense_problem(7, 10)
    torch.library.opcheck(forward_op, (W, c, z0, "tanh", 0.8, 1e-8, 100))
    z = fixed_point_dense_ref(W, c, z0, "tanh", 1.0, 1e-10, 200)[0]
    torch.library.opcheck(backward_op, (W, c, z, torch.randn_like(z), "softsign", 1.0, 1e-8, 100))


@pytest.mark.parametrize("position", [(0, 0), (31, 32), (32, 31), (69, 69), (40, 5)])
def test_nan_in_W_is_seen_across_the_packing_tiles(position):
    """W is packed in 32 x 32 tiles (transposed for the forward solve): a NaN anywhere, tile edges and the ragged
    last tile included, flags every sample of the forward solves and of the backward solve."""
    W, c, z0 = dense_problem(4, 70)
    W[position] = float("nan")
    grad_z = torch.ones_like(c)
    outs = {
        "picard": forward_op(W, c, z0, "tanh", 1.0, 1e-10, 300),
        "anderson": torch.ops.deqkern.fixed_point_dense_anderson(W, c, z0, "tanh", 5, 1.0, 1e-4, 1e-10, 300),
        "picard-backward": backward_op(W, c, torch.zeros_like(c), grad_z, "tanh", 1.0, 1e-10, 300),
    }
    for name, (_, iterations, residual, converged) in outs.items():
        assert not converged.any() and (iterations == 0).all() and residual.isnan().all(), name

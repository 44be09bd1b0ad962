"""anderson_step, the one fused op per iteration of deqkern.solve, on every backend (cpu, cuda, triton) against
deqkern/reference/anderson_step.py."""
import math

import pytest
import torch

from deqkern.core.backends import kernel
from deqkern.reference import anderson_step_ref

import kit

STEP_SHAPES = [(1, 1, 1), (3, 5, 2), (7, 37, 5), (5, 130, 3), (4, 33, 8), (3, 20, 16)]  # (B, n, m)


def step_state(B, n, m, dtype, device, seed=0):
    """A mid-solve state: random histories with a consistent Gram matrix, strided x, some inactive samples."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    X = torch.randn(B, m, n, generator=g, dtype=torch.float64).to(dtype)
    G = (0.3 * torch.randn(B, m, n, generator=g, dtype=torch.float64)).to(dtype)
    H = (G.to(acc) @ G.to(acc).transpose(1, 2))
    wide = torch.randn(B, 2 * n, generator=g, dtype=torch.float64).to(dtype)
    x = wide[:, ::2]  # non-contiguous
    fx = (x.double() + 0.2 * torch.randn(B, n, generator=g, dtype=torch.float64)).to(dtype)
    state = dict(
        X_hist=X, G_hist=G, H=H, x=x, fx=fx, x_next=torch.zeros(B, n, dtype=dtype),
        z_best=torch.zeros(B, n, dtype=dtype),
        residual_best=torch.where(torch.arange(B) % 3 == 0, math.nan, 0.5 + torch.rand(B, generator=g)).to(acc),
        residual=torch.full((B,), 7.0, dtype=acc),
        active=torch.arange(B) % 4 != 1, iterations=torch.full((B,), 3, dtype=torch.int32),
    )
    return {k: v.to(device) for k, v in state.items()}


def run_step(op, state, k, beta, lam, tol):
    s = {key: (v.clone() if key not in ("x",) else v) for key, v in state.items()}
    op(s["X_hist"], s["G_hist"], s["H"], s["x"], s["fx"], s["x_next"], s["z_best"], s["residual_best"],
       s["residual"], s["active"], s["iterations"], k, beta, lam, tol)
    return s



CASES = kit.backend_params([(f"B{b}-N{n}-M{m}-k{k}", (b, n, m, k)) for b, n, m in STEP_SHAPES for k in (0, 2, 11)],
                           small={f"B{b}-N{n}-M{m}-k{k}" for b, n, m in STEP_SHAPES if n <= 64 for k in (0, 2, 11)})


@pytest.mark.parametrize("backend,B,n,m,k", CASES)
def test_anderson_step_matches_reference(backend, B, n, m, k):
    state = step_state(B, n, m, torch.float64, kit.device_of(backend))
    tol = 1e-3 if k != 2 else 1.0  # k == 2: some samples converge in this step
    out = run_step(kernel("anderson_step", backend), state, k, 0.8, 1e-4, tol)
    ref = run_step(anderson_step_ref, {key: v.cpu() for key, v in state.items()}, k, 0.8, 1e-4, tol)
    nh = min(k + 1, m)
    keys = ("X_hist", "G_hist", "x_next", "z_best", "residual_best", "residual", "active", "iterations")
    kit.assert_matches({key: out[key] for key in keys}, {key: ref[key] for key in keys}, torch.float64)
    go_on = ref["active"]
    torch.testing.assert_close(out["H"].cpu()[go_on][:, :nh, :nh], ref["H"][go_on][:, :nh, :nh], rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=kit.dtype_id)
def test_anderson_step_low_precision(backend, dtype):
    state = step_state(6, 40, 4, dtype, kit.device_of(backend))
    out = run_step(kernel("anderson_step", backend), state, 5, 1.0, 1e-4, 1e-3)
    ref = run_step(anderson_step_ref, {key: v.cpu() for key, v in state.items()}, 5, 1.0, 1e-4, 1e-3)
    assert out["H"].dtype == torch.float32 and out["residual"].dtype == torch.float32
    keys = ("x_next", "residual", "active", "iterations")
    kit.assert_matches({key: out[key] for key in keys}, {key: ref[key] for key in keys}, dtype)


def test_anderson_step_opcheck(backend):
    state = step_state(5, 17, 3, torch.float64, kit.device_of(backend))
    args = [state[key] for key in ("X_hist", "G_hist", "H", "x", "fx", "x_next", "z_best", "residual_best",
                                   "residual", "active", "iterations")]
    op = torch.ops.deqkern.anderson_step_triton if backend == "triton" else torch.ops.deqkern.anderson_step
    torch.library.opcheck(op.default, (*args, 3, 1.0, 1e-4, 1e-3))


def test_state_must_be_contiguous_on_every_backend(backend):
    """The one contiguity rule: x and fx may be strided (step_state makes x strided), the state updated in place may
    not."""
    s = step_state(3, 8, 2, torch.float64, kit.device_of(backend))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel("anderson_step", backend)(s["X_hist"], s["G_hist"], s["H"], s["x"], s["fx"], s["x_next"],
                                         kit.strided(s["z_best"]), s["residual_best"], s["residual"], s["active"],
                                         s["iterations"], 1, 1.0, 1e-4, 1e-3)


def test_empty_batch(backend):
    state = step_state(0, 5, 2, torch.float64, kit.device_of(backend))
    out = run_step(kernel("anderson_step", backend), state, 0, 1.0, 1e-4, 1e-3)
    assert out["x_next"].shape == (0, 5)



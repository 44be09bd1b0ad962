"""The one test kit of deqkern: which backends a test can run on, problem makers, one tolerance table per dtype with
the assertions built on it, and readable test ids.

Every op is tested on every backend (cpu, cuda, triton) against its reference through `backend_params`; a backend
that is not available here is a skipped parameter, never a silently missing one. Triton runs on CPU tensors under
TRITON_INTERPRET=1 when there is no GPU (conftest.py sets it), one program at a time, so its cases stay small there.
"""
from dataclasses import dataclass

import pytest
import torch

from deqkern.core.backends import backend_status

KERNEL_BACKENDS = ("cpu", "cuda", "triton")
HAS_GPU = torch.cuda.is_available()
# The Triton interpreter runs a Python loop per program and iteration: small cases only.
TRITON_INTERPRETED = not HAS_GPU


def unavailable(backend):
    """Why `backend` cannot run here, or None (deqkern.core.backends.backend_status on the backend's device)."""
    return backend_status(device_of(backend))[backend]


def device_of(backend):
    """The device of a backend's tensors: CUDA for cuda (and triton on a GPU), else the CPU."""
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_GPU) else "cpu"


def small_only(backend):
    return backend == "triton" and TRITON_INTERPRETED


def backend_params(cases, backends=KERNEL_BACKENDS, small=None):
    """pytest params (backend, *case) with ids "backend-case_id" for every backend, unavailable ones skipped.

    cases: list of (id, case tuple). small: the subset (ids) the Triton interpreter runs, default all."""
    params = []
    for backend in backends:
        reason = unavailable(backend)
        for case_id, case in cases:
            if small is not None and small_only(backend) and case_id not in small:
                continue
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(backend, *case, id=f"{backend}-{case_id}", marks=marks))
    return params


def backend_names(backends=KERNEL_BACKENDS):
    """pytest params of backend names ("reference" allowed), the unavailable ones skipped."""
    return [pytest.param(b, id=b, marks=[pytest.mark.skip(reason=unavailable(b))] if unavailable(b) else [])
            for b in backends]


def dtype_id(dtype):
    return {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]


# ---------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerance:
    """rtol, atol: elementwise, for the outputs of one step (or of a solve run to the same iterations in float64);
    solve_rel: ||z - z_ref|| / ||z_ref|| of a whole solve whose samples may stop an iteration earlier or later;
    iteration_slack: how many iterations a sample may stop apart (rounding near tol moves the stop)."""

    rtol: float
    atol: float
    solve_rel: float
    iteration_slack: int


# The ladder of the best kernel packages (fp32 ~1e-4, fp16 ~3e-3, bf16 ~1e-2 relative) for one step; float64
# solves are compared elementwise and must stop at the same iterations.
TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-9, atol=1e-11, solve_rel=1e-9, iteration_slack=0),
    torch.float32: Tolerance(rtol=1e-4, atol=1e-5, solve_rel=2e-3, iteration_slack=2),
    torch.float16: Tolerance(rtol=3e-3, atol=3e-3, solve_rel=1e-2, iteration_slack=2),
    torch.bfloat16: Tolerance(rtol=1e-2, atol=1e-2, solve_rel=4e-2, iteration_slack=2),
}


def report(name, out, ref):
    """Print max/mean difference before asserting, as the kernel packages we admire do."""
    diff = (out.detach().cpu().double() - ref.detach().cpu().double()).abs()
    diff = diff[~diff.isnan()] if diff.numel() else diff
    if diff.numel():
        print(f"{name}: max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}")


def assert_matches(out, ref, dtype, name="out"):
    """Tensors (or tuples / dicts of them) against the reference: floating ones within TOLERANCES[dtype] (NaN equal to
    NaN), integer and bool ones exactly. Compared on the CPU."""
    if isinstance(ref, dict):
        for key in ref:
            assert_matches(out[key], ref[key], dtype, f"{name}[{key!r}]")
        return
    if isinstance(ref, (tuple, list)):
        assert len(out) == len(ref)
        for i, (o, r) in enumerate(zip(out, ref)):
            assert_matches(o, r, dtype, f"{name}[{i}]")
        return
    out, ref = out.detach().cpu(), ref.detach().cpu()
    assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, ref.shape, out.dtype, ref.dtype)
    if ref.is_floating_point():
        report(name, out, ref)
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(out, ref, rtol=tol.rtol, atol=tol.atol, equal_nan=True, msg=lambda m: f"{name}: {m}")
    else:
        assert torch.equal(out, ref), (name, out, ref)


def assert_solve_matches(out, ref, dtype):
    """(z, iterations int32, residual, converged bool) of a solve against the reference's: float64 solves elementwise
    and at the same iterations; lower precisions within iteration_slack and solve_rel (a sample crossing tol an
    iteration apart differs by about tol). A backward's two Jacobian penalty outputs (row term, value) are compared
    too: same shapes and dtypes, values within solve_rel (they are not iterated)."""
    z, iterations, residual, converged, *penalty = (t.detach().cpu() for t in out)
    z_ref, iterations_ref, residual_ref, converged_ref, *penalty_ref = (t.detach().cpu() for t in ref)
    assert len(penalty) == len(penalty_ref)
    for got, want in zip(penalty, penalty_ref):
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
        torch.testing.assert_close(got, want, rtol=TOLERANCES[dtype].solve_rel, atol=TOLERANCES[dtype].atol,
                                   equal_nan=True, check_dtype=False)
    assert z.dtype == dtype and residual.dtype == residual_ref.dtype
    assert iterations.dtype == torch.int32 and converged.dtype == torch.bool
    assert z.shape == z_ref.shape and iterations.shape == residual.shape == converged.shape == iterations_ref.shape
    report("z", z, z_ref)
    tol = TOLERANCES[dtype]
    if tol.iteration_slack == 0:
        torch.testing.assert_close(z, z_ref, rtol=tol.solve_rel, atol=tol.atol, equal_nan=True)
        # A residual near tol is a small difference of nearby numbers: its last digits are rounding.
        torch.testing.assert_close(residual, residual_ref, rtol=1e-5, atol=1e-14, equal_nan=True)
        assert torch.equal(iterations, iterations_ref), (iterations, iterations_ref)
        assert torch.equal(converged, converged_ref)
    else:
        if iterations.numel():
            assert (iterations - iterations_ref).abs().max() <= tol.iteration_slack, (iterations, iterations_ref)
        finite = torch.isfinite(z_ref).all(dim=1) if z_ref.dim() == 2 else torch.ones(0, dtype=torch.bool)
        if finite.any():
            error = (z[finite].double() - z_ref[finite].double()).norm() / z_ref[finite].double().norm().clamp_min(1e-30)
            assert error < tol.solve_rel, error
        assert torch.equal(residual.isnan(), residual_ref.isnan())
        assert bool(converged.all()) == bool(converged_ref.all())


# ---------------------------------------------------------------- problems (made in float64 on the CPU, then cast)
def contractive_matrix(d, dtype=torch.float64, device="cpu", norm=0.9, generator=None):
    """A random (d, d) matrix with spectral norm `norm`."""
    a = torch.randn(d, d, dtype=torch.float64, generator=generator)
    return (norm * a / torch.linalg.matrix_norm(a, ord=2)).to(dtype=dtype, device=device)


def dense_problem(batch, d, dtype=torch.float64, device="cpu", seed=0, norm=0.9):
    """(W, c, z0) with rows of c scaled from 0.01 to 3, so that samples converge at different speeds."""
    g = torch.Generator().manual_seed(seed)
    W = contractive_matrix(d, dtype, device, norm, g)
    scales = torch.linspace(0.01, 3.0, batch, dtype=torch.float64)[:, None]
    c = (torch.randn(batch, d, dtype=torch.float64, generator=g) * scales).to(dtype=dtype, device=device)
    z0 = torch.randn(batch, d, dtype=torch.float64, generator=g).to(dtype=dtype, device=device)
    return W, c, z0


def slow_problem(batch, d, dtype=torch.float64, device="cpu", seed=0):
    """The slowly contracting layer: W = Q diag(linspace(0, 0.9)) Q^T (symmetric), c = 0.1 N(0, 1), z0 = 0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))[0]
    W = q @ torch.diag(torch.linspace(0, 0.9, d, dtype=torch.float64)) @ q.T
    c = 0.1 * torch.randn(batch, d, dtype=torch.float64, generator=g)
    return W.to(dtype=dtype, device=device), c.to(dtype=dtype, device=device), torch.zeros(batch, d, dtype=dtype,
                                                                                             device=device)


def random_like(x, seed=2):
    """N(0, 1) of x's shape, dtype and device, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, dtype=torch.float64, generator=g).to(dtype=x.dtype, device=x.device)


def strided(x):
    """x's values in a non-contiguous tensor (every other column of a wider one)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    out = wide[..., ::2]
    assert not out.is_contiguous() or x.shape[-1] <= 1
    return out


def to_device(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def gradcheck_layer(layer, x):
    """torch.autograd.gradcheck of a layer's output in x and in every parameter (functional_call), float64."""
    from torch.func import functional_call

    names = [name for name, _ in layer.named_parameters()]

    def f(x, *params):
        return functional_call(layer, dict(zip(names, params)), (x,))

    params = tuple(p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters())
    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), *params), eps=1e-6, atol=1e-6, rtol=1e-4)

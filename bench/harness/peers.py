"""What deqkern is compared with, and the problems shared by several scripts.

Problems: f(z) = tanh(z W^T + c), float32, z0 = 0, made in float64 from one fixed seed and then cast.
Peers: torchdeq 0.1.0's solvers and get_deq (with solvers registered in torchdeq that count evaluations of f),
a plain PyTorch Picard loop, and a Python loop around a torch.compile'd step. All use TOL, MAX_ITER and the
relative residual ||f(z) - z|| / (||f(z)|| + eps) per sample.
"""
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# Until deqkern exposes it publicly (planned: deqkern.core.constants); deqkern's kernels use this eps.
from deqkern.reference import RESIDUAL_EPS

try:
    import torchdeq
    from torchdeq.solver import get_solver, register_solver
except ImportError:  # the peer rows then carry the error, the deqkern rows still run
    torchdeq = get_solver = register_solver = None

TOL = 1e-4
MAX_ITER = 100
SEED = 0
W_NORM = 0.9
TORCHDEQ_SOLVERS = ("fixed_point_iter", "anderson")


# ---------------------------------------------------------------- problems: (W (d, d), c (B, d), z0 (B, d))
def random_contraction_problem(batch, d, device=torch.device("cpu"), dtype=torch.float32, seed=SEED):
    """W = 0.9 A / ||A||_2 with A ~ N(0, 1), so ||W||_2 = 0.9 exactly; c ~ N(0, 1); z0 = 0."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    W = (W_NORM * a / torch.linalg.matrix_norm(a, ord=2)).to(device=device, dtype=dtype)
    c = torch.randn(batch, d, dtype=torch.float64, generator=g).to(device=device, dtype=dtype)
    return W, c, torch.zeros_like(c)


def slow_contraction_problem(batch, d, dtype=torch.float32, seed=SEED):
    """W = Q diag(linspace(0, 0.9, d)) Q^T with Q random orthogonal (symmetric, eigenvalues spread over [0, 0.9]:
    Picard needs many iterations), c = 0.1 N(0, 1), z0 = 0; on CPU."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))[0]
    W = q @ torch.diag(torch.linspace(0, 0.9, d, dtype=torch.float64)) @ q.T
    c = 0.1 * torch.randn(batch, d, dtype=torch.float64, generator=g)
    return W.to(dtype), c.to(dtype), torch.zeros(batch, d, dtype=dtype)


def layer(W, c, fused=True) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(z) = tanh(z W^T + c) as torch.addmm + tanh; fused=False: z @ W.T + c, then tanh (three ops), the form
    bench_anderson_step.py has always handed to both solvers."""
    if fused:
        return lambda z: torch.tanh(torch.addmm(c, z, W.T))
    return lambda z: torch.tanh(z @ W.T + c)


def relative_residual(fz, z):
    """(B,) ||f(z) - z|| / (||f(z)|| + eps) per sample, deqkern's stopping criterion."""
    return (fz - z).norm(dim=1) / (fz.norm(dim=1) + RESIDUAL_EPS)


def counted(f) -> Tuple[Callable, List[int]]:
    """(g, calls): g is f, and calls[0] counts its evaluations."""
    calls = [0]

    def g(*args, **kwargs):
        calls[0] += 1
        return f(*args, **kwargs)

    return g, calls


# ---------------------------------------------------------------- plain PyTorch loops
def eager_solve(f, z0, tol=TOL, max_iter=MAX_ITER):
    """Plain PyTorch Picard iteration with deqkern's per-sample stopping rule; returns (z, iterations run)."""
    z = z0
    active = torch.ones(z0.shape[0], dtype=torch.bool, device=z0.device)
    for k in range(1, max_iter + 1):
        fz = f(z)
        r = relative_residual(fz, z)
        z = torch.where(active[:, None], fz, z)
        active = active & (r > tol)
        if not active.any():  # the one host synchronisation per iteration
            break
    return z, k


def _picard_step(z, active, W, c, tol: float):
    fz = torch.tanh(torch.addmm(c, z, W.T))
    return torch.where(active[:, None], fz, z), active & (relative_residual(fz, z) > tol)


def compile_step():
    """The Picard step (f, residual and freeze) compiled by inductor, from scratch: each problem size compiles on
    its own, independent of earlier ones."""
    torch._dynamo.reset()
    return torch.compile(_picard_step, dynamic=False)


def compiled_solve(step, W, c, z0, tol=TOL, max_iter=MAX_ITER):
    """Python loop around a compile_step() step; returns (z, iterations run)."""
    z = z0
    active = torch.ones(z0.shape[0], dtype=torch.bool, device=z0.device)
    for k in range(1, max_iter + 1):
        z, active = step(z, active, W, c, tol)
        if not active.any():
            break
    return z, k


# ---------------------------------------------------------------- torchdeq
def _require_torchdeq():
    if torchdeq is None:
        raise RuntimeError("torchdeq is not installed (pip install torchdeq==0.1.0)")


def torchdeq_solve(solver_name, f, z0):
    """One torchdeq solver call with default options except tol, max_iter and stop_mode='rel'; returns (z, info)."""
    _require_torchdeq()
    z, _, info = get_solver(solver_name)(f, z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel")
    return z, info


def torchdeq_deq(f_solver, b_solver, tol=TOL, max_iter=MAX_ITER):
    """torchdeq.get_deq (default core 'sliced') with IFT backward and our tol / max_iter / relative stopping."""
    _require_torchdeq()
    return torchdeq.get_deq(
        f_solver=f_solver, b_solver=b_solver, f_max_iter=max_iter, b_max_iter=max_iter,
        f_tol=tol, b_tol=tol, f_stop_mode="rel", b_stop_mode="rel", ift=True,
    )


class CountingSolvers:
    """torchdeq solvers, registered under name(solver, direction), that count evaluations of f: iterations are
    reported from one untimed call, so the timed calls carry no counting."""

    def __init__(self, solvers=TORCHDEQ_SOLVERS):
        self.counts = {"fwd": [], "bwd": []}
        if torchdeq is None:
            return
        for solver in solvers:
            for direction, counts in self.counts.items():
                register_solver(self.name(solver, direction), self._wrap(get_solver(solver), counts))

    @staticmethod
    def name(solver, direction):
        return f"bench_counting_{direction}_{solver}"

    @staticmethod
    def _wrap(solver, counts):
        def run(func, x0, **kwargs):
            g, calls = counted(func)
            out = solver(g, x0, **kwargs)
            counts.append(calls[0])
            return out

        return run

    def take(self):
        """(forward evaluations, backward evaluations) since the last take(), summed over solves."""
        fwd, bwd = sum(self.counts["fwd"]), sum(self.counts["bwd"])
        self.counts["fwd"].clear()
        self.counts["bwd"].clear()
        return fwd, bwd


COUNTING = CountingSolvers()


class TorchDEQClassifier(nn.Module):
    """The DEQLinear classifier rebuilt on torchdeq: z* = tanh(z* W^T + injection(x)), then a linear head.

    x: (B, in_features) -> logits (B, classes); weight: (hidden, hidden).
    """

    def __init__(self, in_features, hidden, classes, f_solver, b_solver):
        super().__init__()
        self.injection = nn.Linear(in_features, hidden)
        self.weight = nn.Parameter(torch.empty(hidden, hidden))
        self.head = nn.Linear(hidden, classes)
        self.deq = torchdeq_deq(f_solver, b_solver)

    def cell(self, z, u):
        return torch.tanh(F.linear(z, self.weight) + u)

    def forward(self, x):
        u = self.injection(x)
        z0 = torch.zeros(x.shape[0], self.weight.shape[0], device=x.device, dtype=x.dtype)
        z_out, _ = self.deq(lambda z: self.cell(z, u), z0)
        return self.head(z_out[-1])

"""Benchmark of deqkern.fixed_point_dense against torchdeq 0.1.0, an eager PyTorch loop and torch.compile.

Problem: f(z) = tanh(z W^T + c), W = 0.9 A / ||A||_2 with A ~ N(0, 1) (so ||W||_2 = 0.9), c ~ N(0, 1) i.i.d.,
z0 = 0, float32, relative tolerance 1e-4, max_iter 100, one fixed seed. Sections:

  forward   forward solve only (no autograd graph)
  floor     the same number of `z @ W.T` products as deqkern's iterations, back to back (torch.mm out=)
  fwdbwd    loss (z**2).sum() and backward to W and c
  train     one training step of a DEQLinear classifier (cross-entropy, Adam)

Run `python bench/bench_fixed_point_dense.py --help`; results go to --out as Markdown and CSV.
"""
import argparse
import datetime
import gc
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import deqkern
from deqkern import _extension

try:
    import torchdeq
    from torchdeq.solver import get_solver, register_solver
except ImportError:  # the peer rows then carry the error, the deqkern rows still run
    torchdeq = None

try:
    import triton
    from triton.testing import do_bench
except ImportError:
    triton, do_bench = None, None

TOL = 1e-4
MAX_ITER = 100
W_NORM = 0.9
SEED = 0
RESIDUAL_EPS = 1e-12  # deqkern.reference.RESIDUAL_EPS; torchdeq uses 1e-9
SIZES = {"cpu": [(32, 64), (256, 256), (64, 128)], "cuda": [(64, 64), (64, 256), (1024, 64), (1024, 256)]}
QUICK_SIZES = [(32, 64)]
SECTIONS = ("forward", "floor", "fwdbwd", "train")
TORCHDEQ_SOLVERS = ("fixed_point_iter", "anderson")
TRAIN_SHAPE = dict(batch=64, in_features=64, hidden=128, classes=10)

# Stopping rules, as printed in the tables.
STOP_DEQKERN = "per-sample: rel <= 1e-4, sample frozen after"
STOP_EAGER = "per-sample: rel <= 1e-4 (torch.where freeze), 1 host check/iter"
STOP_TORCHDEQ = "whole batch: max rel < 1e-4 checked every iter, returns each sample's lowest-rel iterate"
STOP_FLOOR = "fixed count = deqkern max iterations, no check"
STOP_LEGEND = (
    "rel = ||f(z) - z|| / (||f(z)|| + eps), per sample, of the iterate f was applied to; eps = 1e-12 for deqkern "
    "and the PyTorch loops, 1e-9 for torchdeq (stop_mode='rel'). deqkern and the loops stop each sample on its own; "
    "torchdeq stops the batch when the largest residual is below tol (strictly), and returns, per sample, the "
    "iterate with the lowest residual seen."
)


# ---------------------------------------------------------------- problem and solvers under test
def make_problem(batch, d, device, dtype=torch.float32, seed=SEED):
    """(W, c, z0): W (d, d) with ||W||_2 = 0.9 exactly (made in float64, then cast), c (batch, d) ~ N(0, 1), z0 = 0."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    W = (W_NORM * a / torch.linalg.matrix_norm(a, ord=2)).to(device=device, dtype=dtype)
    c = torch.randn(batch, d, dtype=torch.float64, generator=g).to(device=device, dtype=dtype)
    return W, c, torch.zeros_like(c)


def layer(W, c):
    """f(z) = tanh(z W^T + c), the layer every peer iterates."""
    return lambda z: torch.tanh(torch.addmm(c, z, W.T))


def eager_solve(f, z0, tol=TOL, max_iter=MAX_ITER):
    """Plain PyTorch Picard iteration with deqkern's per-sample stopping rule; returns (z, iterations run)."""
    z = z0
    active = torch.ones(z0.shape[0], dtype=torch.bool, device=z0.device)
    for k in range(1, max_iter + 1):
        fz = f(z)
        r = (fz - z).norm(dim=1) / (fz.norm(dim=1) + RESIDUAL_EPS)
        z = torch.where(active[:, None], fz, z)
        active = active & (r > tol)
        if not active.any():  # the one host synchronisation per iteration
            break
    return z, k


def _compiled_step_eager(z, active, W, c, tol: float):
    fz = torch.tanh(torch.addmm(c, z, W.T))
    r = (fz - z).norm(dim=1) / (fz.norm(dim=1) + RESIDUAL_EPS)
    return torch.where(active[:, None], fz, z), active & (r > tol)


def compiled_solve(step, W, c, z0, tol=TOL, max_iter=MAX_ITER):
    """Python loop around a torch.compile'd step (f, residual and freeze fused); returns (z, iterations run)."""
    z = z0
    active = torch.ones(z0.shape[0], dtype=torch.bool, device=z0.device)
    for k in range(1, max_iter + 1):
        z, active = step(z, active, W, c, tol)
        if not active.any():
            break
    return z, k


def torchdeq_solve(solver_name, f, z0):
    """One torchdeq solver call with default options except tol, max_iter and stop_mode='rel'."""
    z, _, info = get_solver(solver_name)(f, z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel")
    return z, info


def torchdeq_deq(f_solver, b_solver):
    """torchdeq.get_deq (default core 'sliced') with IFT backward and our tol / max_iter / relative stopping."""
    return torchdeq.get_deq(
        f_solver=f_solver, b_solver=b_solver, f_max_iter=MAX_ITER, b_max_iter=MAX_ITER,
        f_tol=TOL, b_tol=TOL, f_stop_mode="rel", b_stop_mode="rel", ift=True,
    )


class _CountingSolvers:
    """Registers torchdeq solvers that count evaluations of f, to report iterations from one untimed call."""

    def __init__(self):
        self.counts = {"fwd": [], "bwd": []}
        if torchdeq is None:
            return
        for name in TORCHDEQ_SOLVERS:
            for direction in self.counts:
                register_solver(self.name(name, direction), self._wrap(get_solver(name), self.counts[direction]))

    @staticmethod
    def name(solver, direction):
        return f"bench_counting_{direction}_{solver}"

    @staticmethod
    def _wrap(solver, counts):
        def run(func, x0, **kwargs):
            n = 0

            def counted(*args, **kw):
                nonlocal n
                n += 1
                return func(*args, **kw)

            out = solver(counted, x0, **kwargs)
            counts.append(n)
            return out

        return run

    def take(self):
        """(forward evaluations, backward evaluations) since the last take(), summed over solves."""
        fwd, bwd = sum(self.counts["fwd"]), sum(self.counts["bwd"])
        self.counts["fwd"].clear()
        self.counts["bwd"].clear()
        return fwd, bwd


COUNTING = _CountingSolvers()


# ---------------------------------------------------------------- timing
def _quantile(sorted_xs, q):
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def measure(fn, device, min_time, setup=None):
    """(median, p20, p80, repeats) of fn() in ms: warm-up, then repeats until min_time seconds (>= 5 repeats).

    `setup` runs before every call, untimed. On CUDA without setup, triton.testing.do_bench does the timing.
    """
    if device.type == "cuda" and setup is None and do_bench is not None:
        median, p20, p80 = do_bench(fn, warmup=max(25, 200 * min_time), rep=1000 * min_time, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80, None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    setup = setup or (lambda: None)
    deadline = time.perf_counter() + 0.2 * min_time
    for i in range(1000):
        setup()
        fn()
        if i >= 2 and time.perf_counter() > deadline:
            break
    sync()
    times = []
    gc.collect()
    gc.disable()  # a collection inside a timed call is noise, not solver time
    try:
        while sum(times) < min_time or len(times) < 5:
            setup()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    times = sorted(1e3 * t for t in times)
    return _quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8), len(times)


def interleaved_times(fns, min_time):
    """{name: [ms of each timed call]} for CPU callables timed in rounds, one call of each per round.

    A ratio between two implementations is what a benchmark reports; on a shared machine the speed drifts over
    seconds, and timing one implementation after the other puts that drift into the ratio. Interleaving exposes
    both to the same conditions. Warm-up as in measure(); then rounds for min_time seconds per callable in all
    (a fast callable gets as many samples as the slowest, not min_time of its own), at least 5 rounds.
    """
    for fn in fns.values():
        measure(fn, torch.device("cpu"), 0.2 * min_time)  # warm-up only
    times = {name: [] for name in fns}
    gc.collect()
    gc.disable()
    deadline = time.perf_counter() + min_time * len(fns)
    try:
        while time.perf_counter() < deadline or len(times[next(iter(fns))]) < 5:
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - t0))
    finally:
        gc.enable()
    return times


def measure_interleaved(fns, min_time):
    """{name: (median, p20, p80, repeats)} in ms of interleaved_times(fns, min_time)."""
    out = {}
    for name, t in interleaved_times(fns, min_time).items():
        t = sorted(t)
        out[name] = (_quantile(t, 0.5), _quantile(t, 0.2), _quantile(t, 0.8), len(t))
    return out


# ---------------------------------------------------------------- result rows
@dataclass
class Row:
    section: str
    B: int
    d: int
    implementation: str
    stopping_rule: str
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    repeats: Optional[int] = None
    iters_fwd_max: Optional[int] = None
    iters_fwd_mean: Optional[float] = None
    iters_bwd_max: Optional[int] = None
    x_floor: Optional[float] = None
    deqkern_speedup: Optional[float] = None
    check: str = ""
    note: str = ""
    error: str = ""


def _error_text(exc):
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text[:300]


def run_row(row, make, device, min_time):
    """make() -> (fn, setup, stats dict); times fn and fills row. Any exception is recorded in row.error."""
    try:
        fn, setup, stats = make()
        row.median_ms, row.p20_ms, row.p80_ms, row.repeats = measure(fn, device, min_time, setup)
        for key, value in stats.items():
            setattr(row, key, value)
    except Exception as exc:  # a failing peer must not stop the benchmark
        row.error = _error_text(exc)
    return row


def _max_diff(a, b):
    return f"max abs(z - z_deqkern) = {(a.double() - b.double()).abs().max().item():.1e}"


def _rel_diff(name, a, b):
    diff = (a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)
    return f"rel err {name} vs deqkern = {diff.item():.1e}"


def _iteration_stats(info):
    return dict(iters_fwd_max=int(info.iterations.max()), iters_fwd_mean=round(float(info.iterations.float().mean()), 1))


# ---------------------------------------------------------------- sections
def deqkern_backends(device):
    if device.type == "cpu":
        return ["cpu"]
    backends = ["cuda"] if _extension.CUDA_EXTENSION_BUILT else []
    return backends + (["triton"] if _extension.triton_available() else [])


def bench_forward(B, d, device, args, floor_too):
    W, c, z0 = make_problem(B, d, device)
    f = layer(W, c)
    rows, reference_z, n_iter = [], None, None
    for backend in deqkern_backends(device):
        def make(backend=backend):
            nonlocal reference_z, n_iter
            fn = lambda: deqkern.fixed_point_dense(W, c, tol=TOL, max_iter=MAX_ITER, backend=backend)
            z, info = fn()
            if reference_z is None:
                reference_z, n_iter = z, int(info.iterations.max())
            return fn, None, dict(_iteration_stats(info), check=_max_diff(z, reference_z))

        rows.append(run_row(Row("forward", B, d, f"deqkern-{backend}", STOP_DEQKERN,
                                note="default on_nonconvergence='warn' (1 host sync/solve)"), make, device, args.min_time))
    if "forward" in args.sections:
        for solver in TORCHDEQ_SOLVERS:
            def make(solver=solver):
                fn = lambda: torchdeq_solve(solver, f, z0)
                z, _ = torchdeq_solve(COUNTING.name(solver, "fwd"), f, z0)
                stats = dict(iters_fwd_max=COUNTING.take()[0])
                if reference_z is not None:
                    stats["check"] = _max_diff(z, reference_z)
                return fn, None, stats

            note = "m=6, lam=1e-4, tau=1 (defaults)" if solver == "anderson" else "tau=1 (default)"
            rows.append(run_row(Row("forward", B, d, f"torchdeq-{solver}", STOP_TORCHDEQ, note=note),
                                make, device, args.min_time))

        def make_eager():
            fn = lambda: eager_solve(f, z0)
            z, k = fn()
            return fn, None, dict(iters_fwd_max=k, check=_max_diff(z, reference_z) if reference_z is not None else "")

        rows.append(run_row(Row("forward", B, d, "pytorch-eager-loop", STOP_EAGER), make_eager, device, args.min_time))

        if not args.no_compile:
            compile_seconds = None

            def make_compiled():
                nonlocal compile_seconds
                torch._dynamo.reset()  # each (B, d) compiles on its own, independent of earlier cases
                step = torch.compile(_compiled_step_eager, dynamic=False)
                t0 = time.perf_counter()
                z, k = compiled_solve(step, W, c, z0)
                compile_seconds = time.perf_counter() - t0
                fn = lambda: compiled_solve(step, W, c, z0)
                return fn, None, dict(iters_fwd_max=k, check=_max_diff(z, reference_z) if reference_z is not None else "")

            row = run_row(Row("forward", B, d, "torch.compile-step-loop", STOP_EAGER), make_compiled, device,
                          args.min_time)
            row.note = "inductor, dynamic=False" + (
                f"; first call (compile) {compile_seconds:.1f} s" if compile_seconds is not None else "")
            rows.append(row)

    if floor_too and n_iter is not None:
        def make_floor():
            Wt, out = W.T, torch.empty_like(c)

            def fn():
                for _ in range(n_iter):
                    torch.mm(c, Wt, out=out)

            return fn, None, dict(iters_fwd_max=n_iter)

        rows.append(run_row(Row("floor", B, d, f"{n_iter} x torch.mm(out=)", STOP_FLOOR), make_floor, device,
                            args.min_time))
    return rows


def bench_fwdbwd(B, d, device, args):
    W0, c0, z0 = make_problem(B, d, device)
    W, c = W0.clone().requires_grad_(), c0.clone().requires_grad_()
    f = layer(W, c)
    rows, reference = [], None

    def loss_backward(z):
        W.grad = c.grad = None
        (z ** 2).sum().backward()

    def grads_check():
        if reference is None:
            return ""
        return _rel_diff("dL/dW", W.grad, reference[0]) + "; " + _rel_diff("dL/dc", c.grad, reference[1])

    for backend in deqkern_backends(device):
        def make(backend=backend):
            nonlocal reference
            box = {}

            def fn():
                box["z"], box["info"] = deqkern.fixed_point_dense(W, c, tol=TOL, max_iter=MAX_ITER, backend=backend)
                loss_backward(box["z"])

            fn()
            info = box["info"]
            if reference is None:
                reference = (W.grad.clone(), c.grad.clone())
            return fn, None, dict(_iteration_stats(info), iters_bwd_max=int(info.backward.iterations.max()),
                                  check=grads_check())

        rows.append(run_row(Row("fwdbwd", B, d, f"deqkern-{backend}", STOP_DEQKERN, note="implicit backward"),
                            make, device, args.min_time))

    for solver in TORCHDEQ_SOLVERS:
        def make(solver=solver):
            deq = torchdeq_deq(solver, solver)
            counting = torchdeq_deq(COUNTING.name(solver, "fwd"), COUNTING.name(solver, "bwd"))

            def fn(deq=deq):
                z_out, _ = deq(f, z0)
                loss_backward(z_out[-1])

            fn(counting)
            fwd, bwd = COUNTING.take()
            return fn, None, dict(iters_fwd_max=fwd, iters_bwd_max=bwd, check=grads_check())

        rows.append(run_row(Row("fwdbwd", B, d, f"torchdeq-IFT-{solver}", STOP_TORCHDEQ,
                                note=f"get_deq(core='sliced', ift=True, f/b_solver={solver}); +1 f eval with grad"),
                            make, device, args.min_time))

    def make_eager():
        box = {}

        def fn():
            box["z"], box["k"] = eager_solve(f, z0)
            loss_backward(box["z"])

        fn()
        return fn, None, dict(iters_fwd_max=box["k"], iters_bwd_max=box["k"], check=grads_check())

    rows.append(run_row(Row("fwdbwd", B, d, "pytorch-eager-loop", STOP_EAGER,
                            note="autograd through the unrolled iterations"), make_eager, device, args.min_time))
    return rows


class TorchDEQClassifier(nn.Module):
    """The DEQLinear classifier rebuilt on torchdeq: z* = tanh(z* W^T + injection(x)), then a linear head."""

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


def _train_step(model, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def _restorer(model, optimizer):
    """Snapshot of parameters and Adam state; the returned setup() puts both back, so every timed step is alike."""
    params = [p.detach().clone() for p in model.parameters()]
    state = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in optimizer.state.items()}

    @torch.no_grad()
    def setup():
        for p, saved in zip(model.parameters(), params):
            p.copy_(saved)
        for p, saved in state.items():
            for k, v in saved.items():
                optimizer.state[p][k].copy_(v)

    return setup


def bench_train(device, args):
    s = TRAIN_SHAPE
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(s["batch"], s["in_features"], generator=g).to(device)
    y = torch.randint(0, s["classes"], (s["batch"],), generator=g).to(device)
    torch.manual_seed(SEED)
    template = nn.ModuleDict(dict(
        deq=deqkern.nn.DEQLinear(s["in_features"], s["hidden"]), head=nn.Linear(s["hidden"], s["classes"]))).to(device)
    rows, reference_loss = [], None

    def prepare(model):
        """One untimed step creates the Adam state; then every timed step starts from the same state."""
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss = _train_step(model, optimizer, x, y)
        setup = _restorer(model, optimizer)
        setup()
        return optimizer, setup, loss

    def loss_check(loss):
        return "" if reference_loss is None else f"abs(loss - loss_deqkern) = {abs(loss.item() - reference_loss):.1e}"

    for backend in deqkern_backends(device):
        def make(backend=backend):
            nonlocal reference_loss
            deq = deqkern.nn.DEQLinear(s["in_features"], s["hidden"], backend=backend).to(device)
            deq.load_state_dict(template["deq"].state_dict())
            model = nn.Sequential(deq, nn.Linear(s["hidden"], s["classes"]).to(device))
            model[1].load_state_dict(template["head"].state_dict())
            optimizer, setup, loss = prepare(model)
            if reference_loss is None:
                reference_loss = loss.item()
            info = deq.last_info
            return (lambda: _train_step(model, optimizer, x, y)), setup, dict(
                _iteration_stats(info), iters_bwd_max=int(info.backward.iterations.max()), check=loss_check(loss))

        rows.append(run_row(Row("train", s["batch"], s["hidden"], f"deqkern-{backend}", STOP_DEQKERN,
                                note="DEQLinear(64, 128) + Linear(128, 10), Adam"), make, device, args.min_time))

    torchdeq_rows = []
    for f_solver in TORCHDEQ_SOLVERS:
        for b_solver in TORCHDEQ_SOLVERS:
            def make(f_solver=f_solver, b_solver=b_solver):
                model = TorchDEQClassifier(s["in_features"], s["hidden"], s["classes"], f_solver, b_solver).to(device)
                with torch.no_grad():
                    model.injection.load_state_dict(template["deq"].injection.state_dict())
                    model.weight.copy_(template["deq"].weight)
                    model.head.load_state_dict(template["head"].state_dict())
                optimizer, setup, loss = prepare(model)
                counting = TorchDEQClassifier(s["in_features"], s["hidden"], s["classes"],
                                              COUNTING.name(f_solver, "fwd"), COUNTING.name(b_solver, "bwd")).to(device)
                counting.load_state_dict(model.state_dict())
                F.cross_entropy(counting(x), y).backward()
                fwd, bwd = COUNTING.take()
                return (lambda: _train_step(model, optimizer, x, y)), setup, dict(
                    iters_fwd_max=fwd, iters_bwd_max=bwd, check=loss_check(loss))

            torchdeq_rows.append(run_row(Row("train", s["batch"], s["hidden"], f"torchdeq-IFT-f:{f_solver}-b:{b_solver}",
                                             STOP_TORCHDEQ, note="get_deq(core='sliced', ift=True), Adam"),
                                         make, device, args.min_time))
    timed = [r for r in torchdeq_rows if r.median_ms is not None]
    if timed:
        fastest = min(timed, key=lambda r: r.median_ms)
        fastest.note += "; FASTEST torchdeq configuration"
    return rows + torchdeq_rows


# ---------------------------------------------------------------- report
def _git(*cmd):
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""


def _load_average():
    """Other processes on the machine make every multi-threaded op stall: the header records how busy it was."""
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _stall_check(threads):
    """Median time of a 64x64 torch.mm with `threads` threads and with 1: a busy machine stalls the first."""
    a, out = torch.randn(64, 64), torch.empty(64, 64)
    medians = []
    for n in (threads, 1):
        torch.set_num_threads(n)
        medians.append(measure(lambda: torch.mm(a, a, out=out), torch.device("cpu"), 0.05)[0])
    torch.set_num_threads(threads)
    text = f"64x64 torch.mm {medians[0] * 1e3:.1f} us with {threads} threads, {medians[1] * 1e3:.1f} us with 1"
    if medians[0] > 3 * medians[1]:
        text += " -- WARNING: multi-threaded ops stall, the machine is busy: timings are not representative"
    return text


def header_lines(device, args):
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or "unknown CPU"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        device_name += f" ({os.cpu_count()} logical CPUs)"
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    torchdeq_version = "not installed"
    if torchdeq is not None:
        from importlib.metadata import version

        torchdeq_version = getattr(torchdeq, "__version__", None) or version("torchdeq")
    return [
        f"device: {device_name}",
        f"date (UTC): {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')}",
        f"git commit: {commit}",
        f"versions: torch {torch.__version__}, triton {triton.__version__ if triton else 'not installed'}, "
        f"torchdeq {torchdeq_version}, deqkern {deqkern.__version__}, python {platform.python_version()}",
        f"threads: torch.set_num_threads({args.threads}) -> {torch.get_num_threads()}; "
        f"load average (1/5/15 min) at start: {_load_average()}"
        + (f"; {_stall_check(args.threads)}" if device.type == "cpu" else ""),
        f"command: {shlex.join([sys.executable, *sys.argv])}",
        f"problem: f(z) = tanh(z W^T + c), W = 0.9 A/||A||_2 with A ~ N(0,1) (||W||_2 = 0.9), c ~ N(0,1) i.i.d., "
        f"z0 = 0, float32, tol {TOL:g} (relative), max_iter {MAX_ITER}, seed {SEED}",
        f"timing: warm-up, then median / p20 / p80 over >= {args.min_time:g} s and >= 5 repeats"
        + (" (triton.testing.do_bench where there is no per-call setup)" if device.type == "cuda" else ""),
        "columns: iters fwd = max over the batch (mean for deqkern, whose samples stop independently); torchdeq and "
        "the loops run the whole batch, so their count is the batch's; iters bwd = evaluations in the backward "
        "solve(s); x floor = median / floor median of the same (B, d); deqkern speedup = row median / median of "
        "the first deqkern row of the same section and (B, d)",
        f"stopping rules: {STOP_LEGEND}",
    ]


COLUMNS = [f.name for f in fields(Row)]


def _fmt(value, digits=3):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(rows):
    head = ["section", "B", "d", "implementation", "stopping rule", "median ms", "p20", "p80", "iters fwd max (mean)",
            "iters bwd", "x floor", "deqkern speedup", "check", "note / error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        iters = _fmt(r.iters_fwd_max) + (f" ({r.iters_fwd_mean:g})" if r.iters_fwd_mean is not None else "")
        note = f"ERROR {r.error}" if r.error else r.note
        cells = [r.section, r.B, r.d, r.implementation, r.stopping_rule, _fmt(r.median_ms), _fmt(r.p20_ms),
                 _fmt(r.p80_ms), iters, _fmt(r.iters_bwd_max), _fmt(r.x_floor), _fmt(r.deqkern_speedup), r.check, note]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def write_csv(path, header, rows):
    import csv

    with open(path, "w", newline="") as fh:
        for line in header:
            fh.write(f"# {line}\n")
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})


def fill_ratios(rows):
    """x floor (forward rows) and deqkern speedup (every row), within one section and (B, d)."""
    groups = {}
    for r in rows:
        groups.setdefault((r.section, r.B, r.d), []).append(r)
    for (section, B, d), group in groups.items():
        reference = next((r for r in group if r.implementation.startswith("deqkern-") and r.median_ms), None)
        if reference is not None:
            for r in group:
                if r.median_ms:
                    r.deqkern_speedup = r.median_ms / reference.median_ms
        floor = next((r for r in groups.get(("floor", B, d), []) if r.median_ms), None)
        if floor is not None and section in ("forward", "floor"):
            for r in group:
                if r.median_ms:
                    r.x_floor = r.median_ms / floor.median_ms


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: B=32 d=64 only, short timings, no torch.compile")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="output folder for the .md and .csv (default bench/results/)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cases", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, from {','.join(SECTIONS)} (default all)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated BxD sizes for forward/floor/fwdbwd, e.g. 32x64,256x256 (default per device)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timed repeats per measurement (default 0.5, 0.05 with --quick)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (implied by --quick)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.cases.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown --cases {sorted(unknown)}; choose from {SECTIONS}")
    if args.sizes:
        try:
            args.size_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
            assert all(len(s) == 2 and min(s) > 0 for s in args.size_list)
        except (ValueError, AssertionError):
            p.error(f"--sizes must look like 32x64,256x256, got {args.sizes!r}")
    else:
        args.size_list = QUICK_SIZES if args.quick else SIZES[args.device]
    if args.min_time is None:
        args.min_time = 0.05 if args.quick else 0.5
    args.no_compile = args.no_compile or args.quick
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    header = header_lines(device, args)
    print("\n".join(header), flush=True)
    warnings.simplefilter("always", deqkern.NonConvergenceWarning)

    rows = []
    for B, d in args.size_list:
        if {"forward", "floor"} & set(args.sections):
            rows += bench_forward(B, d, device, args, floor_too="floor" in args.sections)
            print(f"done forward B={B} d={d}", flush=True)
        if "fwdbwd" in args.sections:
            rows += bench_fwdbwd(B, d, device, args)
            print(f"done fwdbwd B={B} d={d}", flush=True)
    if "train" in args.sections:
        rows += bench_train(device, args)
        print("done train", flush=True)
    order = {s: i for i, s in enumerate(SECTIONS)}
    rows.sort(key=lambda r: (order[r.section], r.B, r.d))  # stable: keeps the implementation order
    fill_ratios(rows)

    table = markdown_table(rows)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"fixed_point_dense_{device.type}" + ("_quick" if args.quick else "")
    header.append(f"load average (1/5/15 min) at end: {_load_average()}")
    (out / f"{stem}.md").write_text(
        "# deqkern.fixed_point_dense benchmark\n\n" + "\n".join(f"- {line}" for line in header) + "\n\n" + table + "\n")
    write_csv(out / f"{stem}.csv", header, rows)
    print(f"\nwrote {out / (stem + '.md')} and {out / (stem + '.csv')}")
    return rows


if __name__ == "__main__":
    main()

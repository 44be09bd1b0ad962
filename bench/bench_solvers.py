"""Benchmark of deqkern.solve (Anderson, one fused op per iteration) against torchdeq 0.1.0's default Anderson.

f(z) = tanh(z W^T + c) is a plain PyTorch callable for both solvers; z0 = 0, float32, tol 1e-4 relative,
max_iter 100, CPU. Two layers are timed:

  slow    the issue's benchmark layer: W symmetric with eigenvalues spread over [0, 0.9], c = 0.1 N(0, 1)
          (Anderson's regulariser matters here: torchdeq's absolute lam=1e-4 costs it 5-7x more evaluations)
  random  W = 0.9 A / ||A||_2 with A Gaussian, c ~ N(0, 1): both solvers need about the same number of evaluations,
          so the end-to-end ratio is bounded by f's share of the time

Columns: evaluations of f, time per solve, time per iteration, time of f alone (a loop of its own), solver
overhead per iteration = (solve time - time spent inside f during the solve) / evaluations, and the ratios
torchdeq / deqkern. The solvers are timed interleaved (see time_solvers). Then: evaluations of f on the slow layer
at more sizes.

    python bench/bench_solvers.py [--quick] [--threads 2] [--out bench/results/solvers_cpu.md]
"""
import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import deqkern

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fixed_point_dense import interleaved_times, make_problem, measure  # noqa: E402  (same as there)

try:
    from torchdeq.solver import get_solver
except ImportError:
    get_solver = None

TOL, MAX_ITER = 1e-4, 100
SIZES = [(32, 64), (256, 256)]
SLOW_SIZES = [(32, 64), (32, 256), (256, 64), (256, 256)]


def slow_layer(B, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    W = ((Q * torch.linspace(0, 0.9, d, dtype=torch.float64)) @ Q.T).float()
    c = (0.1 * torch.randn(B, d, dtype=torch.float64, generator=g)).float()
    return W, c


def counted(f):
    calls = [0]

    def g(z):
        calls[0] += 1
        return f(z)

    return g, calls


def ours(f, z0):
    return deqkern.solve(f, z0, "anderson", tol=TOL, max_iter=MAX_ITER, on_nonconvergence="ignore")


def theirs(f, z0):
    return get_solver("anderson")(f, z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel")


def time_solvers(solvers, f, z0, min_time):
    """{name: (median ms per solve, median ms per solve outside f)}, the solvers interleaved (interleaved_times).

    The overhead is measured, not inferred: f is wrapped in a timer, and a solve's time outside f is its time minus
    the time spent inside f during that solve. (Subtracting f's time from a loop of its own would mix two machine
    states: inside a solve f's outputs fault pages in again and its matrix is evicted by the solver's buffers.)
    """
    inside_ms = {name: [] for name in solvers}  # per call, warm-up calls included

    def timed_solve(name, run):
        spent = [0.0]

        def timed_f(z):
            t0 = time.perf_counter()
            out = f(z)
            spent[0] += time.perf_counter() - t0
            return out

        def call():
            spent[0] = 0.0
            run(timed_f, z0)
            inside_ms[name].append(1e3 * spent[0])

        return call

    totals = interleaved_times({name: timed_solve(name, run) for name, run in solvers.items()}, min_time)
    out = {}
    for name, total in totals.items():
        inside = inside_ms[name][-len(total):]  # the timed calls are the last ones
        out[name] = (statistics.median(total), statistics.median([t - i for t, i in zip(total, inside)]))
    return out


def header(args):
    name = platform.processor() or "unknown CPU"
    try:
        name = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    commit = (git("rev-parse", "--short", "HEAD") or "unknown") + (
        "-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    return [
        f"device: {name} ({os.cpu_count()} logical CPUs), torch.set_num_threads({args.threads})",
        f"date (UTC): {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')}",
        f"git commit: {commit}",
        f"versions: torch {torch.__version__}, deqkern {deqkern.__version__}, python {platform.python_version()}",
        f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "timing: medians; the two solvers interleaved (one solve of each per round); overhead/iter = (solve time - "
        "time spent inside f during that solve) / evals, f wrapped in a timer; 'f alone' = f in a loop of its own, "
        "for reference",
        f"command: {shlex.join([sys.executable, *sys.argv])}",
        "deqkern: solve(method='anderson', m=5, beta=1, lam=1e-6 relative, check_every=1: the CPU default), "
        "per-sample stop; "
        "torchdeq: get_solver('anderson') defaults (m=6, lam=1e-4, tau=1), stop_mode='rel', whole-batch stop",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B=32 d=64 only, short timings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--out", default=None, help="also write the Markdown report to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    min_time = args.min_time or (0.3 if args.quick else 1.0)
    device = torch.device("cpu")
    lines = ["# deqkern.solve (Anderson) vs torchdeq Anderson", ""] + [f"- {h}" for h in header(args)] + [""]
    lines += ["| layer | B | d | solver | f evals | ms/solve | us/iter | us f alone | us overhead/iter | "
              "overhead ratio | end-to-end ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    problems = {"slow": lambda B, d: slow_layer(B, d), "random": lambda B, d: make_problem(B, d, device)[:2]}
    with torch.no_grad():
        for layer, (B, d) in [(layer, size) for layer in problems for size in (SIZES[:1] if args.quick else SIZES)]:
            W, c = problems[layer](B, d)
            z0 = torch.zeros(B, d)
            f = lambda z: torch.tanh(z @ W.T + c)
            solvers = {"deqkern": ours} if get_solver is None else {"deqkern": ours, "torchdeq": theirs}
            evals = {}
            for name, run in solvers.items():
                g, calls = counted(f)
                run(g, z0)
                evals[name] = calls[0]
            t_f = measure(lambda: f(z0), device, min_time)[0]
            timing = time_solvers(solvers, f, z0, min_time)
            rows = {name: (evals[name], t, t / evals[name], outside_f / evals[name])
                    for name, (t, outside_f) in timing.items()}
            for name, (evals, t, per, over) in rows.items():
                ratio_o = ratio_e = ""
                if name == "deqkern" and "torchdeq" in rows:
                    ratio_o = f"{rows['torchdeq'][3] / max(over, 1e-9):.1f}x less"
                    ratio_e = f"{rows['torchdeq'][1] / t:.1f}x faster"
                lines.append(f"| {layer} | {B} | {d} | {name} | {evals} | {t:.3f} | {1e3 * per:.1f} | "
                             f"{1e3 * t_f:.1f} | {1e3 * over:.1f} | {ratio_o} | {ratio_e} |")
        lines += ["", "## f evaluations on the slowly contracting layer (target <= 16), tol 1e-4 relative", "",
                  "| B | d | deqkern max iterations | deqkern converged | torchdeq f evals |", "|---|---|---|---|---|"]
        for B, d in (SLOW_SIZES[:1] if args.quick else SLOW_SIZES):
            W, c = slow_layer(B, d)
            f = lambda z: torch.tanh(z @ W.T + c)
            z, info = ours(f, torch.zeros(B, d))
            td = ""
            if get_solver is not None:
                g, calls = counted(f)
                theirs(g, torch.zeros(B, d))
                td = str(calls[0])
            lines.append(f"| {B} | {d} | {int(info.iterations.max())} | {bool(info.converged.all())} | {td} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

"""Benchmark of ||W||_2 by power iteration: deqkern's fused op against the same iteration in PyTorch and an SVD.

Problem: W (d, d) ~ N(0, 1), seed 0, start vector ones / sqrt(d), a fixed number of iterations (tol 1e-300, so
no sample stops early unless its value stops changing in the last bit; the `iters` column says how many ran).

  deqkern-op          torch.ops.deqkern.power_iteration(W, None, u0, "gram", ...), B = 1: one op, no checks
  deqkern-public      deqkern.lipschitz.spectral_norm (adds the NaN/Inf check and the convergence check)
  pytorch-loop        v = W.T @ (W @ v); v /= v.norm(), the same number of times, then ||W v||
  matrix_norm         torch.linalg.matrix_norm(W, 2) (an SVD: exact, no iteration)

Run `python bench/bench_power_iteration.py --help`; results go to --out as Markdown and CSV.
"""
import argparse
import csv
import datetime
import gc
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import deqkern
from deqkern import lipschitz

SEED = 0
TOL = 1e-300
SIZES = (64, 256, 1024)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
COLUMNS = ["d", "dtype", "implementation", "iters", "median_ms", "p20_ms", "p80_ms", "speedup_vs_pytorch_loop",
           "value", "rel_err_vs_svd", "note"]


def measure(fn, min_time):
    """(median, p20, p80) of fn() in ms: warm-up (>= 0.2 s), then repeats until min_time seconds and at least 5 repeats."""
    deadline = time.perf_counter() + max(0.2, 0.2 * min_time)  # warm-up: the first calls of a process stall
    for i in range(10000):
        fn()
        if i >= 2 and time.perf_counter() > deadline:
            break
    times = []
    gc.collect()
    gc.disable()
    try:
        while sum(times) < min_time or len(times) < 5:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    times = sorted(1e3 * t for t in times)
    pick = lambda q: times[min(len(times) - 1, int(q * (len(times) - 1) + 0.5))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def pytorch_loop(W, v, n_iter):
    """The textbook power iteration on W^T W, one PyTorch op per step."""
    for _ in range(n_iter):
        v = W.T @ (W @ v)
        v = v / v.norm()
    return (W @ v).norm()


def bench_size(d, dtype_name, n_iter, min_time):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(SEED)
    W = torch.randn(d, d, dtype=torch.float64, generator=g).to(dtype)
    u0 = torch.full((1, d), d ** -0.5, dtype=dtype)
    exact = torch.linalg.matrix_norm(W.double(), 2).item()
    rows = []

    def row(name, fn, value, iters, note=""):
        median, p20, p80 = measure(fn, min_time)
        rows.append(dict(d=d, dtype=dtype_name, implementation=name, iters=iters, median_ms=median, p20_ms=p20,
                         p80_ms=p80, value=float(value), rel_err_vs_svd=abs(float(value) - exact) / exact, note=note))

    op = torch.ops.deqkern.power_iteration
    out = op(W, None, u0, "gram", 0.0, n_iter, TOL)
    row("deqkern-op", lambda: op(W, None, u0, "gram", 0.0, n_iter, TOL), out[0][0], int(out[2][0]),
        "1 thread (B = 1: threads split the batch)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lipschitz.PowerIterationWarning)  # tol 1e-300 is never "reached"
        res = lipschitz.spectral_norm(W, n_iter=n_iter, tol=TOL, u0=u0[0], backend="cpu")
        row("deqkern-public", lambda: lipschitz.spectral_norm(W, n_iter=n_iter, tol=TOL, u0=u0[0], backend="cpu"),
            res.value, int(res.iterations), "spectral_norm: + finite/convergence checks")
    row("pytorch-loop", lambda: pytorch_loop(W, u0[0], n_iter), pytorch_loop(W, u0[0], n_iter), n_iter,
        f"{torch.get_num_threads()} threads")
    row("matrix_norm", lambda: torch.linalg.matrix_norm(W, 2), torch.linalg.matrix_norm(W, 2), "", "SVD")
    loop = next(r for r in rows if r["implementation"] == "pytorch-loop")["median_ms"]
    for r in rows:
        r["speedup_vs_pytorch_loop"] = loop / r["median_ms"]
    return rows


def _git(*cmd):
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""


def header_lines(args):
    name = platform.processor() or "unknown CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = (_git("rev-parse", "--short", "HEAD") or "unknown") + (
        "-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    try:
        load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "unknown"
    return [
        f"device: {name} ({os.cpu_count()} logical CPUs)",
        f"date (UTC): {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')}",
        f"git commit: {commit}",
        f"versions: torch {torch.__version__}, deqkern {deqkern.__version__}, python {platform.python_version()}",
        f"threads: torch.set_num_threads({args.threads}) -> {torch.get_num_threads()}; load average (1/5/15 min) "
        f"at start: {load}" + (" -- the machine is busy: timings are noisy" if load != "unknown"
                               and float(load.split("/")[0]) > (os.cpu_count() or 1) else ""),
        f"command: {shlex.join([sys.executable, *sys.argv])}",
        f"problem: ||W||_2 of W (d, d) ~ N(0, 1), seed {SEED}, u0 = ones / sqrt(d), {args.iters} iterations "
        f"(tol {TOL:g}), median / p20 / p80 over >= {args.min_time:g} s and >= 5 repeats",
    ]


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def markdown_table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: d = 256 only, short timings")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--iters", type=int, default=100, help="power iterations per call (default 100)")
    p.add_argument("--sizes", default=None, help="comma-separated d values (default 64,256,1024)")
    p.add_argument("--dtypes", default="float32,float64", help="comma-separated, from float32,float64")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed repeats (default 0.5; 0.05 quick)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="output folder for the .md and .csv (default bench/results/)")
    args = p.parse_args(argv)
    args.size_list = [int(s) for s in args.sizes.split(",")] if args.sizes else ([256] if args.quick else list(SIZES))
    args.dtype_list = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    if set(args.dtype_list) - set(DTYPES):
        p.error(f"--dtypes must be from {sorted(DTYPES)}")
    if args.min_time is None:
        args.min_time = 0.05 if args.quick else 0.5
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    header = header_lines(args)
    print("\n".join(header), flush=True)
    rows = []
    for d in args.size_list:
        for dtype_name in args.dtype_list:
            rows += bench_size(d, dtype_name, args.iters, args.min_time)
            print(f"done d={d} {dtype_name}", flush=True)
    table = markdown_table(rows)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "power_iteration_cpu" + ("_quick" if args.quick else "")
    (out / f"{stem}.md").write_text("# ||W||_2 by power iteration (deqkern.lipschitz)\n\n"
                                    + "\n".join(f"- {line}" for line in header) + "\n\n" + table + "\n")
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        for line in header:
            fh.write(f"# {line}\n")
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {out / (stem + '.md')} and {out / (stem + '.csv')}")
    return rows


if __name__ == "__main__":
    main()

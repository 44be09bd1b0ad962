"""Benchmark of deqkern.fixed_point_dense(method="anderson") against the fused Picard solve and torchdeq's anderson.

Problem (the slowly contracting layer): f(z) = tanh(z W^T + c), W = Q diag(linspace(0, 0.9, d)) Q^T with Q a random
orthogonal matrix (symmetric, eigenvalues in [0, 0.9]), c = 0.1 N(0, 1), z0 = 0, float32, relative tolerance 1e-4,
max_iter 100, one fixed seed. Rows: forward solve only (no autograd graph), per (B, d):

  deqkern-anderson   torch.ops.deqkern.fixed_point_dense_anderson (m=5, beta=1, lam=1e-4 relative), one op per solve
  deqkern-picard     torch.ops.deqkern.fixed_point_dense (alpha=1), one op per solve
  torchdeq-anderson  torchdeq.solver anderson_solver with its defaults except tol, max_iter and stop_mode='rel'

Targets: Anderson reaches tol in <= 16 layer evaluations, and is >= 3x faster than the fused Picard solve.
Run `python bench/bench_fixed_point_dense_anderson.py --help`; results go to --out as Markdown and CSV.
"""
import argparse
import shlex
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch

import deqkern

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fixed_point_dense import (  # noqa: E402
    _error_text,
    _git,
    _load_average,
    _stall_check,
    header_lines as _picard_header_lines,
    measure,
    measure_interleaved,
)

try:
    from torchdeq.solver import get_solver
except ImportError:
    get_solver = None

TOL = 1e-4
MAX_ITER = 100
SEED = 0
M, BETA, LAM = 5, 1.0, deqkern.ops.ANDERSON_DEFAULT_LAM
SIZES = [(32, 64), (32, 256), (256, 64), (256, 256)]
QUICK_SIZES = [(32, 64)]


def make_problem(batch, d, dtype=torch.float32, seed=SEED):
    """(W, c, z0) of the slowly contracting layer, made in float64 and cast."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))[0]
    W = q @ torch.diag(torch.linspace(0, 0.9, d, dtype=torch.float64)) @ q.T
    c = 0.1 * torch.randn(batch, d, dtype=torch.float64, generator=g)
    return W.to(dtype), c.to(dtype), torch.zeros(batch, d, dtype=dtype)


@dataclass
class Row:
    B: int
    d: int
    implementation: str
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    repeats: Optional[int] = None
    evals_max: Optional[int] = None
    evals_mean: Optional[float] = None
    converged: str = ""
    anderson_speedup: Optional[float] = None
    evals_ratio: Optional[float] = None
    check: str = ""
    error: str = ""


def bench_size(B, d, min_time):
    W, c, z0 = make_problem(B, d)
    rows = []

    def run(name, fn, stats, timing=None):
        row = Row(B, d, name)
        try:
            row.median_ms, row.p20_ms, row.p80_ms, row.repeats = timing or measure(fn, torch.device("cpu"), min_time)
            for key, value in stats().items():
                setattr(row, key, value)
        except Exception as exc:  # a failing peer must not stop the benchmark
            row.error = _error_text(exc)
        rows.append(row)

    anderson = lambda: torch.ops.deqkern.fixed_point_dense_anderson(W, c, z0, "tanh", M, BETA, LAM, TOL, MAX_ITER)
    picard = lambda: torch.ops.deqkern.fixed_point_dense(W, c, z0, "tanh", 1.0, TOL, MAX_ITER)
    z_ref = anderson()[0]

    def deqkern_stats(fn):
        def stats():
            z, iterations, _, converged = fn()
            return dict(evals_max=int(iterations.max()), evals_mean=round(float(iterations.float().mean()), 2),
                        converged=f"{int(converged.sum())}/{B}",
                        check=f"max abs(z - z_anderson) = {(z - z_ref).abs().max().item():.1e}")
        return stats

    # The two deqkern solves are timed interleaved: their ratio is the result, and drift must not enter it.
    try:
        timing = measure_interleaved({"anderson": anderson, "picard": picard}, min_time)
    except Exception:  # one of them fails: time them one at a time, so that run() records which
        timing = {"anderson": None, "picard": None}
    run("deqkern-anderson", anderson, deqkern_stats(anderson), timing["anderson"])
    run("deqkern-picard", picard, deqkern_stats(picard), timing["picard"])

    def torchdeq_anderson():
        if get_solver is None:
            raise RuntimeError("torchdeq is not installed")
        f = lambda z: torch.tanh(torch.addmm(c, z, W.T))
        return get_solver("anderson")(f, z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel")

    def torchdeq_stats():
        n = 0
        f0 = lambda z: torch.tanh(torch.addmm(c, z, W.T))

        def f(z):
            nonlocal n
            n += 1
            return f0(z)

        z, _, info = get_solver("anderson")(f, z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel")
        fz = f0(z)
        rel = (fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-12)
        return dict(evals_max=n, converged=f"{int((rel <= TOL).sum())}/{B} (deqkern's rel of the returned z)",
                    check=f"max abs(z - z_anderson) = {(z - z_ref).abs().max().item():.1e}")

    with torch.no_grad():
        run("torchdeq-anderson", torchdeq_anderson, torchdeq_stats)
    base, base_evals = rows[0].median_ms, rows[0].evals_mean
    for r in rows:
        if base and r.median_ms:
            r.anderson_speedup = r.median_ms / base
        if base_evals and r.evals_mean:
            r.evals_ratio = r.evals_mean / base_evals
    return rows


def header_lines(args):
    lines = _picard_header_lines(torch.device("cpu"), args)
    keep = [l for l in lines if l.split(":", 1)[0] in ("device", "date (UTC)", "git commit", "versions", "threads")]
    return keep + [
        f"command: {shlex.join([sys.executable, *sys.argv])}",
        "problem: f(z) = tanh(z W^T + c), W = Q diag(linspace(0, 0.9, d)) Q^T (symmetric, eigenvalues in [0, 0.9]), "
        f"c = 0.1 N(0,1), z0 = 0, float32, tol {TOL:g} (relative), max_iter {MAX_ITER}, seed {SEED}",
        f"deqkern-anderson: m={M}, beta={BETA:g}, lam={LAM:g} relative to the Gram diagonal; torchdeq anderson: its "
        "defaults (m=6, lam=1e-4 absolute, tau=1.0) with stop_mode='rel', tol, max_iter",
        f"timing: warm-up, then median / p20 / p80 over >= {args.min_time:g} s and >= 5 repeats; the two deqkern "
        "solves interleaved (one call of each per round), so that drift of the machine's speed does not enter "
        "their ratio",
        "columns: evals = evaluations of f (deqkern: per sample, max and mean; torchdeq: the whole batch's); "
        "x anderson = row median / deqkern-anderson median (so the Picard row is Anderson's speedup over it); "
        "evals ratio = row's mean evals / Anderson's mean evals: the speedup Anderson would have if its steps "
        "cost no more than Picard's (the ceiling for the Picard row, since both stop per sample)",
        "stopping rules: deqkern stops each sample once ||f(z) - z|| / (||f(z)|| + 1e-12) <= tol; torchdeq stops the "
        "batch once the largest rel residual (eps 1e-9) < tol, returning each sample's lowest-residual iterate",
    ]


def markdown_table(rows):
    head = ["B", "d", "implementation", "median ms", "p20", "p80", "evals max (mean)", "converged", "x anderson",
            "evals ratio", "check", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    for r in rows:
        evals = fmt(r.evals_max) + (f" ({r.evals_mean:g})" if r.evals_mean is not None else "")
        cells = [r.B, r.d, r.implementation, fmt(r.median_ms), fmt(r.p20_ms), fmt(r.p80_ms), evals, r.converged,
                 fmt(r.anderson_speedup), fmt(r.evals_ratio), r.check, r.error]
        lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: B=32 d=64 only, short timings")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="output folder for the .md and .csv (default bench/results/)")
    p.add_argument("--sizes", default=None, help="comma-separated BxD sizes, e.g. 32x64,256x256")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timed repeats per measurement (default 0.5, 0.05 with --quick)")
    args = p.parse_args(argv)
    if args.sizes:
        args.size_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    else:
        args.size_list = QUICK_SIZES if args.quick else SIZES
    if args.min_time is None:
        args.min_time = 0.05 if args.quick else 0.5
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    header = header_lines(args)
    print("\n".join(header), flush=True)
    warnings.simplefilter("ignore", deqkern.NonConvergenceWarning)
    rows = []
    for B, d in args.size_list:
        rows += bench_size(B, d, args.min_time)
        print(f"done B={B} d={d}", flush=True)
    table = markdown_table(rows)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "fixed_point_dense_anderson_cpu" + ("_quick" if args.quick else "")
    header.append(f"load average (1/5/15 min) at end: {_load_average()}")
    (out / f"{stem}.md").write_text("# deqkern.fixed_point_dense(method='anderson') benchmark\n\n"
                                    + "\n".join(f"- {line}" for line in header) + "\n\n" + table + "\n")
    import csv

    with open(out / f"{stem}.csv", "w", newline="") as fh:
        for line in header:
            fh.write(f"# {line}\n")
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    print(f"\nwrote {out / (stem + '.md')} and {out / (stem + '.csv')}")
    return rows


if __name__ == "__main__":
    main()

"""Benchmark of deqkern.fixed_point_dense(method="anderson") against the fused Picard solve and torchdeq's anderson.

Problem (the slowly contracting layer): f(z) = tanh(z W^T + c), W = Q diag(linspace(0, 0.9, d)) Q^T with Q a random
orthogonal matrix (symmetric, eigenvalues in [0, 0.9]), c = 0.1 N(0, 1), z0 = 0, float32, relative tolerance 1e-4,
max_iter 100, one fixed seed. Rows: forward solve only (no autograd graph), per (B, d):

  deqkern-anderson   torch.ops.deqkern.fixed_point_dense_anderson (m=5, beta=1, lam=1e-4 relative), one op per solve
  deqkern-picard     torch.ops.deqkern.fixed_point_dense (alpha=1), one op per solve
  torchdeq-anderson  torchdeq.solver anderson_solver with its defaults except tol, max_iter and stop_mode='rel'

Targets: Anderson reaches tol in <= 16 layer evaluations, and is >= 3x faster than the fused Picard solve.
Run `python bench/bench_fixed_point_dense_anderson.py --help`; results go to --out as Markdown, CSV and a PNG plot.
"""
import inspect
import warnings
from dataclasses import asdict, fields

import torch

import deqkern
from harness import cli, peers, provenance, report, results, timing, writers
from harness.peers import MAX_ITER, SEED, TOL

M, BETA = 5, 1.0
LAM = inspect.signature(deqkern.fixed_point_dense).parameters["lam"].default  # deqkern's default Anderson lam
SIZES = [(32, 64), (32, 256), (256, 64), (256, 256)]
QUICK_SIZES = [(32, 64)]
TITLE = "deqkern.fixed_point_dense(method='anderson') benchmark"
PANEL = "forward solve: speed-up of deqkern-anderson"


Row = results.row_class("Row", keys=dict(B=int, d=int, implementation=str), stats=dict(
    evals_max=int, evals_mean=float, converged=str, anderson_speedup=float, evals_ratio=float, check=str, error=str))


def bench_size(B, d, min_time):
    W, c, z0 = peers.slow_contraction_problem(B, d)
    f = peers.layer(W, c)
    anderson = lambda: torch.ops.deqkern.fixed_point_dense_anderson(W, c, z0, "tanh", M, BETA, LAM, TOL, MAX_ITER)
    picard = lambda: torch.ops.deqkern.fixed_point_dense(W, c, z0, "tanh", 1.0, TOL, MAX_ITER)
    z_ref = anderson()[0]
    check = lambda z: f"max abs(z - z_anderson) = {(z - z_ref).abs().max().item():.1e}"  # noqa: E731

    def row(name, fn, stats, timed=None):
        """timed: the row's Timing when measured already (interleaved); else fn is timed on its own here."""
        return results.fill(Row(B, d, name), lambda: {
            **(timed or timing.measure(fn, torch.device("cpu"), min_time)).fields(), **stats()})

    def deqkern_stats(fn):
        def stats():
            z, iterations, _, converged = fn()
            return dict(evals_max=int(iterations.max()), evals_mean=round(float(iterations.float().mean()), 2),
                        converged=f"{int(converged.sum())}/{B}", check=check(z))
        return stats

    def torchdeq_stats():
        g, calls = peers.counted(f)
        z, _ = peers.torchdeq_solve("anderson", g, z0)
        converged = int((peers.relative_residual(f(z), z) <= TOL).sum())
        return dict(evals_max=calls[0], converged=f"{converged}/{B} (deqkern's rel of the returned z)", check=check(z))

    # The two deqkern solves are timed interleaved: their ratio is the result, and drift must not enter it.
    try:
        timed = timing.measure_interleaved({"anderson": anderson, "picard": picard}, min_time)
    except Exception:  # one of them fails: time them one at a time, so that row() records which
        timed = {"anderson": None, "picard": None}
    rows = [row("deqkern-anderson", anderson, deqkern_stats(anderson), timed["anderson"]),
            row("deqkern-picard", picard, deqkern_stats(picard), timed["picard"])]
    with torch.no_grad():
        rows.append(row("torchdeq-anderson", lambda: peers.torchdeq_solve("anderson", f, z0), torchdeq_stats))
    base, base_evals = rows[0].median_ms, rows[0].evals_mean
    for r in rows:
        if base and r.median_ms:
            r.anderson_speedup = r.median_ms / base
        if base_evals and r.evals_mean:
            r.evals_ratio = r.evals_mean / base_evals
    return rows


def header_lines(args):
    return [
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
    fmt = writers.fmt
    return writers.markdown_table(head, (
        [r.B, r.d, r.implementation, fmt(r.median_ms), fmt(r.p20_ms), fmt(r.p80_ms),
         fmt(r.evals_max) + (f" ({r.evals_mean:g})" if r.evals_mean is not None else ""), r.converged,
         fmt(r.anderson_speedup), fmt(r.evals_ratio), r.check, r.error] for r in rows))


def speedup_panels(rows):
    """deqkern-anderson's speed-up over the fused Picard solve and torchdeq's anderson, per (B, d)."""
    groups = {}
    for r in rows:
        if r.implementation != "deqkern-anderson":
            groups.setdefault(f"B={r.B} d={r.d}", {})[r.implementation] = r.anderson_speedup
    return {PANEL: groups}


def main(argv=None):
    args = cli.BenchParser(__doc__, sizes={"cpu": SIZES}, quick_sizes=QUICK_SIZES,
                           quick_help="smoke run: B=32 d=64 only, short timings").parse_args(argv)
    device = cli.start(args)
    prov = provenance.collect(device, args.threads)
    prov.lines += header_lines(args)
    print("\n".join(prov.lines), flush=True)
    warnings.simplefilter("ignore", deqkern.NonConvergenceWarning)
    rows = []
    for B, d in args.size_list:
        rows += bench_size(B, d, args.min_time)
        print(f"done B={B} d={d}", flush=True)
    table = markdown_table(rows)
    print("\n" + table)
    report.write(report.stem_path(args.out, f"fixed_point_dense_anderson_{device.type}", args.quick), TITLE, prov,
                 [table], {"": ([f.name for f in fields(Row)], [asdict(r) for r in rows])}, speedup_panels(rows))
    return rows


if __name__ == "__main__":
    main()

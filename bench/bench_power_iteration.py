"""Benchmark of ||W||_2 by power iteration: deqkern's fused op against the same iteration in PyTorch and an SVD.

Problem: W (d, d) ~ N(0, 1), seed 0, start vector ones / sqrt(d), a fixed number of iterations (tol 1e-300, so
no sample stops early unless its value stops changing in the last bit; the `iters` column says how many ran).

  deqkern-op          torch.ops.deqkern.power_iteration(W, None, u0, "gram", ...), B = 1: one op, no checks
  deqkern-public      deqkern.lipschitz.spectral_norm (adds the NaN/Inf check and the convergence check)
  pytorch-loop        v = W.T @ (W @ v); v /= v.norm(), the same number of times, then ||W v||
  matrix_norm         torch.linalg.matrix_norm(W, 2) (an SVD: exact, no iteration)

Run `python bench/bench_power_iteration.py --help`; results go to --out as Markdown, CSV and a PNG plot.
"""
import warnings

import torch

from deqkern import lipschitz
from harness import cli, provenance, report, timing

SEED = 0
TOL = 1e-300
SIZES = [64, 256, 1024]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
COLUMNS = ["d", "dtype", "implementation", "iters", "median_ms", "p20_ms", "p80_ms", "speedup_vs_pytorch_loop",
           "value", "rel_err_vs_svd", "note"]
TITLE = "||W||_2 by power iteration (deqkern.lipschitz)"
DEQKERN_ROWS = ("deqkern-op", "deqkern-public")


def measure(fn, min_time):
    """This script's timing since it was written: >= 0.2 s of warm-up, quantiles at the nearest rank."""
    return timing.measure(fn, torch.device("cpu"), min_time, warmup_s=max(0.2, 0.2 * min_time),
                          max_warmup_calls=10000, quantile=timing.nearest_rank_quantile)


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
        median, p20, p80, _ = measure(fn, min_time)
        rows.append(dict(d=d, dtype=dtype_name, implementation=name, iters=iters, median_ms=median, p20_ms=p20,
                         p80_ms=p80, value=float(value), rel_err_vs_svd=abs(float(value) - exact) / exact, note=note))

    op = torch.ops.deqkern.power_iteration
    out = op(W, None, u0, "gram", 0.0, n_iter, TOL)
    row("deqkern-op", lambda: op(W, None, u0, "gram", 0.0, n_iter, TOL), out[0][0], int(out[2][0]),
        "1 thread (B = 1: threads split the batch)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lipschitz.PowerIterationWarning)  # tol 1e-300 is never "reached"
        res = lipschitz.spectral_norm(W, max_iter=n_iter, tol=TOL, u0=u0[0], backend="cpu")
        row("deqkern-public", lambda: lipschitz.spectral_norm(W, max_iter=n_iter, tol=TOL, u0=u0[0], backend="cpu"),
            res.value, int(res.iterations), "spectral_norm: + finite/convergence checks")
    row("pytorch-loop", lambda: pytorch_loop(W, u0[0], n_iter), pytorch_loop(W, u0[0], n_iter), n_iter,
        f"{torch.get_num_threads()} threads")
    row("matrix_norm", lambda: torch.linalg.matrix_norm(W, 2), torch.linalg.matrix_norm(W, 2), "", "SVD")
    loop = next(r for r in rows if r["implementation"] == "pytorch-loop")["median_ms"]
    for r in rows:
        r["speedup_vs_pytorch_loop"] = loop / r["median_ms"]
    return rows


def header_lines(args):
    return [f"problem: ||W||_2 of W (d, d) ~ N(0, 1), seed {SEED}, u0 = ones / sqrt(d), {args.iters} iterations "
            f"(tol {TOL:g}), median / p20 / p80 over >= {args.min_time:g} s and >= 5 repeats"]


def speedup_panels(rows):
    """{deqkern row: {"d=.. dtype": {peer: peer time / deqkern time}}}: the fused op, and the checked public API."""
    panels = {f"speed-up of {name}": {} for name in DEQKERN_ROWS}
    by_case = {}
    for r in rows:
        by_case.setdefault((r["d"], r["dtype"]), {})[r["implementation"]] = r["median_ms"]
    for (d, dtype), medians in by_case.items():
        for name in DEQKERN_ROWS:
            panels[f"speed-up of {name}"][f"d={d} {dtype}"] = {
                peer: ms / medians[name] for peer, ms in medians.items() if peer not in DEQKERN_ROWS}
    return panels


def parse_args(argv=None):
    p = cli.BenchParser(__doc__, sizes={"cpu": SIZES}, quick_sizes=[256], size_format="d",
                        quick_help="smoke run: d = 256 only, short timings",
                        sizes_help="comma-separated d values (default 64,256,1024)")
    p.add_argument("--iters", type=int, default=100, help="power iterations per call (default 100)")
    p.add_argument("--dtypes", default="float32,float64", help="comma-separated, from float32,float64")
    args = p.parse_args(argv)
    args.dtype_list = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    if set(args.dtype_list) - set(DTYPES):
        p.error(f"--dtypes must be from {sorted(DTYPES)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = cli.start(args)
    prov = provenance.collect(device, args.threads)
    prov.lines += header_lines(args)
    print("\n".join(prov.lines), flush=True)
    rows = []
    for d in args.size_list:
        for dtype_name in args.dtype_list:
            rows += bench_size(d, dtype_name, args.iters, args.min_time)
            print(f"done d={d} {dtype_name}", flush=True)
    report.write_table(args, "power_iteration", TITLE, prov, COLUMNS, rows, speedup_panels(rows))
    return rows


if __name__ == "__main__":
    main()

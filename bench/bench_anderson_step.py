"""Benchmark of deqkern.solve (Anderson, one fused deqkern::anderson_step op per iteration) against torchdeq 0.1.0's
default Anderson.

f is a plain PyTorch callable for both solvers; z0 = 0, float32, tol 1e-4 relative, max_iter 100. Three layers:

  slow    f(z) = tanh(z W^T + c), the issue's benchmark layer: W symmetric with eigenvalues spread over [0, 0.9],
          c = 0.1 N(0, 1) (Anderson's regulariser matters here: torchdeq's absolute lam=1e-4 costs it 5-7x more
          evaluations)
  random  f(z) = tanh(z W^T + c), W = 0.9 A / ||A||_2 with A Gaussian, c ~ N(0, 1): both solvers need about the same
          number of evaluations, so the end-to-end ratio is bounded by f's share of the time
  conv    a small convolutional DEQ: f(z) = tanh(conv3x3(z) + x) on (B, 16, 8, 8) images (d = 1024 per sample), the
          kernel scaled to operator norm 0.9 (conv_operator_norm), x ~ N(0, 1); the --sizes B applies, d is fixed

Columns: evaluations of f, time per solve, time per iteration, time of f alone (a loop of its own), solver
overhead per iteration = (solve time - time spent inside f during the solve) / evaluations, and the ratios
torchdeq / deqkern. The solvers are timed interleaved (see time_solvers). Then: evaluations of f on the slow layer
at more sizes. On CUDA (--device cuda) f runs asynchronously, so the time inside f is taken as evaluations x f's
own time (do_bench) rather than clocked around each call.

    python bench/bench_anderson_step.py [--quick] [--threads 2] [--device cuda] [--out bench/results]
"""
import statistics
import time

import torch

import deqkern
from deqkern.lipschitz import conv_operator_norm
from harness import cli, peers, provenance, report, timing, writers
from harness.peers import MAX_ITER, TOL

SIZES = [(32, 64), (256, 256)]
SLOW_SIZES = [(32, 64), (32, 256), (256, 64), (256, 256)]
QUICK_SIZES = [(32, 64)]
CONV_CHANNELS, CONV_SIDE = 16, 8


def conv_problem(B, d, dtype=torch.float32, seed=peers.SEED):
    """(f, z0) of the conv layer (module docstring); d is ignored: a sample is (16, 8, 8)."""
    g = torch.Generator().manual_seed(seed)
    kernel = torch.randn(CONV_CHANNELS, CONV_CHANNELS, 3, 3, generator=g, dtype=torch.float64)
    shape = (CONV_CHANNELS, CONV_SIDE, CONV_SIDE)
    norm, _ = conv_operator_norm(kernel, shape, padding=1, tol=1e-8)
    kernel = (0.9 * kernel / norm).to(dtype)
    x = torch.randn(B, *shape, generator=g, dtype=torch.float64).to(dtype)
    return kernel, x, torch.zeros_like(x)


def conv_layer(kernel, x):
    return lambda z: torch.tanh(torch.nn.functional.conv2d(z, kernel, padding=1) + x)


# layer name -> (problem(B, d) -> (weight, c, z0), f(weight, c))
LAYERS = {"slow": (peers.slow_contraction_problem, lambda W, c: peers.layer(W, c, fused=False)),
          "random": (peers.random_contraction_problem, lambda W, c: peers.layer(W, c, fused=False)),
          "conv": (conv_problem, conv_layer)}
TITLE = "deqkern.solve (Anderson) vs torchdeq Anderson"
COLUMNS = ["layer", "B", "d", "solver", "f_evals", "ms_per_solve", "us_per_iter", "us_f_alone",
           "us_overhead_per_iter", "overhead_ratio", "end_to_end_ratio"]
HEAD = ["layer", "B", "d", "solver", "f evals", "ms/solve", "us/iter", "us f alone", "us overhead/iter",
        "overhead ratio", "end-to-end ratio"]
EVALS_COLUMNS = ["B", "d", "deqkern_max_iterations", "deqkern_converged", "torchdeq_f_evals"]
EVALS_HEAD = ["B", "d", "deqkern max iterations", "deqkern converged", "torchdeq f evals"]
EVALS_HEADING = "## f evaluations on the slowly contracting layer (target <= 16), tol 1e-4 relative"


def deqkern_anderson(f, z0):
    return deqkern.solve(f, z0, method="anderson", tol=TOL, max_iter=MAX_ITER, on_nonconvergence="ignore")


def torchdeq_anderson(f, z0):
    return peers.torchdeq_solve("anderson", f, z0)


def time_solvers(solvers, f, z0, min_time, device):
    """{name: (median ms per solve, median ms per solve outside f)}, the solvers interleaved (interleaved_times).

    The overhead is measured, not inferred: f is wrapped in a timer, and a solve's time outside f is its time minus
    the time spent inside f during that solve. (Subtracting f's time from a loop of its own would mix two machine
    states: inside a solve f's outputs fault pages in again and its matrix is evicted by the solver's buffers.)
    On CUDA, where a call of f only queues work, the solves are timed with do_bench (not interleaved) and the time
    inside f is evals x f's own time: {name: (median ms per solve, None)}; bench_layer subtracts.
    """
    if device.type == "cuda":
        return {name: (timing.measure(lambda run=run: run(f, z0), device, min_time).median, None)
                for name, run in solvers.items()}
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

    totals = timing.interleaved_times({name: timed_solve(name, run) for name, run in solvers.items()}, min_time)
    out = {}
    for name, total in totals.items():
        inside = inside_ms[name][-len(total):]  # the timed calls are the last ones
        out[name] = (statistics.median(total), statistics.median([t - i for t, i in zip(total, inside)]))
    return out


def bench_layer(layer, B, d, min_time, device):
    """Rows of COLUMNS for both solvers on one layer and size; ratios on the deqkern row."""
    problem, make_f = LAYERS[layer]
    W, c, z0 = (t.to(device) for t in problem(B, d))
    f = make_f(W, c)
    d = z0[0].numel()
    solvers = {"deqkern": deqkern_anderson} if peers.torchdeq is None else {
        "deqkern": deqkern_anderson, "torchdeq": torchdeq_anderson}
    evals = {}
    for name, run in solvers.items():
        g, calls = peers.counted(f)
        run(g, z0)
        evals[name] = calls[0]
    t_f = timing.measure(lambda: f(z0), device, min_time).median
    rows = {}
    for name, (t, outside_f) in time_solvers(solvers, f, z0, min_time, device).items():
        if outside_f is None:  # CUDA: evals x f's own time
            outside_f = t - evals[name] * t_f
        rows[name] = dict(layer=layer, B=B, d=d, solver=name, f_evals=evals[name], ms_per_solve=t,
                          us_per_iter=1e3 * t / evals[name], us_f_alone=1e3 * t_f,
                          us_overhead_per_iter=1e3 * outside_f / evals[name], overhead_ratio=None,
                          end_to_end_ratio=None)
    if "torchdeq" in rows:
        ours, theirs = rows["deqkern"], rows["torchdeq"]
        ours["overhead_ratio"] = theirs["us_overhead_per_iter"] / max(ours["us_overhead_per_iter"], 1e-6)
        ours["end_to_end_ratio"] = theirs["ms_per_solve"] / ours["ms_per_solve"]
    return list(rows.values())


def slow_layer_evals(B, d):
    """A row of EVALS_COLUMNS: iterations deqkern needs on the slow layer, and torchdeq's evaluations of f."""
    W, c, z0 = peers.slow_contraction_problem(B, d)
    f = peers.layer(W, c, fused=False)
    _, info = deqkern_anderson(f, z0)
    torchdeq_evals = ""
    if peers.torchdeq is not None:
        g, calls = peers.counted(f)
        torchdeq_anderson(g, z0)
        torchdeq_evals = str(calls[0])
    return dict(B=B, d=d, deqkern_max_iterations=int(info.iterations.max()),
                deqkern_converged=bool(info.converged.all()), torchdeq_f_evals=torchdeq_evals)


def header_lines():
    return [
        "timing: medians; the two solvers interleaved (one solve of each per round); overhead/iter = (solve time - "
        "time spent inside f during that solve) / evals, f wrapped in a timer; 'f alone' = f in a loop of its own, "
        "for reference",
        "deqkern: solve(method='anderson', m=5, beta=1, lam=1e-6 relative, check_every=1: the CPU default), "
        "per-sample stop; "
        "torchdeq: get_solver('anderson') defaults (m=6, lam=1e-4, tau=1), stop_mode='rel', whole-batch stop",
    ]


def timing_table(rows):
    ratio = lambda value, word: "" if value is None else f"{value:.1f}x {word}"  # noqa: E731
    return writers.markdown_table(HEAD, (
        [r["layer"], r["B"], r["d"], r["solver"], r["f_evals"], f"{r['ms_per_solve']:.3f}", f"{r['us_per_iter']:.1f}",
         f"{r['us_f_alone']:.1f}", f"{r['us_overhead_per_iter']:.1f}", ratio(r["overhead_ratio"], "less"),
         ratio(r["end_to_end_ratio"], "faster")] for r in rows))


def speedup_panels(rows):
    """deqkern's end-to-end speed-up and its lower overhead per iteration, torchdeq / deqkern, per layer and size."""
    panels = {"end-to-end time per solve": {}, "solver overhead per iteration (time outside f)": {}}
    for r in rows:
        if r["solver"] == "deqkern":
            label = f"{r['layer']} B={r['B']} d={r['d']}"
            panels["end-to-end time per solve"][label] = {"torchdeq anderson": r["end_to_end_ratio"]}
            panels["solver overhead per iteration (time outside f)"][label] = {"torchdeq anderson": r["overhead_ratio"]}
    return panels


def main(argv=None):
    args = cli.BenchParser(__doc__, sizes={"cpu": SIZES, "cuda": SIZES}, quick_sizes=QUICK_SIZES, min_time=(1.0, 0.3),
                           quick_help="B=32 d=64 only, short timings",
                           sizes_help="comma-separated BxD sizes for both tables, e.g. 32x64,256x256 "
                                      "(default 32x64,256x256 timed; 4 sizes counted)").parse_args(argv)
    device = cli.start(args)
    prov = provenance.collect(device, args.threads)
    prov.lines += header_lines()
    print("\n".join(prov.lines), flush=True)
    evals_sizes = args.size_list if (args.sizes or args.quick) else SLOW_SIZES
    with torch.no_grad():
        rows = [row for layer in LAYERS for B, d in args.size_list
                for row in bench_layer(layer, B, d, args.min_time, device)]
        evals_rows = [slow_layer_evals(B, d) for B, d in evals_sizes]
    blocks = [timing_table(rows), EVALS_HEADING, writers.markdown_table(
        EVALS_HEAD, ([r[c] for c in EVALS_COLUMNS] for r in evals_rows))]
    print("\n" + "\n\n".join(blocks))
    report.write(report.stem_path(args.out, f"anderson_step_{device.type}", args.quick), TITLE, prov, blocks,
                 {"": (COLUMNS, rows), "_evals": (EVALS_COLUMNS, evals_rows)}, speedup_panels(rows))
    return rows, evals_rows


if __name__ == "__main__":
    main()

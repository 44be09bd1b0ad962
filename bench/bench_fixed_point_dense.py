"""Benchmark of deqkern.fixed_point_dense against torchdeq 0.1.0, an eager PyTorch loop and torch.compile.

Problem: f(z) = tanh(z W^T + c), W = 0.9 A / ||A||_2 with A ~ N(0, 1) (so ||W||_2 = 0.9), c ~ N(0, 1) i.i.d.,
z0 = 0, float32, relative tolerance 1e-4, max_iter 100, one fixed seed. Sections:

  forward   forward solve only (no autograd graph)
  floor     the same number of `z @ W.T` products as deqkern's iterations, back to back (torch.mm out=)
  fwdbwd    loss (z**2).sum() and backward to W and c
  train     one training step of a DEQLinear classifier (cross-entropy, Adam)

Run `python bench/bench_fixed_point_dense.py --help`; results go to --out as Markdown, CSV and a PNG plot.
"""
import time
import warnings
from dataclasses import asdict, fields

import torch
import torch.nn.functional as F
from torch import nn

import deqkern
from deqkern.core.backends import available_backends
from harness import cli, peers, provenance, report, results, timing, writers
from harness.peers import COUNTING, MAX_ITER, SEED, TOL, TORCHDEQ_SOLVERS

SIZES = {"cpu": [(32, 64), (256, 256), (64, 128)], "cuda": [(64, 64), (64, 256), (1024, 64), (1024, 256)]}
QUICK_SIZES = [(32, 64)]
SECTIONS = ("forward", "floor", "fwdbwd", "train")
SECTION_TITLES = dict(forward="forward solve", fwdbwd="solve + backward of (z**2).sum()",
                      train="training step (DEQLinear + Adam)")
TRAIN_SHAPE = dict(batch=64, in_features=64, hidden=128, classes=10)
TITLE = "deqkern.fixed_point_dense benchmark"

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


Row = results.row_class("Row", keys=dict(section=str, B=int, d=int, implementation=str, stopping_rule=str), stats=dict(
    iters_fwd_max=int, iters_fwd_mean=float, iters_bwd_max=int, x_floor=float, deqkern_speedup=float,
    check=str, note=str, error=str))


def run_row(row, make, device, min_time):
    """make() -> (fn, setup, stats dict); times fn and fills row. Any exception is recorded in row.error."""
    def work():
        fn, setup, stats = make()
        return {**timing.measure(fn, device, min_time, setup).fields(), **stats}

    return results.fill(row, work)


def _max_diff(a, b):
    return f"max abs(z - z_deqkern) = {(a.double() - b.double()).abs().max().item():.1e}"


def _rel_diff(name, a, b):
    diff = (a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)
    return f"rel err {name} vs deqkern = {diff.item():.1e}"


def _iteration_stats(info):
    return dict(iters_fwd_max=int(info.iterations.max()),
                iters_fwd_mean=round(float(info.iterations.float().mean()), 1))


def deqkern_backends(device):
    """The kernel backends that can run on `device` here (the Triton interpreter is no benchmark)."""
    return [b for b in available_backends(device) if b != "reference" and not (b == "triton" and device.type == "cpu")]


# ---------------------------------------------------------------- sections
def bench_forward(B, d, device, args, floor_too):
    W, c, z0 = peers.random_contraction_problem(B, d, device)
    f = peers.layer(W, c)
    rows, reference_z, n_iter = [], None, None
    check = lambda z: _max_diff(z, reference_z) if reference_z is not None else ""  # noqa: E731
    for backend in deqkern_backends(device):
        def make(backend=backend):
            nonlocal reference_z, n_iter
            fn = lambda: deqkern.fixed_point_dense(W, c, tol=TOL, max_iter=MAX_ITER, backend=backend)
            z, info = fn()
            if reference_z is None:
                reference_z, n_iter = z, int(info.iterations.max())
            return fn, None, dict(_iteration_stats(info), check=_max_diff(z, reference_z))

        rows.append(run_row(Row("forward", B, d, f"deqkern-{backend}", STOP_DEQKERN,
                                note="default on_nonconvergence='warn' (1 host sync/solve)"),
                            make, device, args.min_time))
    if "forward" in args.sections:
        for solver in TORCHDEQ_SOLVERS:
            def make(solver=solver):
                fn = lambda: peers.torchdeq_solve(solver, f, z0)
                z, _ = peers.torchdeq_solve(COUNTING.name(solver, "fwd"), f, z0)
                return fn, None, dict(iters_fwd_max=COUNTING.take()[0], check=check(z))

            note = "m=6, lam=1e-4, tau=1 (defaults)" if solver == "anderson" else "tau=1 (default)"
            rows.append(run_row(Row("forward", B, d, f"torchdeq-{solver}", STOP_TORCHDEQ, note=note),
                                make, device, args.min_time))

        def make_eager():
            fn = lambda: peers.eager_solve(f, z0)
            z, k = fn()
            return fn, None, dict(iters_fwd_max=k, check=check(z))

        rows.append(run_row(Row("forward", B, d, "pytorch-eager-loop", STOP_EAGER), make_eager, device, args.min_time))

        if not args.no_compile:
            compile_seconds = None

            def make_compiled():
                nonlocal compile_seconds
                step = peers.compile_step()
                t0 = time.perf_counter()
                z, k = peers.compiled_solve(step, W, c, z0)
                compile_seconds = time.perf_counter() - t0
                return (lambda: peers.compiled_solve(step, W, c, z0)), None, dict(iters_fwd_max=k, check=check(z))

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
    W0, c0, z0 = peers.random_contraction_problem(B, d, device)
    W, c = W0.clone().requires_grad_(), c0.clone().requires_grad_()
    f = peers.layer(W, c)
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
            deq = peers.torchdeq_deq(solver, solver)
            counting = peers.torchdeq_deq(COUNTING.name(solver, "fwd"), COUNTING.name(solver, "bwd"))

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
            box["z"], box["k"] = peers.eager_solve(f, z0)
            loss_backward(box["z"])

        fn()
        return fn, None, dict(iters_fwd_max=box["k"], iters_bwd_max=box["k"], check=grads_check())

    rows.append(run_row(Row("fwdbwd", B, d, "pytorch-eager-loop", STOP_EAGER,
                            note="autograd through the unrolled iterations"), make_eager, device, args.min_time))
    return rows


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

    def classifier(f_solver, b_solver):
        return peers.TorchDEQClassifier(s["in_features"], s["hidden"], s["classes"], f_solver, b_solver).to(device)

    torchdeq_rows = []
    for f_solver in TORCHDEQ_SOLVERS:
        for b_solver in TORCHDEQ_SOLVERS:
            def make(f_solver=f_solver, b_solver=b_solver):
                model = classifier(f_solver, b_solver)
                with torch.no_grad():
                    model.injection.load_state_dict(template["deq"].injection.state_dict())
                    model.weight.copy_(template["deq"].weight)
                    model.head.load_state_dict(template["head"].state_dict())
                optimizer, setup, loss = prepare(model)
                counting = classifier(COUNTING.name(f_solver, "fwd"), COUNTING.name(b_solver, "bwd"))
                counting.load_state_dict(model.state_dict())
                F.cross_entropy(counting(x), y).backward()
                fwd, bwd = COUNTING.take()
                return (lambda: _train_step(model, optimizer, x, y)), setup, dict(
                    iters_fwd_max=fwd, iters_bwd_max=bwd, check=loss_check(loss))

            name = f"torchdeq-IFT-f:{f_solver}-b:{b_solver}"
            torchdeq_rows.append(run_row(Row("train", s["batch"], s["hidden"], name, STOP_TORCHDEQ,
                                             note="get_deq(core='sliced', ift=True), Adam"),
                                         make, device, args.min_time))
    timed = [r for r in torchdeq_rows if r.median_ms is not None]
    if timed:
        fastest = min(timed, key=lambda r: r.median_ms)
        fastest.note += "; FASTEST torchdeq configuration"
    return rows + torchdeq_rows


# ---------------------------------------------------------------- report
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


def header_lines(device, args):
    return [
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


def markdown_table(rows):
    head = ["section", "B", "d", "implementation", "stopping rule", "median ms", "p20", "p80", "iters fwd max (mean)",
            "iters bwd", "x floor", "deqkern speedup", "check", "note / error"]
    fmt = writers.fmt
    return writers.markdown_table(head, (
        [r.section, r.B, r.d, r.implementation, r.stopping_rule, fmt(r.median_ms), fmt(r.p20_ms), fmt(r.p80_ms),
         fmt(r.iters_fwd_max) + (f" ({r.iters_fwd_mean:g})" if r.iters_fwd_mean is not None else ""),
         fmt(r.iters_bwd_max), fmt(r.x_floor), fmt(r.deqkern_speedup), r.check,
         f"ERROR {r.error}" if r.error else r.note] for r in rows))


def speedup_panels(rows):
    """{section: {"B=.. d=..": {peer: peer time / first deqkern row's time}}}; the floor is no peer."""
    panels, reference = {}, {}
    for r in rows:
        if r.implementation.startswith("deqkern-"):
            reference.setdefault(r.section, r.implementation)
        elif r.section != "floor":
            title = f"{SECTION_TITLES[r.section]}: speed-up of {reference.get(r.section, 'deqkern')}"
            panels.setdefault(title, {}).setdefault(f"B={r.B} d={r.d}", {})[r.implementation] = r.deqkern_speedup
    return panels


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = cli.BenchParser(__doc__, sizes=SIZES, quick_sizes=QUICK_SIZES,
                        quick_help="tiny smoke run: B=32 d=64 only, short timings, no torch.compile",
                        sizes_help="comma-separated BxD sizes for forward/floor/fwdbwd, e.g. 32x64,256x256 "
                                   "(default per device)")
    p.add_argument("--cases", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, from {','.join(SECTIONS)} (default all)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (implied by --quick)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.cases.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown --cases {sorted(unknown)}; choose from {SECTIONS}")
    args.no_compile = args.no_compile or args.quick
    return args


def main(argv=None):
    args = parse_args(argv)
    device = cli.start(args)
    prov = provenance.collect(device, args.threads)
    prov.lines += header_lines(device, args)
    print("\n".join(prov.lines), flush=True)
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
    report.write(report.stem_path(args.out, f"fixed_point_dense_{device.type}", args.quick), TITLE, prov, [table],
                 {"": ([f.name for f in fields(Row)], [asdict(r) for r in rows])}, speedup_panels(rows))
    return rows


if __name__ == "__main__":
    main()

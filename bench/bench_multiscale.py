"""Benchmark of a multiscale DEQ (MDEQ) training step: deqkern's nn.MultiscaleDEQ solve against torchdeq's get_deq on
the same cell instance (the same f, the same weights), interleaved.

Problem: MultiscaleDEQClassifier (the MDEQ cell, GroupNorm, dropout 0) with its classification head, cross-entropy
on random labels, one Adam step (lr 0, so every repeat solves the same problem); random inputs of the digits' size
(1 x 8 x 8) and of CIFAR's (3 x 32 x 32), B = 64. Both solve to the relative residual TOL per sample within
MAX_ITER evaluations (torchdeq: stop_mode "rel", the batch stops when its worst sample does), forward and IFT
backward with the same method.

  deqkern <method>     nn.MultiscaleDEQ(method=<method>, backward="ift", backward method <method>)
  torchdeq <solver>    torchdeq.get_deq(f_solver=<solver>, b_solver=<solver>, ift=True) around the same cell
  f work alone         deqkern anderson's evaluation counts with no solver at all (EvaluationsAlone): the floor

Columns: median / p20 / p80 ms of one training step, evaluations of f in the forward solve and of the adjoint's
vector-Jacobian product in the backward solve (counted on one untimed step), and speedup = time of torchdeq's
fastest configuration / deqkern's time (> 1: deqkern is faster).
Run `python bench/bench_multiscale.py --help`; results go to --out as Markdown, CSV and a PNG plot.
"""
import torch
import torch.nn.functional as F
from torch import nn

import deqkern
from harness import cli, peers, provenance, report, timing, writers

TOL = 1e-3  # MDEQ trains at loose tolerances (its own code: 30 Broyden steps, no tolerance target)
MAX_ITER = 30
SEED = 0
PROBLEMS = {"digits 1x8x8": (1, 8, (8, 16)), "CIFAR 3x32x32": (3, 32, (8, 16))}  # in channels, size, channels
COLUMNS = ["problem", "B", "implementation", "fwd_evals", "bwd_evals", "median_ms", "p20_ms", "p80_ms",
           "speedup_vs_torchdeq_fastest", "note"]
TITLE = "Multiscale DEQ training step: deqkern vs torchdeq on the same cell"
DEQKERN_METHODS = ("anderson", "broyden")
TORCHDEQ_SOLVERS = ("anderson", "broyden")


# torchdeq's solvers, registered under names that count evaluations of the function each solve is handed (forward:
# f; backward: the adjoint's vector-Jacobian product).
COUNTING = peers.CountingSolvers(TORCHDEQ_SOLVERS)


class DeqkernMultiscale(nn.Module):
    """The injection and cell of a deqkern MultiscaleDEQ (shared, not copied) solved by an nn.DEQ of `method`."""

    def __init__(self, deq: deqkern.nn.MultiscaleDEQ, method: str):
        super().__init__()
        self.inner = deq
        options = dict(tol=TOL, max_iter=MAX_ITER, on_nonconvergence="ignore")
        self.solver = deqkern.nn.DEQ(deq.cell, method=method, solver_options=options,
                                     backward_options=dict(options, method=method))

    def forward(self, x):
        shapes = self.inner.state_shapes(x.shape[2], x.shape[3])
        z0 = tuple(x.new_zeros((x.shape[0], *shape)) for shape in shapes)
        return self.solver((self.inner.injection(x), None), z0=z0)


class TorchDEQMultiscale(nn.Module):
    """The injection and cell of a deqkern MultiscaleDEQ (shared, not copied) solved by torchdeq's get_deq."""

    def __init__(self, deq: deqkern.nn.MultiscaleDEQ, solver: str):
        super().__init__()
        self.inner = deq
        self.solver = peers.torchdeq_deq(COUNTING.name(solver, "fwd"), COUNTING.name(solver, "bwd"), tol=TOL,
                                         max_iter=MAX_ITER)

    def forward(self, x):
        shapes = self.inner.state_shapes(x.shape[2], x.shape[3])
        injection = self.inner.injection(x)
        z0 = [x.new_zeros((x.shape[0], *shape)) for shape in shapes]
        z_out, _ = self.solver(lambda *z: list(self.inner.cell(tuple(z), (injection, None))), z0)
        return tuple(z_out[-1])


def build(in_channels, channels):
    torch.manual_seed(SEED)
    options = dict(tol=TOL, max_iter=MAX_ITER, on_nonconvergence="ignore")
    model = deqkern.nn.MultiscaleDEQClassifier(in_channels, 10, channels, expansion=2, final_channels=32,
                                               solver_options=options, backward_options=options)
    return model


class EvaluationsAlone(nn.Module):
    """The floor of any solver's training step at given evaluation counts: f evaluated `forward` times without grad
    (plain substitution, no mixing, no residuals), f(z, x) once with grad for the output, and `backward` vector-Jacobian
    products g <- J^T g + v on one graph at z, with no solver around them. torchdeq's time / this time is the largest
    speedup over torchdeq a solver can reach at these evaluation counts."""

    def __init__(self, deq: deqkern.nn.MultiscaleDEQ, forward: int, backward: int):
        super().__init__()
        self.inner, self.forward_evals, self.backward_evals = deq, forward, backward

    def forward(self, x):
        shapes = self.inner.state_shapes(x.shape[2], x.shape[3])
        injection = self.inner.injection(x)
        constant = (injection.detach(), None)
        z = tuple(x.new_zeros((x.shape[0], *shape)) for shape in shapes)
        with torch.no_grad():
            for _ in range(self.forward_evals):
                z = self.inner.cell(z, constant)
        return _AdjointByVJPs.apply(self, z, injection, *self.inner.cell.parameters())


class _AdjointByVJPs(torch.autograd.Function):
    """y = f(z*, x) whose backward runs `backward_evals` plain vector-Jacobian products (the floor's adjoint)."""

    @staticmethod
    def forward(ctx, floor, z, injection, *params):
        ctx.floor, ctx.z = floor, z
        ctx.save_for_backward(injection, *params)
        with torch.no_grad():
            return floor.inner.cell(z, (injection, None))

    @staticmethod
    def backward(ctx, *v):
        floor, (injection, *params) = ctx.floor, ctx.saved_tensors
        with torch.enable_grad():
            h = tuple(t.detach().requires_grad_() for t in ctx.z)
            inj = injection.detach().requires_grad_()
            fh = floor.inner.cell(h, (inj, None))
            g = v
            for _ in range(floor.backward_evals):
                g = tuple(a + b for a, b in zip(torch.autograd.grad(fh, h, g, retain_graph=True), v))
            grads = torch.autograd.grad(fh, [inj, *params], g, allow_unused=True)
        return (None, None, *grads)


def training_step(model, forward, x, y, optimizer):
    def step():
        logits = model.head(forward(x))
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench_problem(name, batch, min_time, device):
    in_channels, size, channels = PROBLEMS[name]
    model = build(in_channels, channels).to(device)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(batch, in_channels, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    steps, counts, notes = {}, {}, {}
    for method in DEQKERN_METHODS:
        label = f"deqkern {method}"
        wrapped = DeqkernMultiscale(model.deq, method)
        steps[label] = training_step(model, wrapped, x, y, optimizer)
        steps[label]()
        info = wrapped.solver.last_info
        # CPU: the batch evaluates f until its last sample stops (check_every 1): the largest count per sample
        counts[label] = (int(info.iterations.max()), int(info.backward.iterations.max()))
        notes[label] = (f"per-sample stop; mean evaluations per sample {float(info.iterations.float().mean()):.1f} "
                        f"forward, {float(info.backward.iterations.float().mean()):.1f} backward")
    for solver in TORCHDEQ_SOLVERS:
        label = f"torchdeq {solver}"
        try:
            wrapped = TorchDEQMultiscale(model.deq, solver)
        except RuntimeError as error:
            notes[label] = str(error)
            continue
        steps[label] = training_step(model, wrapped, x, y, optimizer)
        COUNTING.take()
        steps[label]()
        counts[label] = COUNTING.take()
        notes[label] = "the batch stops at its worst sample"
    floor = "f work alone (no solver)"
    counts[floor] = counts["deqkern anderson"]
    steps[floor] = training_step(model, EvaluationsAlone(model.deq, *counts[floor]), x, y, optimizer)
    notes[floor] = ("deqkern anderson's evaluation counts with no solver around them: the floor of any solver's step; "
                    "its speedup is the largest a solver can reach over torchdeq at these counts")
    times = timing.measure_interleaved(steps, min_time)
    fastest_peer = min((t.median for k, t in times.items() if k.startswith("torchdeq")), default=None)
    rows = []
    for label in list(steps) + [k for k in notes if k not in steps]:
        t = times.get(label)
        fwd, bwd = counts.get(label, (None, None))
        rows.append(dict(problem=name, B=batch, implementation=label, fwd_evals=fwd, bwd_evals=bwd,
                         median_ms=t.median if t else None, p20_ms=t.p20 if t else None, p80_ms=t.p80 if t else None,
                         speedup_vs_torchdeq_fastest=(fastest_peer / t.median if t and fastest_peer
                                                      and not label.startswith("torchdeq") else None),
                         note=notes.get(label, "")))
    return rows


def speedup_panels(rows):
    panel = {}
    for r in rows:
        if r["speedup_vs_torchdeq_fastest"]:
            panel.setdefault(f"{r['problem']} B={r['B']}", {})[f"vs torchdeq fastest ({r['implementation']})"] = \
                r["speedup_vs_torchdeq_fastest"]
    return {"training step": panel}


def main(argv=None):
    args = cli.BenchParser(__doc__, sizes={"cpu": [64], "cuda": [64]}, quick_sizes=[8], size_format="d",
                           quick_help="B = 8, short timings", sizes_help="comma-separated batch sizes (default 64)",
                           min_time=(3.0, 0.3)).parse_args(argv)
    device = cli.start(args)
    prov = provenance.collect(device, args.threads)
    prov.lines.append(f"problem: MultiscaleDEQClassifier channels (8, 16), expansion 2, GroupNorm, head to 10 "
                      f"classes; one Adam step (lr 0) on random data; tol {TOL:g} (relative, per sample for deqkern, "
                      f"worst sample for torchdeq), max_iter {MAX_ITER} forward and backward; interleaved medians")
    print("\n".join(prov.lines), flush=True)
    rows = [row for name in PROBLEMS for batch in args.size_list
            for row in bench_problem(name, batch, args.min_time, device)]
    table = writers.markdown_table(COLUMNS, ([writers.fmt(r[c]) for c in COLUMNS] for r in rows))
    print("\n" + table)
    report.write(report.stem_path(args.out, f"multiscale_{device.type}", args.quick), TITLE, prov, [table],
                 {"": (COLUMNS, rows)}, speedup_panels(rows))
    return rows


if __name__ == "__main__":
    main()

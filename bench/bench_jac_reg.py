"""Benchmark of Jacobian regularisation's cost per training step: the dense layers' `jac_reg=` (the exact penalty
sum_i act'(u_i)^2 ||W_i||^2 / numel in closed form, z* held constant, no double backward) against the same step
without a penalty and with the Hutchinson estimate by a double backward (what Bai et al.'s code and torchdeq do).

Problem: one Adam step of DEQLinear(64 -> d, tanh, tol 1e-4, max_iter 100) + Linear(d -> 10) with cross-entropy,
a batch of B handwritten digits (scikit-learn's, standardised), float32, seed 0. Adam's learning rate is 0 so that
every timed step solves the same problem (the iteration counts do not drift while timing); everything else of the
step runs.

  no-penalty          the step without a penalty
  jac_reg             DEQLinear(..., jac_reg=1.0): the penalty's gradient in closed form, computed inside the
                      backward op's kernel where s = act'(z* W^T + c) is (the target: <= 1.05x)
  hutchinson-1probe   loss + 1.0 * deqkern.jacobian.jacobian_reg(layer, z.detach(), x): one Rademacher probe,
                      a vector-Jacobian product with create_graph=True and its double backward

The three are timed interleaved in one run (one call of each per round); the ratio to `no-penalty` is the result.
Run `python bench/bench_jac_reg.py --help`; results go to --out as Markdown, CSV and a PNG plot.
"""
import torch

import deqkern
from deqkern.apps.digits import load_digits_split
from deqkern.jacobian import jacobian_reg
from harness import cli, provenance, report, timing

SEED = 0
SIZES = [(64, 128), (128, 128), (64, 256)]
COLUMNS = ["B", "d", "implementation", "median_ms", "p20_ms", "p80_ms", "repeats", "x_no_penalty",
           "forward_iters", "backward_iters", "penalty"]
TITLE = "Jacobian regularisation: cost of one training step (DEQLinear + Linear, Adam)"
VARIANTS = ("no-penalty", "jac_reg", "hutchinson-1probe")


def make_step(variant, batch, d, x_all, y_all):
    """A closure running one training step of its own model copy (all copies start from the same weights)."""
    torch.manual_seed(SEED)
    layer = deqkern.nn.DEQLinear(64, d, tol=1e-4, max_iter=100, jac_reg=1.0 if variant == "jac_reg" else None)
    head = torch.nn.Linear(d, 10)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=0.0)
    x, y = x_all[:batch], y_all[:batch]
    state = {}

    def step():
        z = layer(x)
        loss = torch.nn.functional.cross_entropy(head(z), y)
        if variant == "hutchinson-1probe":
            penalty = jacobian_reg(layer, z.detach(), x)
            loss = loss + 1.0 * penalty
            state["penalty"] = penalty.detach()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if variant == "jac_reg":
            state["penalty"] = layer.last_jac_loss  # filled by the backward
        state["forward_iters"] = float(layer.last_info.iterations.double().mean())
        state["backward_iters"] = float(layer.last_info.backward.iterations.double().mean())

    return step, state


def bench_size(batch, d, min_time, x_all, y_all):
    steps = {v: make_step(v, batch, d, x_all, y_all) for v in VARIANTS}
    timings = timing.measure_interleaved({v: fn for v, (fn, _) in steps.items()}, min_time)
    base = timings["no-penalty"].median
    rows = []
    for v in VARIANTS:
        state = steps[v][1]
        rows.append(dict(B=batch, d=d, implementation=v, **timings[v].fields(),
                         x_no_penalty=timings[v].median / base, forward_iters=state["forward_iters"],
                         backward_iters=state["backward_iters"],
                         penalty=float(state["penalty"]) if "penalty" in state else ""))
    return rows


def speedup_panels(rows):
    """{"speed-up of jac_reg=": {"B=.. d=..": {peer: peer time / jac_reg time}}}."""
    panel = {}
    for r in rows:
        panel.setdefault(f"B={r['B']} d={r['d']}", {})[r["implementation"]] = r["median_ms"]
    return {"speed-up of jac_reg= (closed form)": {
        size: {peer: ms / medians["jac_reg"] for peer, ms in medians.items() if peer != "jac_reg"}
        for size, medians in panel.items()}}


def main(argv=None):
    p = cli.BenchParser(__doc__, sizes={"cpu": SIZES}, quick_sizes=[(64, 128)],
                        quick_help="smoke run: B=64, d=128 only, short timings", min_time=(3.0, 0.3))
    args = p.parse_args(argv)
    device = cli.start(args)
    prov = provenance.collect(device, args.threads)
    prov.lines.append(f"problem: one Adam step (lr 0) of DEQLinear(64 -> d, tanh, tol 1e-4) + Linear(d -> 10), "
                      f"cross-entropy on B digits, float32, seed {SEED}; variants interleaved, median / p20 / p80 "
                      f"over >= {args.min_time:g} s each")
    print("\n".join(prov.lines), flush=True)
    (x_all, y_all), _ = load_digits_split("cpu", torch.float32)
    rows = []
    for batch, d in args.size_list:
        rows += bench_size(batch, d, args.min_time, x_all, y_all)
        print(f"done B={batch} d={d}", flush=True)
    report.write_table(args, "jac_reg", TITLE, prov, COLUMNS, rows, speedup_panels(rows))
    return rows


if __name__ == "__main__":
    main()

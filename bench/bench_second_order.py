"""Benchmark of a second derivative's cost: one training step of a DEQ energy model on forces (the predicted forces
-dE/dx taken with create_graph=True, the loss ||F_pred - F||^2 differentiated again in the parameters), with the
implicit backward's second derivatives against the same model unrolled to the same tolerance.

Problem: deqkern.apps.force_matching.DEQEnergy(dim 8 -> hidden d), f(z, x) = tanh(z W^T + x U^T + b), ||W||_2 = s
at initialisation (s = 0.5: a fast contraction, s = 0.95: a slow one), readout Linear(d -> 1); B positions ~ N(0, 1) and the synthetic potential's forces; float32,
seed 0; one Adam step with learning rate 0, so that every timed step solves the same problem.

  DEQ-ift        nn.DEQ around the cell (Anderson, tol 1e-5, IFT backward, its second derivatives implicit)
  unrolled       the same cell (the same weights) iterated K times from zero with autograd through every step, K the
                 Picard iterations the slowest sample needs to reach tol 1e-5 (measured before timing)
  LipschitzDEQ   the certified dense layer (its own weights and initialisation, ||W||_2 < 1 kept at every step),
                 fused dense solve: a third model, not the same one

The variants are timed interleaved in one run (one call of each per round); the ratio to `unrolled` is the result.
Memory: the bytes autograd saves for backward during the step (torch.autograd.graph.saved_tensors_hooks: the
forward's graph, the create_graph backward's and the custom functions' saved tensors), the part of a step's memory
that grows with K when unrolled. Run `python bench/bench_second_order.py --help`; results go to --out as Markdown,
CSV and a PNG plot.
"""
import torch

import deqkern
from deqkern.apps.force_matching import DEQEnergy, force_loss, target_forces
from harness import cli, provenance, report, timing

SEED = 0
DIM, TOL = 8, 1e-5
SIZES = [(64, 64), (64, 256), (256, 256)]
SCALES = (0.5, 0.95)
COLUMNS = ["B", "d", "s", "implementation", "median_ms", "p20_ms", "p80_ms", "repeats", "x_unrolled", "saved_MB",
           "steps_or_iters", "loss"]
TITLE = "Second derivatives: one force-matching training step of a DEQ energy model"
VARIANTS = ("DEQ-ift", "unrolled", "LipschitzDEQ")


def unrolled_steps_needed(model, x):
    """The Picard iterations the slowest sample needs to reach TOL with this model's cell."""
    _, info = deqkern.solve(lambda z: model.cell(z, x), x.new_zeros(x.shape[0], model.cell.weight.shape[0]),
                            method="picard", tol=TOL, max_iter=1000, on_nonconvergence="raise")
    return int(info.iterations.max())


def make_steps(batch, hidden, scale):
    """{variant: (step closure, state)}: DEQ-ift and unrolled share the cell's weights."""
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(batch, DIM, generator=generator)
    forces = target_forces(x)
    torch.manual_seed(SEED)
    deq_model = DEQEnergy(DIM, hidden, layer="DEQ", tol=TOL, scale=scale)
    steps = unrolled_steps_needed(deq_model, x)
    unrolled = DEQEnergy(DIM, hidden, layer="unrolled", unrolled_steps=steps)
    unrolled.load_state_dict(deq_model.state_dict(), strict=False)
    torch.manual_seed(SEED)
    lipschitz = DEQEnergy(DIM, hidden, layer="LipschitzDEQ", tol=TOL)
    out = {}
    for name, model in (("DEQ-ift", deq_model), ("unrolled", unrolled), ("LipschitzDEQ", lipschitz)):
        opt = torch.optim.Adam(model.parameters(), lr=0.0)
        state = {}

        def step(model=model, opt=opt, state=state, solved=name != "unrolled"):
            loss = force_loss(model, x, forces)
            opt.zero_grad()
            loss.backward()
            opt.step()
            state["loss"] = loss.item()
            if solved:  # the forward solve's statistics, its adjoint's in .backward
                state["info"] = model.layer.last_info
        out[name] = (step, state)
    out["unrolled"][1]["steps"] = steps
    return out


def saved_megabytes(step):
    """MB of tensors autograd saves for backward during one call of step."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total[0] / 2 ** 20


def bench_size(batch, hidden, scale, min_time):
    steps = make_steps(batch, hidden, scale)
    memory = {name: saved_megabytes(fn) for name, (fn, _) in steps.items()}
    timings = timing.measure_interleaved({name: fn for name, (fn, _) in steps.items()}, min_time)
    base = timings["unrolled"].median
    rows = []
    for name in VARIANTS:
        state = steps[name][1]
        info = state.get("info")
        if info is None:
            iters = f"{state['steps']} steps"
        else:
            iters = f"{float(info.iterations.double().mean()):.1f} fwd"
            if info.backward is not None:
                iters += f" / {float(info.backward.iterations.double().mean()):.1f} bwd"
        rows.append(dict(B=batch, d=hidden, s=scale, implementation=name, **timings[name].fields(),
                         x_unrolled=timings[name].median / base, saved_MB=memory[name], steps_or_iters=iters,
                         loss=state["loss"]))
    return rows


def speedup_panels(rows):
    """{"speed-up of DEQ-ift": {"B=.. d=..": {peer: peer time / DEQ-ift time}}}."""
    panel = {}
    for r in rows:
        panel.setdefault(f"B={r['B']} d={r['d']} s={r['s']}", {})[r["implementation"]] = r["median_ms"]
    return {"speed-up of the implicit second derivative (DEQ-ift)": {
        size: {peer: ms / medians["DEQ-ift"] for peer, ms in medians.items() if peer != "DEQ-ift"}
        for size, medians in panel.items()}}


def main(argv=None):
    p = cli.BenchParser(__doc__, sizes={"cpu": SIZES}, quick_sizes=[(64, 64)],
                        quick_help="smoke run: B=64, d=64 only, short timings", min_time=(3.0, 0.3))
    args = p.parse_args(argv)
    device = cli.start(args)
    prov = provenance.collect(device, args.threads)
    prov.lines.append(f"problem: one Adam step (lr 0) of DEQEnergy(8 -> d) on the force loss of B positions, tol "
                      f"{TOL:g}, float32, seed {SEED}; variants interleaved, median / p20 / p80 over >= "
                      f"{args.min_time:g} s each; saved_MB: bytes saved for backward during one step")
    print("\n".join(prov.lines), flush=True)
    rows = []
    for batch, hidden in args.size_list:
        for scale in SCALES:
            rows += bench_size(batch, hidden, scale, args.min_time)
            print(f"done B={batch} d={hidden} s={scale}", flush=True)
    report.write_table(args, "second_order", TITLE, prov, COLUMNS, rows, speedup_panels(rows))
    return rows


if __name__ == "__main__":
    main()

"""Benchmark of a convolutional DEQ under torch.compile: deqkern eager, torch.compile (default), torch.compile with
fullgraph=True, and torchdeq, interleaved, forward (inference) and training step.

Problem: z* = tanh(conv3x3(z*) + x) with 8 channels of 8 x 8 (the conv's weight scaled to 0.5 at init), followed
by a linear head and cross-entropy on random labels; B = 64, float32, Anderson (m 5), tol 1e-4, max_iter 50, seed 0;
one Adam step with learning rate 0 (every repeat solves the same problem).

  deqkern eager                 nn.DEQ, IFT backward
  deqkern compile               torch.compile(model): the solve is one torch.while_loop graph (deqkern/solvers/
                                traced.py); the IFT backward runs eagerly (a graph break)
  deqkern compile, loop='python'   torch.compile(model) with solver_options loop="python": the graph breaks at
                                each "all stopped?" and the eager loop with the fused step runs
  deqkern compile fullgraph     torch.compile(model, fullgraph=True), training with backward="phantom" (its own
                                eager row beside it); IFT training does not compile with fullgraph yet (the
                                backward's adjoint solve calls autograd). Inference compiles to the one graph of
                                "deqkern compile" (torch._dynamo.explain: no break), so it has no row of its own
  deqkern compile reduce-overhead   torch.compile(model, mode="reduce-overhead"): on CUDA, Inductor's CUDA graphs
                                (a torch that captures the solve's torch.while_loop as a conditional WHILE node runs
                                the whole solve as one graph launch); the note says whether Inductor used CUDA graphs
                                or why not. On the CPU the mode is the default one
  torchdeq                      torchdeq.get_deq(f_solver="anderson", b_solver="anderson", ift=True) around the same
                                cell (eager: torchdeq's loop reads the host every iteration)

host_reads: the tensor values the host read in one call (aten::_local_scalar_dense: a .item(), bool() or
.tolist() element; on CUDA each is a synchronisation; a compiled torch.while_loop reads its predicate once per
iteration unless CUDA graphs capture the loop), and cuda_syncs the CUDA runtime's stream and device
synchronisations in one call, both counted by the profiler after the timing. On CUDA every timed call ends with
torch.cuda.synchronize(), so that its time is the device's.

Compilation happens before timing (warm-up); the ratio is each row's time against deqkern eager's of the same task
and gradient. Run `python bench/bench_compiled.py --help`; results go to --out as Markdown, CSV and a PNG plot.
"""
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

import deqkern
from harness import cli, peers, provenance, report, timing

SEED, TOL, MAX_ITER, CHANNELS, SIZE, CLASSES = 0, 1e-4, 50, 8, 8, 10
COLUMNS = ["task", "B", "implementation", "median_ms", "p20_ms", "p80_ms", "repeats", "speedup_vs_eager",
           "host_reads", "cuda_syncs", "note"]
TITLE = "Convolutional DEQ under torch.compile: eager, compiled, one graph, and torchdeq"


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(0.5)

    def forward(self, z, x):
        return torch.tanh(self.conv(z) + x)


class Model(nn.Module):
    """cell -> DEQ (deqkern's, or torchdeq's around the same cell) -> linear head."""

    def __init__(self, cell, head, backward="ift", torchdeq_solver=None, loop="auto"):
        super().__init__()
        self.cell, self.head = cell, head
        options = dict(tol=TOL, max_iter=MAX_ITER, on_nonconvergence="ignore", loop=loop)
        self.torchdeq = None if torchdeq_solver is None else peers.torchdeq_deq(torchdeq_solver, torchdeq_solver,
                                                                                  tol=TOL, max_iter=MAX_ITER)
        self.deq = deqkern.nn.DEQ(cell, backward=backward, solver_options=options,
                                  backward_options=dict(options, method="anderson"))

    def forward(self, x):
        if self.torchdeq is None:
            z = self.deq(x)
        else:
            z_out, _ = self.torchdeq(lambda z: self.cell(z, x), torch.zeros_like(x))
            z = z_out[-1]
        return self.head(z.flatten(1))


# --graph-case: only what bench/gpu_check.sh asks of a GPU, eager against one graph (few compiles)
GRAPH_CASE = {("forward", "deqkern eager"), ("forward", "deqkern compile"),
              ("forward", "deqkern compile reduce-overhead"), ("train phantom", "deqkern eager"),
              ("train phantom", "deqkern compile fullgraph"),
              ("train phantom", "deqkern compile fullgraph reduce-overhead")}


def compiled(model, **options):
    """torch.compile(model, **options) with a forward of its own code object. Dynamo caches a compiled frame per code
    object and, inlining modules, does not guard on the instance: without this, a Model compiled with fullgraph=True
    ran the cached frame of another variant's Model.forward (compiled without fullgraph, with a graph break), which
    passed its guards (measured: its host reads were eager's, 11, against 20 when compiled alone)."""
    forward = Model.forward
    code = forward.__code__.replace(co_name=f"forward_{id(model)}")
    model.forward = types.MethodType(types.FunctionType(code, forward.__globals__, forward.__name__,
                                                        forward.__defaults__, forward.__closure__), model)
    return torch.compile(model, **options)


def variants(batch, device, graph_case=False):
    """{(task, name): (callable, eager baseline name)} over one shared cell and head (compiled lazily: the models
    are built here, compiled at their first call)."""
    torch.manual_seed(SEED)
    cell, head = Cell().to(device), nn.Linear(CHANNELS * SIZE * SIZE, CLASSES).to(device)
    x = torch.randn(batch, CHANNELS, SIZE, SIZE).to(device)
    y = torch.randint(0, CLASSES, (batch,)).to(device)
    finish = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # one Model per variant (sharing the cell and head), each compiled with a forward of its own (`compiled`)
    def ift():
        return Model(cell, head)
    params = list(cell.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=0.0)

    def train(model):
        def step():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            finish()
        return step

    def infer(model):
        def forward():
            with torch.no_grad():
                model(x)
            finish()
        return forward

    out = {
        ("forward", "deqkern eager"): (infer(ift()), "deqkern eager"),
        ("forward", "deqkern compile"): (infer(compiled(ift())), "deqkern eager"),
        ("forward", "deqkern compile, loop='python'"): (infer(compiled(Model(cell, head, loop="python"))),
                                                        "deqkern eager"),
        ("train IFT", "deqkern eager"): (train(ift()), "deqkern eager"),
        ("train IFT", "deqkern compile"): (train(compiled(ift())), "deqkern eager"),
        ("train IFT", "deqkern compile, loop='python'"): (train(compiled(Model(cell, head, loop="python"))),
                                                          "deqkern eager"),
        ("train phantom", "deqkern eager"): (train(Model(cell, head, backward="phantom")), "deqkern eager"),
        ("train phantom", "deqkern compile fullgraph"): (
            train(compiled(Model(cell, head, backward="phantom"), fullgraph=True)), "deqkern eager"),
        ("forward", "deqkern compile reduce-overhead"): (infer(compiled(ift(), mode="reduce-overhead")),
                                                         "deqkern eager"),
        ("train phantom", "deqkern compile fullgraph reduce-overhead"): (
            train(compiled(Model(cell, head, backward="phantom"), fullgraph=True, mode="reduce-overhead")),
            "deqkern eager"),
    }
    if peers.torchdeq is not None and not graph_case:
        theirs = Model(cell, head, torchdeq_solver="anderson")
        out[("forward", "torchdeq anderson")] = (infer(theirs), "deqkern eager")
        out[("train IFT", "torchdeq anderson")] = (train(theirs), "deqkern eager")
    return {key: value for key, value in out.items() if key in GRAPH_CASE} if graph_case else out


class CudaGraphSkips(logging.Handler):
    """The reasons Inductor logs for not using CUDA graphs ("skipping cudagraphs due to ..."), collected while
    enabled."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.reasons = []

    def emit(self, record):
        self.reasons.append(record.getMessage())

    def __enter__(self):
        torch._logging.set_logs(cudagraphs=True)
        self.logger = logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs")
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        torch._logging.set_logs()


def host_synchronisations(fn):
    """(host reads, CUDA stream and device synchronisations) of one call of fn, counted by the profiler."""
    with torch.profiler.profile() as prof:
        fn()
    names = [event.name for event in prof.events()]
    return (names.count("aten::_local_scalar_dense"),
            sum(names.count(n) for n in ("cudaStreamSynchronize", "cudaDeviceSynchronize")))


def compile_note(name, device, skips):
    if "reduce-overhead" not in name:
        return ""
    if device.type != "cuda":
        return "no CUDA graphs on the CPU: the default mode"
    return "CUDA graphs skipped: " + "; ".join(sorted(set(skips))) if skips else "CUDA graphs used"


def bench_batch(batch, min_time, device, graph_case=False):
    # every variant compiles the same forward code for its own module instance: room for all of them, so that none
    # falls back to eager after the default limit of recompilations
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    fns = variants(batch, device, graph_case)
    notes = {}
    for key, (fn, _) in fns.items():  # compile (and warm up) before anything is timed
        with CudaGraphSkips() as skips:
            fn()
            fn()
        notes[key] = compile_note(key[1], device, skips.reasons)
    timings = timing.measure_interleaved({f"{task}|{name}": fn for (task, name), (fn, _) in fns.items()}, min_time)
    rows = []
    for (task, name), (fn, baseline) in fns.items():
        t = timings[f"{task}|{name}"]
        base = timings[f"{task}|{baseline}"].median
        note = "backward eager (graph break)" if (task, name) == ("train IFT", "deqkern compile") else (
            "graph breaks in the solve" if "python" in name else notes[(task, name)])
        host_reads, cuda_syncs = host_synchronisations(fn)
        rows.append(dict(task=task, B=batch, implementation=name, **t.fields(), speedup_vs_eager=base / t.median,
                         host_reads=host_reads, cuda_syncs=cuda_syncs if device.type == "cuda" else "", note=note))
    return rows


def speedup_panels(rows):
    panel = {}
    for r in rows:
        if r["implementation"] != "deqkern eager":
            panel.setdefault(f"{r['task']} B={r['B']}", {})[r["implementation"]] = r["speedup_vs_eager"]
    return {"speed-up over deqkern eager (same task and gradient)": panel}


def main(argv=None):
    p = cli.BenchParser(__doc__, sizes={"cpu": [(64,)], "cuda": [(64,), (256,)]}, quick_sizes=[(8,)],
                        quick_help="smoke run: B=8, short timings", min_time=(3.0, 0.3))
    p.add_argument("--graph-case", action="store_true",
                   help="only eager, compiled and reduce-overhead for the forward and the phantom training step "
                        "(what bench/gpu_check.sh runs)")
    args = p.parse_args(argv)
    device = cli.start(args)
    prov = provenance.collect(device, args.threads)
    prov.lines.append(f"problem: conv DEQ tanh(conv3x3(z) + x), {CHANNELS} channels of {SIZE} x {SIZE}, Anderson, "
                      f"tol {TOL:g}, max_iter {MAX_ITER}, linear head, cross-entropy, Adam lr 0, float32, seed {SEED}; "
                      f"compiled before timing; variants interleaved, median / p20 / p80 over >= {args.min_time:g} s")
    print("\n".join(prov.lines), flush=True)
    rows = []
    for (batch,) in args.size_list:
        rows += bench_batch(batch, args.min_time, device, args.graph_case)
        print(f"done B={batch}", flush=True)
    report.write_table(args, "compiled", TITLE, prov, COLUMNS, rows, speedup_panels(rows))
    return rows


if __name__ == "__main__":
    main()

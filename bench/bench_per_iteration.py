"""Time per iteration of the fused dense solve at a large batch, against the matrix product it is built on.

The issue's GPU target: at B = 4096, d = 1024, float32 with TF32 allowed and bfloat16, deqkern's time per iteration
within 2x of one torch.mm of the same shape and precision on the same card, and below torch.mm + activation +
residual as separate ops. Problem: f(z) = tanh(z W^T + c), ||W||_2 = 0.9, c ~ N(0, 1), z0 = 0 (peers.py), run for a
fixed ITERATIONS evaluations (tol 1e-30: no sample stops; the `iters` column checks it).

Variants (data dtype, torch.get_float32_matmul_precision()):
  float32 highest    exact float32 products everywhere (the default)
  float32 high       TF32 allowed: torch.mm and the Triton backend use tensor cores (the CUDA backend stays exact)
  bfloat16 highest   bfloat16 W, c, z: torch.mm in bfloat16; deqkern solves in float32 from bfloat16 data
Rows per variant and size:
  deqkern-<backend>  fixed_point_dense(..., backend=<backend>) / ITERATIONS (cpu here; cuda and triton on a GPU)
  torch.mm           one (B, d) @ (d, d) product, the floor
  separate ops       one Picard step as PyTorch runs it: addmm, tanh, ||t - z|| and ||t|| per row
Columns x mm and x separate = deqkern's time per iteration / that row's time (the targets: <= 2 and < 1).

    python bench/bench_per_iteration.py [--quick] [--device cuda] [--sizes 4096x1024] [--out DIR]
"""
import torch

import deqkern
from harness import cli, peers, provenance, report, timing, writers

ITERATIONS = 20
TITLE = "Dense solve: time per iteration against torch.mm"
VARIANTS = [("float32", "highest"), ("float32", "high"), ("bfloat16", "highest")]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COLUMNS = ["B", "d", "dtype", "matmul_precision", "implementation", "iters", "us_per_iter", "x_mm", "x_separate",
           "note"]
HEAD = ["B", "d", "dtype", "matmul precision", "implementation", "iters", "us / iteration", "x mm", "x separate",
        "note"]


def backends(device):
    return ["cuda", "triton"] if device.type == "cuda" else ["cpu"]


def separate_step(W, c, z):
    """One Picard step of tanh(z W^T + c) with its per-row residual norms, as separate PyTorch ops."""
    t = torch.tanh(torch.addmm(c, z, W.T))
    return t, torch.linalg.vector_norm(t - z, dim=1), torch.linalg.vector_norm(t, dim=1)


def bench_variant(B, d, dtype_name, precision, device, min_time):
    dtype = DTYPES[dtype_name]
    W, c, z0 = peers.random_contraction_problem(B, d, device, dtype)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    rows = []
    try:
        out = torch.empty(B, d, device=device, dtype=dtype)
        mm = timing.measure(lambda: torch.mm(z0, W.T, out=out), device, min_time).median
        separate = timing.measure(lambda: separate_step(W, c, z0), device, min_time).median
        base = dict(B=B, d=d, dtype=dtype_name, matmul_precision=precision)
        rows.append(dict(base, implementation="torch.mm", iters=1, us_per_iter=1e3 * mm, note="the floor"))
        rows.append(dict(base, implementation="separate ops", iters=1, us_per_iter=1e3 * separate,
                         note="addmm, tanh, two row norms"))
        for backend in backends(device):
            def solve():
                return deqkern.fixed_point_dense(W, c, tol=1e-30, max_iter=ITERATIONS, backend=backend,
                                                 on_nonconvergence="ignore")
            try:
                _, info = solve()
                iters = int(info.iterations.max())
                t = timing.measure(solve, device, min_time).median / max(iters, 1)
                note = "TF32 products" if backend == "triton" and precision != "highest" else "exact products"
                if int(info.iterations.min()) != iters:  # a sample that stopped early did less work
                    note += f"; some samples stopped after {int(info.iterations.min())} iterations"
                rows.append(dict(base, implementation=f"deqkern-{backend}", iters=iters, us_per_iter=1e3 * t,
                                 x_mm=t / mm, x_separate=t / separate, note=note))
            except Exception as exc:  # a backend that fails is a finding: recorded, not fatal
                rows.append(dict(base, implementation=f"deqkern-{backend}", note=f"{type(exc).__name__}: {exc}"[:200]))
    finally:
        torch.set_float32_matmul_precision(previous)
    return rows


def speedup_panels(rows):
    """The floor's time over deqkern's (1 = as fast as one torch.mm; the target is >= 0.5)."""
    panel = {}
    for r in rows:
        if r["implementation"].startswith("deqkern") and r.get("x_mm"):
            label = f"B={r['B']} d={r['d']} {r['dtype']} {r['matmul_precision']}"
            panel.setdefault(label, {})[f"{r['implementation']} vs torch.mm"] = 1.0 / r["x_mm"]
            panel[label][f"{r['implementation']} vs separate ops"] = 1.0 / r["x_separate"]
    return {"torch time per iteration / deqkern time per iteration": panel}


def main(argv=None):
    args = cli.BenchParser(__doc__, sizes={"cpu": [(256, 256)], "cuda": [(4096, 1024)]}, quick_sizes=[(64, 64)],
                           quick_help="B=64 d=64 only, short timings").parse_args(argv)
    device = cli.start(args)
    prov = provenance.collect(device, args.threads)
    prov.lines.append(f"{ITERATIONS} iterations per solve (tol 1e-30); medians; do_bench on CUDA")
    print("\n".join(prov.lines), flush=True)
    rows = []
    for B, d in args.size_list:
        for dtype_name, precision in VARIANTS:
            rows += bench_variant(B, d, dtype_name, precision, device, args.min_time)
            print(f"done B={B} d={d} {dtype_name} {precision}", flush=True)
    table = writers.markdown_table(HEAD, ([writers.fmt(r.get(c, "")) for c in COLUMNS] for r in rows))
    print("\n" + table)
    report.write(report.stem_path(args.out, f"per_iteration_{device.type}", args.quick), TITLE, prov, [table],
                 {"": (COLUMNS, rows)}, speedup_panels(rows))
    return rows


if __name__ == "__main__":
    main()

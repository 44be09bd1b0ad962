"""Which Anderson deqkern uses, decided by measurement: the regulariser (lam diag(G) or lam trace(G)/n I), lam, and the
small solve (a pivoted LU of the bordered system, or the unpivoted Cholesky of A = G + reg that the kernels run).

Counts evaluations of the layer, which do not depend on the machine's speed: type-II Anderson (m = 5, beta = 1) in
plain PyTorch with a pluggable weight solve, per-sample stopping as deqkern's solves, on five layers (B = 32,
d = 64): the slowly contracting tanh layer of the Anderson benchmarks at spectral radius 0.9 and 0.99, a random
tanh contraction (||W||_2 = 0.9), a random relu layer with ||W||_2 = 1.5, and an identity layer with eigenvalues over
[-0.95, 0.95]; float32 to tol 1e-4 and float64 to tol 1e-8.

Run: python bench/anderson_choice.py [--out DIR]  (writes anderson_choice.md and .csv; under a minute)
"""
import argparse
import itertools

import torch

from harness import provenance, writers
from harness.report import stem_path

REGULARISERS = ("diag", "trace")
LAMS = (0.0, 1e-6, 1e-4, 1e-2)
SOLVES = ("bordered-lu", "cholesky")


def weights(gram, n, slot, lam, regulariser, solve):
    g = gram[:, :n, :n]
    batch = g.shape[0]
    if regulariser == "diag":
        A = g + lam * torch.diag_embed(torch.diagonal(g, dim1=1, dim2=2))
    else:
        A = g + (lam * torch.diagonal(g, dim1=1, dim2=2).sum(1) / n)[:, None, None] * torch.eye(n, dtype=g.dtype)
    if solve == "bordered-lu":
        M = torch.zeros(batch, n + 1, n + 1, dtype=g.dtype)
        M[:, 0, 1:] = 1
        M[:, 1:, 0] = 1
        M[:, 1:, 1:] = A
        rhs = torch.zeros(batch, n + 1, dtype=g.dtype)
        rhs[:, 0] = 1
        solution, info = torch.linalg.solve_ex(M, rhs)
        a, ok = solution[:, 1:], info == 0
    else:
        L, info = torch.linalg.cholesky_ex(A)
        y = torch.cholesky_solve(torch.ones(batch, n, 1, dtype=g.dtype), L)[..., 0]
        total = y.sum(1)
        a, ok = y / total[:, None], (info == 0) & torch.isfinite(total) & (total != 0)
    ok = ok & torch.isfinite(a).all(1)
    fallback = torch.zeros_like(a)
    fallback[:, slot] = 1
    return torch.where(ok[:, None], a, fallback)


def anderson_evaluations(step, x0, m, lam, tol, max_iter, regulariser, solve):
    """(evaluations per sample, not converged) of type-II Anderson with beta = 1 from x0."""
    x = x0.clone()
    batch, d = x.shape
    iterations = torch.zeros(batch, dtype=torch.int32)
    active = torch.ones(batch, dtype=torch.bool)
    hist_x, hist_g = x.new_zeros(batch, m, d), x.new_zeros(batch, m, d)
    gram = torch.zeros(batch, m, m, dtype=torch.float64)
    for k in range(1, max_iter + 1):
        tx = step(x)
        r = (tx - x).norm(dim=1) / (tx.norm(dim=1) + 1e-12)
        slot, n = (k - 1) % m, min(k, m)
        hist_x[:, slot], hist_g[:, slot] = x, tx - x
        row = torch.einsum("bd,bjd->bj", hist_g[:, slot], hist_g[:, :n]).double()
        gram[:, slot, :n], gram[:, :n, slot] = row, row
        a = weights(gram, n, slot, lam, regulariser, solve).to(x.dtype)
        x = torch.where(active[:, None], torch.einsum("bj,bjd->bd", a, hist_x[:, :n] + hist_g[:, :n]), x)
        iterations = torch.where(active, torch.full_like(iterations, k), iterations)
        active = active & (r > tol) & torch.isfinite(r)
        if not active.any():
            break
    return iterations, active


def layers(dtype, batch=32, d=64):
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))[0]
    out = {}
    for rho in (0.9, 0.99):
        W = q @ torch.diag(torch.linspace(0, rho, d, dtype=torch.float64)) @ q.T
        out[f"slow tanh, rho {rho}"] = (W, 0.1 * torch.randn(batch, d, dtype=torch.float64, generator=g), torch.tanh)
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    a = a / torch.linalg.matrix_norm(a, ord=2)
    out["random tanh, ||W|| 0.9"] = (0.9 * a, torch.randn(batch, d, dtype=torch.float64, generator=g), torch.tanh)
    out["random relu, ||W|| 1.5"] = (1.5 * a, torch.randn(batch, d, dtype=torch.float64, generator=g), torch.relu)
    W = q @ torch.diag(torch.linspace(-0.95, 0.95, d, dtype=torch.float64)) @ q.T
    out["identity, eig [-0.95, 0.95]"] = (W, torch.randn(batch, d, dtype=torch.float64, generator=g), lambda u: u)
    return {name: (W.to(dtype), c.to(dtype), act) for name, (W, c, act) in out.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    prov = provenance.collect(torch.device("cpu"), 2)
    rows = []
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-8)):
        for name, (W, c, act) in layers(dtype).items():
            for regulariser, lam, solve in itertools.product(REGULARISERS, LAMS, SOLVES):
                its, stuck = anderson_evaluations(lambda z: act(z @ W.T + c), torch.zeros_like(c), 5, lam, tol, 300,
                                                  regulariser, solve)
                rows.append(dict(dtype=str(dtype).replace("torch.", ""), layer=name, regulariser=regulariser, lam=lam,
                                 solve=solve, mean_evaluations=round(float(its.float().mean()), 2),
                                 max_evaluations=int(its.max()), not_converged=int(stuck.sum())))
    head = ["dtype", "layer"] + [f"{r} lam={lam:g}" for r in REGULARISERS for lam in LAMS]
    table = []
    for (dtype, layer), group in itertools.groupby(rows, key=lambda r: (r["dtype"], r["layer"])):
        cells = {(r["regulariser"], r["lam"], r["solve"]): r for r in group}
        line = [dtype, layer]
        for regulariser in REGULARISERS:
            for lam in LAMS:
                lu, ch = cells[(regulariser, lam, "bordered-lu")], cells[(regulariser, lam, "cholesky")]
                same = "" if (lu["mean_evaluations"], lu["max_evaluations"]) == (ch["mean_evaluations"],
                                                                                   ch["max_evaluations"]) else " (LU)"
                line.append(f"{ch['mean_evaluations']:.1f} / {ch['max_evaluations']}{same}")
        table.append(line)
    identical = all(
        (a["mean_evaluations"], a["max_evaluations"], a["not_converged"]) ==
        (b["mean_evaluations"], b["max_evaluations"], b["not_converged"])
        for a, b in zip(rows[0::2], rows[1::2]))
    stem = stem_path(args.out, "anderson_choice", False)
    blocks = ["Evaluations of the layer, mean / max over the 32 samples, Cholesky solve (a cell marked (LU) means "
              "the pivoted bordered LU gave different counts).",
              writers.markdown_table(head, table),
              f"Pivoted bordered LU and unpivoted Cholesky gave identical counts in every cell: {identical}."]
    writers.write_markdown(stem.with_suffix(".md"), "Anderson: regulariser, lam and small solve",
                           prov.lines + [provenance.end_line()], blocks)
    writers.write_csv(stem.with_suffix(".csv"), prov.lines, list(rows[0]), rows)
    print("\n\n".join(blocks))


if __name__ == "__main__":
    main()

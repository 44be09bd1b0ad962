"""How tight the PositiveConcaveDEQ certificate is during training: the proven iteration bound and rates of
`certificate(x)` against the observed iteration count and measured rate, every few steps of training on digits.

Problem: PositiveConcaveDEQ(64 -> 64, tol 1e-4) + Linear(64 -> 10), cross-entropy, Adam (lr 1e-2), batches of 64
of scikit-learn's digits (the first 512, standardised), float64, seed 0, for tanh and sigmoid. Every 8 steps, on the
step's batch: the medians (and max) over the batch of the observed forward iterations, of the proven bound
(`forward_iterations_bound`), of the bound from the theorem's rate alone (what the certificate gave before the tail
rate), and the median rates. Not a timing.

Run `python bench/pcdeq_certificate.py [--steps 64] [--out DIR]`; writes pcdeq_certificate.md and .csv.
"""
import argparse
from pathlib import Path

import torch

from deqkern.nn.certified import PositiveConcaveDEQ
from deqkern.nn.certified.bounds import geometric_steps_to_tol
from deqkern.apps.digits import load_digits_split
from harness import cli, provenance, writers

COLUMNS = ["activation", "step", "loss", "observed_median", "observed_max", "proven_bound_median",
           "proven_bound_max", "theorem_bound_median", "theorem_rate_median", "tail_rate_median",
           "measured_rate_median"]
TOL = 1e-4


def run(activation, steps, x_all, y_all):
    torch.manual_seed(0)
    layer = PositiveConcaveDEQ(64, 64, activation=activation, tol=TOL, max_iter=500, dtype=torch.float64)
    head = torch.nn.Linear(64, 10, dtype=torch.float64)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=1e-2)
    rows = []
    for step in range(steps):
        i = (step * 64) % 512
        x, y = x_all[i:i + 64], y_all[i:i + 64]
        loss = torch.nn.functional.cross_entropy(head(layer(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 8 == 7:
            with torch.no_grad():
                cert = layer.certificate(x)
            theorem = torch.tensor([geometric_steps_to_tol(q, 1 + TOL * q, TOL) for q in
                                    cert.sample_rate_bound.tolist()], dtype=torch.float64)
            observed, proven = cert.forward_iterations.double(), cert.forward_iterations_bound.double()
            rows.append(dict(activation=activation, step=step + 1, loss=loss.item(),
                             observed_median=observed.median().item(), observed_max=observed.max().item(),
                             proven_bound_median=proven.median().item(), proven_bound_max=proven.max().item(),
                             theorem_bound_median=theorem.median().item(),
                             theorem_rate_median=cert.sample_rate_bound.median().item(),
                             tail_rate_median=cert.tail_rate_bound.median().item(),
                             measured_rate_median=cert.measured_rate.median().item()))
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(cli.RESULTS_DIR))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prov = provenance.collect(torch.device("cpu"), args.threads)
    (x_all, y_all), _ = load_digits_split("cpu", torch.float64)
    x_all, y_all = x_all[:512], y_all[:512]
    rows = []
    for activation in ("tanh", "sigmoid"):
        rows += run(activation, args.steps, x_all, y_all)
    table = writers.markdown_table(COLUMNS, ([writers.fmt(r[c]) for c in COLUMNS] for r in rows))
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov.lines.append(provenance.end_line())
    writers.write_markdown(out / "pcdeq_certificate.md", "PositiveConcaveDEQ certificate during training (not a "
                           "timing)", prov.lines, [table])
    writers.write_csv(out / "pcdeq_certificate.csv", prov.lines, COLUMNS, rows)
    plot(out / "pcdeq_certificate.png", rows, prov)


def plot(path, rows, prov):
    """Observed iterations, the proven bound and the theorem's bound against the training step (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, activation in zip(axes, ("tanh", "sigmoid")):
        mine = [r for r in rows if r["activation"] == activation]
        steps = [r["step"] for r in mine]
        for key, label in (("observed_median", "observed (median)"), ("proven_bound_median", "proven bound"),
                           ("theorem_bound_median", "bound from the theorem's rate alone")):
            ax.plot(steps, [r[key] for r in mine], marker="o", label=label)
        ax.set(xlabel="training step", title=f"PositiveConcaveDEQ(64, 64), {activation}", yscale="log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("forward iterations (tol 1e-4)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"pcDEQ certificate during training on digits\n{prov.device_name}, {prov.date_utc} UTC", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""`pcdeq` (Gabor, Piotrowski and Cavalcante 2024, positive concave DEQs): a unique fixed point reached
geometrically with no bound on ||W||, and trained pcDEQs as accurate as an unconstrained DEQ.

Part 1, the theory, on random layers: W >= 0 scaled to ||W||_2 in {0.5, 2, 10, 100}, c = softplus(N(0, 1)) + 1e-3,
tanh; 32 random nonnegative starts each (uniform in [0, 5]), solved by plain iteration in float64 to 1e-12: the
largest distance between the fixed points reached (unique: ~1e-12), whether the iterates from 0 increase
monotonically, and the proven rate of the certificate against the measured rate.
Part 2, training on the digits: PositiveConcaveDEQ with tanh, softsign, relu6 and sigmoid (pcDEQ-1 style: a
softplus injection; the paper's pcDEQ-2 pairs sigmoid with a ReLU injection, which deqkern's layer does not have:
its sigmoid row uses the softplus injection), PositiveConcaveConvDEQ (tanh), an unconstrained DEQLinear and an MLP
of the same width: test accuracy, forward/backward iterations per batch, time per epoch.
Holds when every fixed point was unique and reached monotonically with the measured rate within the proven one,
and the best dense pcDEQ's accuracy is within 3 points of the unconstrained DEQ's.
"""
import math

import torch
from torch import nn

from ..certified import PositiveConcaveConvDEQ, PositiveConcaveDEQ
from ..certified.positive_concave import _ACTIVATION_SUP
from ..certified.positive_concave_rates import positive_concave_rates
from ..nn import DEQLinear
from .common import (ClaimResult, DigitsClassifier, digits, finish_figure, print_table, provenance, seconds_per_epoch,
                     train_classifier, write_claim)

NAME = "pcdeq"
NORMS = (0.5, 2.0, 10.0, 100.0)


def uniqueness(norm, d=32, batch=4, starts=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.rand(d, d, generator=g, dtype=torch.float64)
    W *= norm / torch.linalg.matrix_norm(W, ord=2)
    c = nn.functional.softplus(torch.randn(batch, d, generator=g, dtype=torch.float64)) + 1e-3
    step = lambda z: torch.tanh(z @ W.T + c)  # noqa: E731
    fixed_points = []
    for _ in range(starts):
        z = 5 * torch.rand(batch, d, generator=g, dtype=torch.float64)
        for _ in range(10000):
            nxt = step(z)
            if (nxt - z).abs().max() <= 1e-13:
                z = nxt
                break
            z = nxt
        fixed_points.append(z)
    spread = max((a - b).abs().max().item() for a in fixed_points for b in fixed_points)
    z, monotone, measured_steps = torch.zeros_like(c), True, 0
    for k in range(10000):
        nxt = step(z)
        monotone &= bool((nxt >= z - 1e-15).all())
        if (nxt - z).abs().max() <= 1e-13:
            measured_steps = k + 1
            break
        z = nxt
    rates = positive_concave_rates(lambda v: v @ W.T, c, "tanh", _ACTIVATION_SUP["tanh"], 1e-4, 1000)
    return dict(weight_norm=norm, starts=starts, largest_distance=spread, monotone_from_zero=monotone,
                steps_to_1e13=measured_steps, theorem_rate=rates.sample_rate_bound.max().item(),
                tail_rate=rates.tail_rate_bound.max().item(), measured_rate=rates.measured_rate.max().item(),
                iterations_bound_tol_1e4=int(rates.forward_iterations_bound.max()))


def models(width):
    """name -> (a function building the layer, learning rate): each is built after seeding, so its initial weights
    do not depend on what ran before."""
    dense = lambda act: lambda: PositiveConcaveDEQ(64, width, activation=act, tol=1e-4, max_iter=100)  # noqa: E731
    return {
        "pcDEQ tanh": (dense("tanh"), 1e-2),
        "pcDEQ softsign": (dense("softsign"), 1e-2),
        "pcDEQ relu6": (dense("relu6"), 1e-2),
        "pcDEQ sigmoid": (dense("sigmoid"), 1e-2),
        "pcDEQ conv tanh": (lambda: PositiveConcaveConvDEQ(1, 8, kernel_size=3, activation="tanh", tol=1e-4,
                                                           max_iter=100), 1e-2),
        "DEQLinear (unconstrained)": (lambda: DEQLinear(64, width, tol=1e-4, max_iter=100,
                                                        on_nonconvergence="ignore"), 3e-3),
        "MLP": (lambda: nn.Sequential(nn.Linear(64, width), nn.Tanh()), 3e-3),
    }


def run(out, quick=False, show_progress=True, command=()):
    header = provenance(command)
    theory = [uniqueness(norm, d=16 if quick else 32, starts=8 if quick else 32) for norm in NORMS]
    theory_columns = list(theory[0])
    print_table("unique fixed point, monotone iterates, rates (random W >= 0, tanh, float64)", theory_columns, theory)
    width, epochs = (32, 3) if quick else (64, 8)
    train, test = digits(limit=512 if quick else None)
    rows, curves = [], {}
    for name, (build, lr) in models(width).items():
        torch.manual_seed(0)
        layer = build()
        image = isinstance(layer, PositiveConcaveConvDEQ)  # the digit as a 1-channel 8x8 image, 8 channels out
        model = DigitsClassifier(layer, 8 * 64 if image else width, image=image)
        deq = layer if hasattr(layer, "last_info") else None
        stats = train_classifier(model, deq, train, test, epochs, lr, description=name, show_progress=show_progress)
        curves[name] = stats
        last = stats[-1]
        rows.append(dict(model=name, test_accuracy=last.test_accuracy, forward_iterations=last.forward_iterations,
                         backward_iterations=last.backward_iterations,
                         seconds_per_epoch=seconds_per_epoch(stats)))
        print(f"  {name}: accuracy {last.test_accuracy:.3f}, forward iterations {last.forward_iterations:.1f}",
              flush=True)
    train_columns = list(rows[0])
    print_table(f"trained on digits ({epochs} epochs, width {width})", train_columns, rows)

    unique = all(r["largest_distance"] < 1e-9 and r["monotone_from_zero"] for r in theory)
    rates_hold = all(r["measured_rate"] <= r["theorem_rate"] + 1e-12 for r in theory)
    best_pc = max(r["test_accuracy"] for r in rows if r["model"].startswith("pcDEQ") and "conv" not in r["model"])
    unconstrained = next(r["test_accuracy"] for r in rows if r["model"].startswith("DEQLinear"))
    held = unique and rates_hold and best_pc >= unconstrained - 0.03
    headline = (f"one fixed point from {theory[0]['starts']} starts at every ||W||_2 in {list(NORMS)} (largest "
                f"distance {max(r['largest_distance'] for r in theory):.1e}), monotone from 0, measured rate <= "
                f"proven rate; best pcDEQ accuracy {best_pc:.3f} vs unconstrained DEQ {unconstrained:.3f}")
    result = ClaimResult(NAME, held, headline, {
        "Part 1: uniqueness and geometric convergence, random W >= 0 (tanh, float64)": (theory_columns, theory),
        f"Part 2: trained on digits, {epochs} epochs, width {width}": (train_columns, rows)})

    def plot(path):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, stats in curves.items():
            axes[0].plot([s.epoch for s in stats], [s.test_accuracy for s in stats], marker="o", label=name)
            if not math.isnan(stats[0].forward_iterations):
                axes[1].plot([s.epoch for s in stats], [s.forward_iterations for s in stats], marker="o", label=name)
        axes[0].set(xlabel="epoch", ylabel="test accuracy", title="digits: accuracy")
        axes[1].set(xlabel="epoch", ylabel="forward iterations per batch", title="digits: solver iterations")
        axes[0].legend(fontsize=7)
        finish_figure(fig, path, "pcDEQ (Gabor et al. 2024) with deqkern")

    return write_claim(out, result, "pcDEQ: unique fixed point, geometric convergence, accuracy", header,
                       [__doc__.strip()], plot)

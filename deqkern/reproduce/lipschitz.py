"""`lipschitz` (Sato and Iiduka, Lipschitz-constrained DEQs): bounding Lip(act) ||W||_2 <= gamma < 1 makes the
solves provably short, forward and backward, and training faster than an unconstrained DEQ.

On the digits, Adam, 6 epochs, at two widths: DEQLinear unconstrained (Picard; and Anderson, m = 5), DEQLinear with
jac_reg=2 (Picard), LipschitzDEQ(gamma = 0.9; its proven upper bound of ||W||_2 keeps the contraction at every
step) and LipschitzConvDEQ (8 channels on the 8x8 image, gamma = 0.9). All tol 1e-4, max_iter 100. Per model:
forward and backward iterations per batch (last epoch), seconds per epoch (after the first), test accuracy, and
for the Lipschitz layers the certificate's forward and backward iteration bounds next to the largest observed
counts.
Holds when, at both widths, the Lipschitz layers never exceed their certified iteration bounds and LipschitzDEQ
needs no more forward iterations than the unconstrained Picard DEQ.
"""
import torch

from ..certified import LipschitzConvDEQ, LipschitzDEQ
from ..nn import DEQLinear
from .common import (ClaimResult, DigitsClassifier, digits, finish_figure, print_table, provenance, seconds_per_epoch,
                     train_classifier, write_claim)

NAME = "lipschitz"


def models(width):
    common = dict(tol=1e-4, max_iter=100, on_nonconvergence="ignore")
    return {
        "DEQLinear Picard": (DEQLinear(64, width, **common), width, False),
        "DEQLinear Anderson": (DEQLinear(64, width, method="anderson", **common), width, False),
        "DEQLinear + jac_reg": (DEQLinear(64, width, jac_reg=2.0, **common), width, False),
        "LipschitzDEQ": (LipschitzDEQ(64, width, gamma=0.9, **common), width, False),
        "LipschitzConvDEQ": (LipschitzConvDEQ(1, 8, gamma=0.9, **common), 8 * 64, True),
    }


def run(out, quick=False, show_progress=True, command=()):
    header = provenance(command)
    widths, epochs = ((32,), 2) if quick else ((64, 256), 6)
    train, test = digits(limit=512 if quick else None)
    rows, curves = [], {}
    for width in widths:
        for name, (layer, features, image) in models(width).items():
            if image and width != widths[0]:
                continue  # the conv layer's width is its channel count: run once
            torch.manual_seed(0)
            model = DigitsClassifier(layer, features, image)
            largest = {"forward": 0, "backward": 0}

            def record(layer=layer, largest=largest):
                info = layer.last_info
                largest["forward"] = max(largest["forward"], int(info.iterations.max()))
                if info.backward is not None:
                    largest["backward"] = max(largest["backward"], int(info.backward.iterations.max()))

            label = f"{name} (width {width})" if not image else f"{name} (8 channels)"
            stats = train_classifier(model, layer, train, test, epochs, 3e-3, after_step=record, description=label,
                                     show_progress=show_progress)
            seconds = seconds_per_epoch(stats)
            row = dict(model=label, width=width if not image else 8, test_accuracy=stats[-1].test_accuracy,
                       forward_iterations=stats[-1].forward_iterations,
                       backward_iterations=stats[-1].backward_iterations, largest_forward=largest["forward"],
                       largest_backward=largest["backward"], forward_bound=None, backward_bound=None,
                       seconds_per_epoch=seconds)
            if isinstance(layer, (LipschitzDEQ, LipschitzConvDEQ)):
                # the bounds of the last training step's weights (the largest counts are over all steps, each
                # within its own step's bound by the layer's construction: q <= gamma at every step)
                cert = layer.certificate()
                row["forward_bound"], row["backward_bound"] = cert.forward_iterations_bound, \
                    cert.backward_iterations_bound
            rows.append(row)
            curves[label] = stats
            print(f"  {label}: accuracy {row['test_accuracy']:.3f}, forward {row['forward_iterations']:.1f}, "
                  f"{seconds:.2f} s/epoch", flush=True)
    columns = list(rows[0])
    print_table(f"digits, {epochs} epochs, tol 1e-4", columns, rows)
    held, parts = True, []
    for r in rows:
        if r["forward_bound"] is not None:
            held &= r["largest_forward"] <= r["forward_bound"] and r["largest_backward"] <= r["backward_bound"]
    for width in widths:
        plain = next(r for r in rows if r["model"] == f"DEQLinear Picard (width {width})")
        lip = next(r for r in rows if r["model"] == f"LipschitzDEQ (width {width})")
        held &= lip["forward_iterations"] <= plain["forward_iterations"]
        parts.append(f"width {width}: forward iterations {plain['forward_iterations']:.1f} -> "
                     f"{lip['forward_iterations']:.1f} (largest {lip['largest_forward']} <= bound "
                     f"{lip['forward_bound']}), backward {plain['backward_iterations']:.1f} -> "
                     f"{lip['backward_iterations']:.1f}, time per epoch {plain['seconds_per_epoch']:.2f} -> "
                     f"{lip['seconds_per_epoch']:.2f} s ({plain['seconds_per_epoch'] / lip['seconds_per_epoch']:.2f}x)"
                     f", accuracy {plain['test_accuracy']:.3f} -> {lip['test_accuracy']:.3f}")
    result = ClaimResult(NAME, held, "; ".join(parts), {f"digits, {epochs} epochs": (columns, rows)})

    def plot(path):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = [r["model"] for r in rows]
        axes[0].barh(labels, [r["forward_iterations"] for r in rows], label="forward")
        axes[0].barh(labels, [r["backward_iterations"] for r in rows], left=[r["forward_iterations"] for r in rows],
                     label="backward")
        axes[0].set(xlabel="iterations per batch (last epoch)", title="solver iterations")
        axes[0].legend(fontsize=8)
        axes[1].barh(labels, [r["seconds_per_epoch"] for r in rows])
        axes[1].set(xlabel="seconds per epoch", title="training time")
        axes[1].set_yticks([])
        finish_figure(fig, path, "Lipschitz-constrained DEQs (Sato and Iiduka) with deqkern")

    return write_claim(out, result, "Lipschitz-constrained DEQs: iterations, bounds and speed", header,
                       [__doc__.strip()], plot)

"""`lipschitz` (Sato and Iiduka, Lipschitz-constrained DEQs): bounding Lip(act) ||W||_2 <= gamma < 1 makes the
solves provably short, forward and backward, and training faster than an unconstrained DEQ.

What runs and when the claim holds: NOTES, filled in with the sizes of the run and written before its table.
"""
import torch

from ...nn.certified import LipschitzConvDEQ, LipschitzDEQ
from ...nn import DEQLinear
from ..digits import DigitsClassifier, digits, seconds_per_epoch, train_classifier
from .common import ClaimResult, claim_notes, finish_figure, number, print_table, provenance, write_claim

NAME = "lipschitz"
SIZES = {  # quick -> the sizes of the run
    False: dict(widths=(64, 256), epochs=6, limit=None),
    True: dict(widths=(32,), epochs=2, limit=512),
}
TOL, MAX_ITER = 1e-4, 100
GAMMA = 0.9
JAC_REG = 2.0
ANDERSON_M = 5
CHANNELS = 8
LR = 3e-3

NOTES = """\
On the digits ({train} training, {test} test digits), Adam {lr:g}, {epochs} epochs, at width{plural} {widths}: DEQLinear
unconstrained (Picard; and Anderson, m = {m}), DEQLinear with jac_reg={jac_reg:g} (Picard), LipschitzDEQ(gamma =
{gamma:g}; its proven upper bound of ||W||_2 keeps the contraction at every step) and LipschitzConvDEQ ({channels}
channels on the 8x8 image, gamma = {gamma:g}; run once, its width is its channel count). All tol {tol:g}, max_iter
{max_iter}. Per model: forward and backward iterations per batch (last epoch), seconds per epoch (after the first),
test accuracy, and for the Lipschitz layers the certificate's forward and backward iteration bounds next to the
largest observed counts.
Holds when, at every width, the Lipschitz layers never exceed their certified iteration bounds and LipschitzDEQ
needs no more forward iterations than the unconstrained Picard DEQ.
"""


def models(width):
    common = dict(tol=TOL, max_iter=MAX_ITER, on_nonconvergence="ignore")
    return {
        "DEQLinear Picard": (DEQLinear(64, width, **common), width, False),
        "DEQLinear Anderson": (DEQLinear(64, width, method="anderson", m=ANDERSON_M, **common), width, False),
        "DEQLinear + jac_reg": (DEQLinear(64, width, jac_reg=JAC_REG, **common), width, False),
        "LipschitzDEQ": (LipschitzDEQ(64, width, gamma=GAMMA, **common), width, False),
        "LipschitzConvDEQ": (LipschitzConvDEQ(1, CHANNELS, gamma=GAMMA, **common), CHANNELS * 64, True),
    }


def run(out, quick=False, show_progress=True, command=(), plots=True):
    header = provenance(command)
    sizes = SIZES[quick]
    widths, epochs = sizes["widths"], sizes["epochs"]
    train, test = digits(limit=sizes["limit"])
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

            label = f"{name} (width {width})" if not image else f"{name} ({CHANNELS} channels)"
            stats = train_classifier(model, layer, train, test, epochs, LR, after_step=record, description=label,
                                     show_progress=show_progress)
            seconds = seconds_per_epoch(stats)
            row = dict(model=label, width=width if not image else CHANNELS, test_accuracy=stats[-1].test_accuracy,
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
    print_table(f"digits, {epochs} epochs, tol {number(TOL)}", columns, rows)
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

    notes = claim_notes(__doc__, NOTES, train=len(train[0]), test=len(test[0]), lr=LR, epochs=epochs,
                        plural="s" if len(widths) > 1 else "", widths=", ".join(str(w) for w in widths), m=ANDERSON_M,
                        jac_reg=JAC_REG, gamma=GAMMA, channels=CHANNELS, tol=TOL, max_iter=MAX_ITER)
    return write_claim(out, result, "Lipschitz-constrained DEQs: iterations, bounds and speed", header,
                       notes, plot if plots else None)

"""`lipschitz-mdeq` (Sato and Iiduka, AISTATS 2026, "Lipschitz Multiscale Deep Equilibrium Models"): a multiscale
DEQ made contractive by construction trains with fewer solver iterations and faster than the Jacobian-regularised
MDEQ, at a small accuracy cost.

What runs and when the claim holds: NOTES, filled in with the sizes of the run and written before its table.
"""
import warnings

import torch
from torch import nn

from ...jacobian import jacobian_norm
from ...nn import LipschitzMultiscaleDEQClassifier, MultiscaleDEQClassifier
from ..digits import digits, seconds_per_epoch, train_classifier
from .common import ClaimResult, claim_notes, finish_figure, print_table, provenance, write_claim

NAME = "lipschitz-mdeq"
SIZES = {  # quick -> the sizes of the run
    False: dict(epochs=16, limit=None, channels=(8, 16), expansion=2),
    True: dict(epochs=2, limit=192, channels=(4, 8), expansion=2),
}
SOLVER = dict(tol=1e-3, max_iter=30, on_nonconvergence="ignore")  # MDEQ's own loose solves (tol 1e-3, 30 steps)
JAC_REG = (0.5, 0.05)  # weight and per-batch probability of the paper's Jacobian-regularised baseline (_reg.yaml)
LR = 1e-2
MEASURED_SAMPLES = 32  # test digits at whose fixed points (and at random states) ||J_f||_2 is measured
ACCURACY_MARGIN = 0.03  # "a small accuracy cost": within this of the Jacobian-regularised MDEQ's test accuracy

NOTES = """\
Three MDEQ classifiers of the same widths (branches {channels} channels at 16x16 and 8x8: the 8x8 digits upsampled
x2, bilinear; expansion {expansion}; the MDEQ head to 32 channels), trained on the digits ({train} training, {test}
test digits), Adam lr {lr:g}, batch 64, {epochs} epochs each, the epochs of the three interleaved (epoch 1 of each,
then epoch 2 of each, ...) so that the time per epoch of each is measured in the same conditions: the MDEQ
(GroupNorm, ReLU), the Jacobian-regularised MDEQ (`jac_reg=({weight:g}, {probability:g})`: weight {weight:g} on the
Hutchinson estimate of ||J_f||_F^2, applied to a batch with probability {probability:g}, the paper's baseline
config), and deqkern's LipschitzMultiscaleDEQ (the paper's cell: ReLU slope 0.4, mean-only GroupNorm, residual
weight 0.5, fusion beta 0.3, convolutions projected to norm <= 2 by a proven bound, the map kept <= gamma = 0.9).
All three solve by Anderson forward and backward at tol {tol:g}, at most {max_iter} iterations. Per model: test
accuracy, forward and backward iterations per batch (last epoch), the fraction of the last epoch's batches whose
forward solve did not converge, time per epoch (after the first), and for the Lipschitz MDEQ the proven L and the
paper's estimate of it; for every model the measured constant: the largest ||J_f||_2 (power iteration by
Jacobian-vector and vector-Jacobian products) at the fixed points of {measured} test digits and at random states of
their scale, a lower bound of the map's Lipschitz constant.
Holds when the Lipschitz MDEQ needs fewer forward and backward iterations and less time per epoch than the
Jacobian-regularised MDEQ, at a test accuracy within {margin:g} points of it.
"""


def _models(channels, expansion):
    common = dict(channels=channels, expansion=expansion, final_channels=32, solver_options=SOLVER,
                  backward_options=dict(SOLVER, method="anderson"))
    torch.manual_seed(0)
    plain = MultiscaleDEQClassifier(1, 10, **common)
    torch.manual_seed(0)
    regularised = MultiscaleDEQClassifier(1, 10, jac_reg=JAC_REG, **common)
    torch.manual_seed(0)
    lipschitz = LipschitzMultiscaleDEQClassifier(1, 10, gamma=0.9, **common)
    return {"MDEQ": plain, "Jacobian-regularised MDEQ": regularised, "Lipschitz MDEQ (proven)": lipschitz}


def _upsampled(model):
    """x (B, 64) -> the digit as a (B, 1, 16, 16) image into the model."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Upsample(scale_factor=2, mode="bilinear",
                                                                 align_corners=False), model)


def measured_lipschitz(layer, x, seed=0):
    """A lower bound of Lip(z -> f(z, x)): the largest ||J_f||_2 (power iteration by Jacobian-vector and
    vector-Jacobian products) over the samples of x, at their fixed points and at random states of the same scale."""
    layer.eval()
    with torch.no_grad():
        z = layer(x)
    g = torch.Generator().manual_seed(seed)
    noise = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) * t.std() for t in z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged samples are lower bounds still
        values = [jacobian_norm(layer, state, x, max_iter=100, tol=1e-5, on_nonconvergence="ignore").max()
                  for state in (z, noise)]
    layer.train()
    return float(max(values))


def run(out, quick=False, show_progress=True, command=(), plots=True):
    header = provenance(command)
    sizes = SIZES[quick]
    epochs = sizes["epochs"]
    train, test = digits(limit=sizes["limit"])
    models = _models(sizes["channels"], sizes["expansion"])
    stats, failures, optimizers = {name: [] for name in models}, {name: [] for name in models}, {}
    for epoch in range(epochs):
        for name, classifier in models.items():
            model = _upsampled(classifier)
            fails = failures[name]

            def count_failures(classifier=classifier, fails=fails, epoch=epoch):
                fails.append((epoch, float((~classifier.last_info.converged).double().mean())))

            # one epoch at a time (epochs=1, seed offset = epoch: the same shuffles as one run of `epochs`)
            stats[name] += train_classifier(model, classifier.deq, train, test, 1, LR, seed=epoch,
                                            after_step=count_failures, description=f"{name} {epoch + 1}/{epochs}",
                                            show_progress=show_progress, optimizer=optimizers.setdefault(
                                                name, torch.optim.Adam(model.parameters(), lr=LR)))
    rows = []
    images = nn.functional.interpolate(test[0][:MEASURED_SAMPLES].reshape(-1, 1, 8, 8), scale_factor=2,
                                       mode="bilinear", align_corners=False)
    for name, classifier in models.items():
        last = stats[name][-1]
        fails = [f for e, f in failures[name] if e == epochs - 1]
        row = dict(model=name, test_accuracy=last.test_accuracy, forward_iterations=last.forward_iterations,
                   backward_iterations=last.backward_iterations,
                   unconverged_batches=sum(fails) / len(fails), seconds_per_epoch=seconds_per_epoch(stats[name]),
                   measured_lipschitz=measured_lipschitz(classifier.deq, images), proven_lipschitz=None,
                   paper_estimate=None)
        if isinstance(classifier, LipschitzMultiscaleDEQClassifier):
            certificate = classifier.deq.certificate((16, 16))
            row.update(proven_lipschitz=certificate.lipschitz_bound, paper_estimate=certificate.paper_estimate)
        rows.append(row)
        print(f"  {name}: accuracy {last.test_accuracy:.3f}, forward iterations {last.forward_iterations:.1f}, "
              f"{row['seconds_per_epoch']:.2f} s per epoch", flush=True)
    columns = list(rows[0])
    title = f"MDEQ family on the digits upsampled to 16x16, {epochs} epochs"
    print_table(title, columns, rows)
    regularised, lipschitz = rows[1], rows[2]
    held = (lipschitz["measured_lipschitz"] <= lipschitz["proven_lipschitz"]
            and lipschitz["forward_iterations"] < regularised["forward_iterations"]
            and lipschitz["backward_iterations"] < regularised["backward_iterations"]
            and lipschitz["seconds_per_epoch"] < regularised["seconds_per_epoch"]
            and lipschitz["test_accuracy"] >= regularised["test_accuracy"] - ACCURACY_MARGIN)
    headline = (f"Lipschitz vs Jacobian-regularised MDEQ: forward iterations {lipschitz['forward_iterations']:.1f} vs "
                f"{regularised['forward_iterations']:.1f}, backward {lipschitz['backward_iterations']:.1f} vs "
                f"{regularised['backward_iterations']:.1f}, "
                f"{lipschitz['seconds_per_epoch'] / regularised['seconds_per_epoch']:.2f}x the time per epoch, "
                f"accuracy {lipschitz['test_accuracy']:.3f} vs {regularised['test_accuracy']:.3f}; proven L "
                f"{lipschitz['proven_lipschitz']:.3g} >= measured {lipschitz['measured_lipschitz']:.3g}, the paper's "
                f"estimate {lipschitz['paper_estimate']:.3g}")
    result = ClaimResult(NAME, held, headline, {title: (columns, rows)})

    def plot(path):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for name in models:
            epochs_axis = list(range(1, len(stats[name]) + 1))
            axes[0].plot(epochs_axis, [s.forward_iterations for s in stats[name]], marker="o", label=name)
            axes[1].plot(epochs_axis, [s.backward_iterations for s in stats[name]], marker="o", label=name)
            axes[2].plot(epochs_axis, [s.test_accuracy for s in stats[name]], marker="o", label=name)
        axes[0].set(xlabel="epoch", ylabel="forward iterations per batch", title="forward solve")
        axes[1].set(xlabel="epoch", ylabel="backward iterations per batch", title="implicit backward")
        axes[2].set(xlabel="epoch", ylabel="test accuracy", title="accuracy")
        axes[0].legend(fontsize=7)
        finish_figure(fig, path, "Lipschitz multiscale DEQ (Sato and Iiduka 2026) against the MDEQ family")

    notes = claim_notes(__doc__, NOTES, train=len(train[0]), test=len(test[0]), lr=LR, weight=JAC_REG[0],
                        probability=JAC_REG[1], tol=SOLVER["tol"], max_iter=SOLVER["max_iter"],
                        margin=100 * ACCURACY_MARGIN, measured=MEASURED_SAMPLES, **sizes)
    return write_claim(out, result, "Lipschitz multiscale DEQ: iterations, speed and accuracy", header, notes,
                       plot if plots else None)

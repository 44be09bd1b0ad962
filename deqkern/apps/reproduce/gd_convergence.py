"""`gd-convergence` (global convergence of gradient descent for wide DEQs with general activations): full-batch
gradient descent on the squared loss of an over-parameterised DEQ drives the loss to 0 at a linear rate, while
||W||_2 stays below 1 / Lip(act) (every forward stays a contraction) and the weights move less the wider the layer.

What runs and when the claim holds: NOTES, filled in with the sizes of the run and written before its table.
"""
import math
import warnings

import torch

from ...core.errors import NonConvergenceWarning
from ...nn import DEQLinear
from ..digits import digits, progress
from .common import ClaimResult, claim_notes, finish_figure, print_table, provenance, write_claim

NAME = "gd-convergence"
SIZES = {  # quick -> the sizes of the run: the first width is the narrow one, the others over-parameterised
    False: dict(widths=(64, 256, 1024), samples=128, steps=200),
    True: dict(widths=(32, 128), samples=64, steps=60),
}
ETA, CONTROL_ETA = 1.0, 0.1  # the step of the tanh runs and of the identity control
INIT_NORM = 0.5     # ||W_0||_2
TOL, MAX_ITER = 1e-10, 400
NORM_EVERY = 10     # ||W||_2 by SVD every this many steps
LOSS_DROP = 1e-3    # the over-parameterised runs end below this times their initial loss

NOTES = """\
n = {samples} digits (inputs scaled to unit norm), scalar targets (label - 4.5) / 4.5; y = a^T z* with
z* = tanh(W z* + U x + b) (DEQLinear, float64, tol {tol:g}), a ~ N(0, 1/m) fixed, U ~ N(0, 1), ||W_0||_2 =
{init_norm:g}, widths m in {widths}; {steps} steps of full-batch gradient descent in the NTK scaling (step eta = {eta:g}
for U and b, eta * 64 / m for W: the W = W_tilde / sqrt(m) parameterisation). Per width: the loss curve and its
fitted linear rate (exp of the slope of log loss over the second half), the largest ||W||_2 (every {norm_every}
steps, by SVD), and the relative change ||W_T - W_0||_F / ||W_0||_F.
Negative control: the identity activation makes the DEQ affine in x, so its loss can never go below the affine
least-squares floor of these {samples} samples; with tanh the loss goes far below it. The control runs with step
{control_eta:g} (at {eta:g} its W leaves the contraction region within a few steps and the solve diverges: nothing
keeps a linear DEQ's ||W||_2 below 1).
Holds when, at the over-parameterised widths ({wide}), the fitted rate is < 1 with the loss {drop:g}x below its start
and Lip(act) ||W||_2 < 1 throughout, the relative weight change decreases with width, and the identity runs never
go below the floor while tanh goes below it at every width.
"""


def _data(n):
    (x, y), _ = digits(torch.float64)
    x = x[:n] / x[:n].norm(dim=1, keepdim=True)
    return x, ((y[:n].double() - 4.5) / 4.5)[:, None]


def affine_floor(x, t):
    """min over affine maps of 0.5 mean (w^T x + b - t)^2: the best an affine model (the identity DEQ) can do."""
    X = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(X, t, driver="gelsd").solution  # SVD-based: X is rank-deficient (blank pixels)
    return 0.5 * (X @ solution - t).square().mean().item()


def train(activation, m, x, t, steps, eta=ETA, show_progress=True):
    torch.manual_seed(0)
    layer = DEQLinear(x.shape[1], m, activation=activation, tol=TOL, max_iter=MAX_ITER, init_scale=INIT_NORM,
                      dtype=torch.float64, on_nonconvergence="ignore")
    with torch.no_grad():
        layer.injection.weight.normal_(0.0, 1.0)
        layer.injection.bias.zero_()
    a = torch.randn(m, 1, dtype=torch.float64) / math.sqrt(m)
    W0 = layer.weight.detach().clone()
    losses, largest_norm, finite = [], 0.0, True
    for k in progress(range(steps), f"{activation} m={m}", show_progress):
        if k % NORM_EVERY == 0:
            largest_norm = max(largest_norm, torch.linalg.svdvals(layer.weight.detach())[0].item())
        loss = 0.5 * (layer(x) @ a - t).square().mean()
        if not math.isfinite(loss.item()):
            finite = False
            break
        losses.append(loss.item())
        layer.zero_grad()
        loss.backward()
        with torch.no_grad():
            layer.weight -= eta * 64 / m * layer.weight.grad
            layer.injection.weight -= eta * layer.injection.weight.grad
            layer.injection.bias -= eta * layer.injection.bias.grad
    half = len(losses) // 2
    ks = torch.arange(half, len(losses), dtype=torch.float64)
    logs = torch.tensor(losses[half:], dtype=torch.float64).log()
    slope = ((ks - ks.mean()) * (logs - logs.mean())).sum() / (ks - ks.mean()).square().sum()
    change = ((layer.weight.detach() - W0).norm() / W0.norm()).item() if finite else math.inf
    return dict(activation=activation, width=m, steps=len(losses), initial_loss=losses[0], final_loss=losses[-1],
                min_loss=min(losses), fitted_rate=math.exp(slope.item()), largest_weight_norm=largest_norm,
                relative_weight_change=change, stayed_finite=finite), losses


def run(out, quick=False, show_progress=True, command=(), plots=True):
    header = provenance(command)
    sizes = SIZES[quick]
    widths, steps = sizes["widths"], sizes["steps"]
    x, t = _data(sizes["samples"])
    floor = affine_floor(x, t)
    rows, curves = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)  # the identity control may leave the contraction
        for activation in ("tanh", "identity"):
            for m in widths:
                eta = ETA if activation == "tanh" else CONTROL_ETA
                row, losses = train(activation, m, x, t, steps, eta=eta, show_progress=show_progress)
                row["step_size"] = eta
                row["affine_floor"] = floor
                rows.append(row)
                curves[(activation, m)] = losses
                print(f"  {activation} m={m}: loss {row['initial_loss']:.3g} -> {row['final_loss']:.3g}, rate "
                      f"{row['fitted_rate']:.4f}, max ||W||_2 {row['largest_weight_norm']:.3f}, change "
                      f"{row['relative_weight_change']:.3f}", flush=True)
    columns = list(rows[0])
    print_table(f"full-batch GD, {len(x)} samples, {steps} steps", columns, rows)
    tanh = [r for r in rows if r["activation"] == "tanh"]
    wide = [r for r in tanh if r["width"] >= widths[1]]
    changes = [r["relative_weight_change"] for r in tanh]
    held = (all(r["fitted_rate"] < 1 and r["final_loss"] < LOSS_DROP * r["initial_loss"]
                and r["largest_weight_norm"] < 1.0 for r in wide)
            and all(b < a for a, b in zip(changes, changes[1:]))
            and all(r["min_loss"] >= floor - 1e-9 and r["stayed_finite"] for r in rows if r["activation"] == "identity")
            and all(r["final_loss"] < floor for r in tanh))
    headline = ("tanh: fitted rates " + ", ".join(f"{r['fitted_rate']:.4f} (m={r['width']})" for r in tanh)
                + "; max ||W||_2 " + ", ".join(f"{r['largest_weight_norm']:.2f}" for r in tanh)
                + "; relative weight change " + ", ".join(f"{c:.3f}" for c in changes)
                + "; identity control: min loss "
                + f"{min(r['min_loss'] for r in rows if r['activation'] == 'identity'):.4f} >= affine floor "
                + f"{floor:.4f}, tanh final loss {max(r['final_loss'] for r in tanh):.2e}")
    result = ClaimResult(NAME, held, headline, {f"full-batch GD, {len(x)} samples, {steps} steps": (columns, rows)})

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (activation, m), losses in curves.items():
            ax.semilogy(losses, "-" if activation == "tanh" else "--", label=f"{activation}, m = {m}")
        ax.axhline(floor, color="black", linewidth=0.8, linestyle=":", label="affine least-squares floor")
        ax.set(xlabel="gradient descent step", ylabel="training loss (log)",
               title="full-batch GD on a wide DEQ: linear rate with tanh, floor with identity")
        ax.legend(fontsize=7)
        finish_figure(fig, path, "")

    notes = claim_notes(__doc__, NOTES, samples=len(x), tol=TOL, init_norm=INIT_NORM, steps=steps, eta=ETA,
                        norm_every=NORM_EVERY, widths="{" + ", ".join(str(m) for m in widths) + "}",
                        control_eta=CONTROL_ETA, wide=", ".join(str(m) for m in widths[1:]), drop=1 / LOSS_DROP)
    return write_claim(out, result, "Gradient descent on wide DEQs: linear convergence", header,
                       notes, plot if plots else None)

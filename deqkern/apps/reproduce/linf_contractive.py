"""`linf-contractive` (Jafarpour, Davydov, Proskurnikov and Bullo 2021, "Robust implicit networks via non-Euclidean
contractions"): mu_inf(A) < 1 by construction, a contraction the solver can count on, and an input-output Lipschitz
bound that certifies robustness, which training with the bound as a regulariser makes useful.

What runs and when the claim holds: NOTES, filled in with the sizes of the run and written before its table.
"""
import torch
from torch import nn

from ...nn.certified import LinfContractiveDEQ
from ...lipschitz import one_sided_linf
from ..digits import DigitsClassifier, accuracy, digits, train_classifier
from .common import ClaimResult, claim_notes, finish_figure, print_table, provenance, write_claim

NAME = "linf-contractive"
EPS = 0.02
PENALTY = 0.05
MU, DIAGONAL_FLOOR = 0.5, 1.0
LR = 3e-3
PGD_STEPS = 20
PAIRS = 256  # random pairs for the measured contraction
SIZES = {  # quick -> the sizes of the run
    False: dict(width=128, epochs=10, limit=None),
    True: dict(width=32, epochs=2, limit=512),
}

NOTES = """\
LinfContractiveDEQ(64 -> {width}, mu {mu:g}, relu, diagonal_floor {floor:g}) + Linear({width} -> 10) on the digits
(standardised pixels; {train} training, {test} test digits), Adam {lr:g}, {epochs} epochs, with and without the
penalty lam * ||y||_Lip, lam = {penalty:g} (the certificate's output-map bound ||C||_inf ||B||_inf / (1 - mu_+),
differentiable: `layer.bounds(readout)`). Measured: mu_inf(A) of the trained A; the worst contraction
||F(a) - F(b)||_inf / ||a - b||_inf of the averaged map over {pairs} random pairs, against the certified factor; the
empirical Lipschitz constant of u -> logits (gradient ascent on the ratio from random pairs) against the bound; clean
accuracy, accuracy under a {pgd_steps}-step PGD attack at ||delta||_inf <= eps, and certified accuracy (logit margin
> 2 eps Lip bound: no perturbation of that size can change the class) at eps = {eps:g}.
Holds when every measured quantity is within its certificate and the regularised model's certified accuracy is
above the unregularised one's.
"""


def _classifier(width):
    return DigitsClassifier(LinfContractiveDEQ(64, width, mu=MU, activation="relu", tol=1e-5, max_iter=300,
                                               diagonal_floor=DIAGONAL_FLOOR), width)


def _lipschitz_bound(model):
    """The certificate's bound on ||logits(u) - logits(u')||_inf / ||u - u'||_inf (with grad)."""
    return model.layer.bounds(model.head).output_lipschitz_bound


def _worst_contraction(layer, x, pairs=PAIRS):
    A = layer.weight.detach()
    alpha = layer.averaging_from(A)
    c = layer.injection_values(x[:pairs]).detach()
    step = lambda v: (1 - alpha) * v + alpha * torch.relu(v @ A.T + c)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(c.shape, generator=g), torch.randn(c.shape, generator=g)
    return ((step(a) - step(b)).abs().amax(1) / (a - b).abs().amax(1)).max().item()


def _empirical_lipschitz(model, x, steps=30):
    """max over pairs of ||y(u) - y(v)||_inf / ||u - v||_inf, by Adam ascent from random nearby pairs."""
    g = torch.Generator().manual_seed(2)
    u = x[:64].clone().requires_grad_(True)
    v = (x[:64] + 0.05 * torch.randn(x[:64].shape, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([u, v], lr=0.01)
    worst = 0.0
    for _ in range(steps):
        ratio = (model(u) - model(v)).abs().amax(1) / (u - v).abs().amax(1).clamp_min(1e-12)
        worst = max(worst, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return worst


def _pgd_accuracy(model, data, eps, steps=PGD_STEPS):
    x, y = data
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += (eps / 4) * grad.sign()
            delta.clamp_(-eps, eps)
    return accuracy(model, (x + delta.detach(), y))


@torch.no_grad()
def _certified_accuracy(model, data, eps):
    x, y = data
    logits = model(x)
    top2 = logits.topk(2, dim=1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    correct = top2.indices[:, 0] == y
    return (correct & (margin > 2 * eps * _lipschitz_bound(model))).double().mean().item()


def run(out, quick=False, show_progress=True, command=(), plots=True):
    header = provenance(command)
    sizes = SIZES[quick]
    width, epochs = sizes["width"], sizes["epochs"]
    train, test = digits(limit=sizes["limit"])
    rows, curves = [], {}
    for penalty in (0.0, PENALTY):
        name = f"penalty {penalty:g}" if penalty else "no penalty"
        torch.manual_seed(0)
        model = _classifier(width)
        extra = (lambda model=model: PENALTY * _lipschitz_bound(model)) if penalty else None
        stats = train_classifier(model, model.layer, train, test, epochs, LR, extra_loss=extra, description=name,
                                 show_progress=show_progress)
        curves[name] = stats
        model.eval()
        cert = model.layer.certificate()
        A = model.layer.weight.detach().double()
        with torch.no_grad():
            bound = _lipschitz_bound(model).item()
        # mu_inf of the float32 A the solve used (within float32 rounding of the float64 certificate's)
        rows.append(dict(run=name, mu=MU, mu_inf=float(one_sided_linf(A)), certified_factor=cert.contraction_factor,
                         worst_measured_contraction=_worst_contraction(model.layer, test[0]),
                         lipschitz_bound=bound, empirical_lipschitz=_empirical_lipschitz(model, test[0]),
                         clean_accuracy=accuracy(model, test), pgd_accuracy=_pgd_accuracy(model, test, EPS),
                         certified_accuracy=_certified_accuracy(model, test, EPS),
                         forward_iterations=stats[-1].forward_iterations,
                         forward_iterations_bound=cert.forward_iterations_bound))
        print(f"  {name}: clean {rows[-1]['clean_accuracy']:.3f}, certified {rows[-1]['certified_accuracy']:.3f}, "
              f"bound {bound:.3g}", flush=True)
    columns = list(rows[0])
    print_table(f"LinfContractiveDEQ(64 -> {width}) on digits, {epochs} epochs, eps {EPS}", columns, rows)
    within = all(r["mu_inf"] <= r["mu"] + 1e-6 and r["worst_measured_contraction"] <= r["certified_factor"] + 1e-6
                 and r["empirical_lipschitz"] <= r["lipschitz_bound"] * (1 + 1e-6)
                 and r["forward_iterations"] <= r["forward_iterations_bound"] for r in rows)
    plain, reg = rows
    held = within and reg["certified_accuracy"] > plain["certified_accuracy"]
    headline = (f"mu_inf {max(r['mu_inf'] for r in rows):.3f} <= {MU:g}, measured contraction <= certified factor, "
                f"empirical Lipschitz {plain['empirical_lipschitz']:.3g} / {reg['empirical_lipschitz']:.3g} <= bound "
                f"{plain['lipschitz_bound']:.3g} / {reg['lipschitz_bound']:.3g}; certified accuracy at eps {EPS}: "
                f"{plain['certified_accuracy']:.3f} -> {reg['certified_accuracy']:.3f} with the penalty (clean "
                f"{plain['clean_accuracy']:.3f} -> {reg['clean_accuracy']:.3f}, PGD {plain['pgd_accuracy']:.3f} -> "
                f"{reg['pgd_accuracy']:.3f})")
    result = ClaimResult(NAME, held, headline, {f"digits, {epochs} epochs, eps = {EPS}": (columns, rows)})

    def plot(path):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, stats in curves.items():
            axes[0].plot([s.epoch for s in stats], [s.test_accuracy for s in stats], marker="o", label=name)
        axes[0].set(xlabel="epoch", ylabel="clean test accuracy", title="training")
        axes[0].legend(fontsize=8)
        kinds = ["clean_accuracy", "pgd_accuracy", "certified_accuracy"]
        for i, r in enumerate(rows):
            axes[1].bar([k + 0.4 * i for k in range(3)], [r[k] for k in kinds], width=0.4, label=r["run"])
        axes[1].set_xticks([k + 0.2 for k in range(3)], ["clean", f"PGD eps {EPS}", f"certified eps {EPS}"])
        axes[1].set(ylabel="test accuracy", title="robustness")
        axes[1].legend(fontsize=8)
        finish_figure(fig, path, "l-infinity contractive DEQ (Jafarpour et al. 2021) with deqkern")

    notes = claim_notes(__doc__, NOTES, mu=MU, floor=DIAGONAL_FLOOR, train=len(train[0]), test=len(test[0]), lr=LR,
                        penalty=PENALTY, pairs=min(PAIRS, len(test[0])), pgd_steps=PGD_STEPS, eps=EPS, **sizes)
    return write_claim(out, result, "l-infinity contractive DEQ: certificates and certified robustness", header,
                       notes, plot if plots else None)

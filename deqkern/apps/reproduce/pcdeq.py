"""`pcdeq` (Gabor, Piotrowski and Cavalcante 2024, positive concave DEQs): a unique fixed point reached
geometrically with no bound on ||W||, and trained pcDEQs as accurate as an unconstrained DEQ.

What runs and when the claim holds: NOTES, filled in with the sizes of the run and written before its tables. Each
rate proven by deqkern/nn/certified/positive_concave_rates.py is set beside the rate measured over the same steps
and in the same norm, so that "measured <= proven" is read off each row.
"""
import math

import torch
from torch import nn

from ...nn.certified import PositiveConcaveConvDEQ, PositiveConcaveDEQ, positive_concave_fixed_point
from ...nn.certified.positive_concave import _ACTIVATION_SUP
from ...nn.certified.positive_concave_rates import positive_concave_rates
from ...nn import DEQLinear
from ..digits import DigitsClassifier, digits, seconds_per_epoch, train_classifier
from .common import ClaimResult, claim_notes, finish_figure, number, print_table, provenance, write_claim

NAME = "pcdeq"
NORMS = (0.5, 2.0, 10.0, 100.0)  # ||W||_2 of the random layers
SIZES = {  # quick -> the sizes of the run
    False: dict(d=32, starts=32, width=64, epochs=8, limit=None),
    True: dict(d=16, starts=8, width=32, epochs=3, limit=512),
}
BATCH = 4           # samples (injections c) per random layer
C_FLOOR = 1e-3      # c = softplus(N(0, 1)) + C_FLOOR > 0
START_SCALE = 5.0   # the random starts: uniform in [0, START_SCALE]
STOP = 1e-13        # the uniqueness solves stop once no entry moves by more than this
MAX_STEPS = 10000   # ... or after this many steps
TOL, MAX_ITER = 1e-4, 1000  # the tol and max_iter the iteration bound is proven for, and the measured solve's
FLOOR = 1e-10       # a measured rate ends at the last step whose error is above FLOOR ||z*||_inf (float64 rounding)
RATE_SLACK = 1e-12  # float64 rounding allowed between a measured rate and its proven one
ACCURACY_MARGIN = 0.03  # the best dense pcDEQ within this of the unconstrained DEQ's test accuracy

NOTES = """\
Part 1, the theory, on random layers T(z) = tanh(W z + c): W with U(0, 1) entries (>= 0), d = {d}, scaled to
||W||_2 in {norms}; {batch} samples c = softplus(N(0, 1)) + {c_floor:g}; float64.
Uniqueness: {starts} random nonnegative starts per ||W||_2 (uniform in [0, {start_scale:g}]), plain iteration until no
entry moves by more than {stop:g} (at most {max_steps} steps): the largest distance between the fixed points reached,
whether the iterates from 0 increase monotonically, and the steps they took.

Rates, per sample (one row each), with e_k = z* - z_k >= 0 the error of the plain iteration from z_0 = 0 (z* its
float64 limit), each proven rate beside the one measured over the same steps and in the same norm:
- theorem_rate q (Piotrowski and Cavalcante 2022) proves 0 <= e_k <= q^k z* for every k >= 0: in the weighted max
  norm ||e||_z* = max_i |e_i| / z*_i, ||e_k||_z* <= q^k ||e_0||_z* (||e_0||_z* = 1), from step 0.
  measured_theorem_rate = (||e_K||_z* / ||e_0||_z*)^(1/K).
- tail_rate q_j proves ||e_(k+1)||_v <= q_j ||e_k||_v for every k >= j = tail_from_step, in the weighted max norm
  ||e||_v = max_i |e_i| / v_i with v the near-Perron vector of the Jacobian at z_j that proves it (returned by
  positive_concave_rates with the rate). measured_tail_rate =
  (||e_K||_v / ||e_j||_v)^(1/(K - j)).
- K, in both measured rates: the last step whose error is above {floor:g} ||z*||_inf (below it, float64 rounding is
  what would be measured); a measured rate is 0 where no step after its start is above it.
- iterations_bound: the proven number of evaluations of the plain iteration from 0 at tol {tol:g} (max_iter
  {max_iter}); iterations: the evaluations positive_concave_fixed_point took at that tol and max_iter (float64).

Part 2, training on the digits ({train} training, {test} test digits; width {width}, {epochs} epochs):
PositiveConcaveDEQ with tanh, softsign, relu6 and sigmoid (pcDEQ-1: a softplus injection), with sigmoid and a ReLU
injection (pcDEQ-2: injection="relu", which may be 0), PositiveConcaveConvDEQ (tanh), an unconstrained DEQLinear
and an MLP of the same width: test accuracy, forward/backward iterations per batch, time per epoch.

Holds when every fixed point was unique and reached monotonically, every measured rate is within its proven rate
(up to {rate_slack:g}) and every iteration count within its bound, and the best dense pcDEQ's accuracy is within
{margin:g} points of the unconstrained DEQ's.
"""


def random_layer(norm, d, seed=0):
    """W (d, d) >= 0 with ||W||_2 = norm, c (BATCH, d) > 0, and the generator (for the random starts)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.rand(d, d, generator=g, dtype=torch.float64)
    W *= norm / torch.linalg.matrix_norm(W, ord=2)
    c = nn.functional.softplus(torch.randn(BATCH, d, generator=g, dtype=torch.float64)) + C_FLOOR
    return W, c, g


def uniqueness(norm, W, c, g, starts):
    step = lambda z: torch.tanh(z @ W.T + c)  # noqa: E731
    fixed_points = []
    for _ in range(starts):
        z = START_SCALE * torch.rand(c.shape, generator=g, dtype=torch.float64)
        for _ in range(MAX_STEPS):
            nxt = step(z)
            if (nxt - z).abs().max() <= STOP:
                z = nxt
                break
            z = nxt
        fixed_points.append(z)
    spread = max((a - b).abs().max().item() for a in fixed_points for b in fixed_points)
    z, monotone, steps = torch.zeros_like(c), True, MAX_STEPS
    for k in range(MAX_STEPS):
        nxt = step(z)
        monotone &= bool((nxt >= z - 1e-15).all())
        if (nxt - z).abs().max() <= STOP:
            steps = k + 1
            break
        z = nxt
    return dict(weight_norm=norm, starts=starts, largest_distance=spread, monotone_from_zero=monotone,
                steps_from_zero=steps)


def _measured_rate(inf_norms, norms, j):
    """(norms[K] / norms[j])^(1/(K - j)) with K the last step whose error is above FLOOR ||z*||_inf (inf_norms[k]:
    ||e_k||_inf / ||z*||_inf); 0 where no step after j is above it."""
    above = [k for k in range(j + 1, len(norms)) if inf_norms[k] > FLOOR]
    if inf_norms[j] <= FLOOR or not above or norms[j] == 0:
        return 0.0
    K = above[-1]
    return (norms[K] / norms[j]) ** (1.0 / (K - j))


def rates(norm, W, c):
    """One row per sample: each proven rate and bound beside what was measured over its steps in its norm."""
    proven = positive_concave_rates(lambda v: v @ W.T, c, "tanh", _ACTIVATION_SUP["tanh"], TOL, MAX_ITER)
    step = lambda z: torch.tanh(z @ W.T + c)  # noqa: E731
    z_star = torch.zeros_like(c)
    for _ in range(20 * MAX_ITER):  # the limit to float64 precision, as positive_concave_rates measures it
        nxt = step(z_star)
        done = bool(((nxt - z_star).abs().amax(1) <= 1e-15 * nxt.abs().amax(1)).all())
        z_star = nxt
        if done:
            break
    tail_steps = proven.tail_rate_from_step.tolist()
    proven_tail = proven.tail_rate_bound.tolist()
    z_scale = z_star.abs().amax(1)
    errors = []  # e_k, k = 0, 1, ...: until every error is below the floor and every tail step is covered
    z = torch.zeros_like(c)
    for k in range(20 * MAX_ITER):
        e = z_star - z
        errors.append(e)
        if k >= max(tail_steps) and bool((e.abs().amax(1) <= FLOOR * z_scale).all()):
            break
        z = step(z)
    with torch.no_grad():
        _, info = positive_concave_fixed_point(W, c, activation="tanh", tol=TOL, max_iter=MAX_ITER,
                                               on_nonconvergence="ignore")
    rows = []
    for b in range(c.shape[0]):
        inf_norms = [(e[b].abs().max() / z_scale[b]).item() for e in errors]
        theorem_norms = [(e[b].abs() / z_star[b]).max().item() for e in errors]
        j, q = tail_steps[b], proven_tail[b]
        v = proven.tail_norm_weights[b]
        tail_norms = [(e[b].abs() / v).max().item() for e in errors]
        rows.append(dict(weight_norm=norm, sample=b, theorem_rate=proven.sample_rate_bound[b].item(),
                         measured_theorem_rate=_measured_rate(inf_norms, theorem_norms, 0),
                         tail_rate=q if q < 1 else None, tail_from_step=j if q < 1 else None,
                         measured_tail_rate=_measured_rate(inf_norms, tail_norms, j) if q < 1 else None,
                         iterations_bound=int(proven.forward_iterations_bound[b]),
                         iterations=int(info.iterations[b])))
    return rows


def rates_within(row):
    """measured <= proven for each proven rate of the row (and the iterations within their bound, if one)."""
    return (row["measured_theorem_rate"] <= row["theorem_rate"] + RATE_SLACK
            and (row["tail_rate"] is None or row["measured_tail_rate"] <= row["tail_rate"] + RATE_SLACK)
            and (row["iterations_bound"] < 0 or row["iterations"] <= row["iterations_bound"]))


def models(width):
    """name -> (a function building the layer, learning rate): each is built after seeding, so its initial weights
    do not depend on what ran before."""
    dense = lambda act: lambda: PositiveConcaveDEQ(64, width, activation=act, tol=1e-4, max_iter=100)  # noqa: E731
    return {
        "pcDEQ tanh": (dense("tanh"), 1e-2),
        "pcDEQ softsign": (dense("softsign"), 1e-2),
        "pcDEQ relu6": (dense("relu6"), 1e-2),
        "pcDEQ sigmoid": (dense("sigmoid"), 1e-2),
        "pcDEQ-2 sigmoid, relu injection": (
            lambda: PositiveConcaveDEQ(64, width, activation="sigmoid", injection="relu", tol=1e-4, max_iter=100), 1e-2),
        "pcDEQ conv tanh": (lambda: PositiveConcaveConvDEQ(1, 8, kernel_size=3, activation="tanh", tol=1e-4,
                                                           max_iter=100), 1e-2),
        "DEQLinear (unconstrained)": (lambda: DEQLinear(64, width, tol=1e-4, max_iter=100,
                                                        on_nonconvergence="ignore"), 3e-3),
        "MLP": (lambda: nn.Sequential(nn.Linear(64, width), nn.Tanh()), 3e-3),
    }


def run(out, quick=False, show_progress=True, command=(), plots=True):
    header = provenance(command)
    sizes = SIZES[quick]
    unique_rows, rate_rows = [], []
    for norm in NORMS:
        W, c, g = random_layer(norm, sizes["d"])
        unique_rows.append(uniqueness(norm, W, c, g, sizes["starts"]))
        rate_rows += rates(norm, W, c)
    unique_columns, rate_columns = list(unique_rows[0]), list(rate_rows[0])
    unique_title = (f"Part 1a: one fixed point, monotone iterates (random W >= 0, d = {sizes['d']}, tanh, float64, "
                    f"{sizes['starts']} starts, stop at {number(STOP)})")
    rate_title = (f"Part 1b: proven rates beside the rates measured over the same steps in the same norm (per "
                  f"sample; iterations at tol {number(TOL)})")
    print_table(unique_title, unique_columns, unique_rows)
    print_table(rate_title, rate_columns, rate_rows)
    width, epochs = sizes["width"], sizes["epochs"]
    train, test = digits(limit=sizes["limit"])
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
    train_title = f"Part 2: trained on digits, {epochs} epochs, width {width}"
    print_table(train_title, train_columns, rows)

    unique = all(r["largest_distance"] < 1e-9 and r["monotone_from_zero"] for r in unique_rows)
    within = sum(rates_within(r) for r in rate_rows)
    best_pc = max(r["test_accuracy"] for r in rows if r["model"].startswith("pcDEQ") and "conv" not in r["model"])
    unconstrained = next(r["test_accuracy"] for r in rows if r["model"].startswith("DEQLinear"))
    held = unique and within == len(rate_rows) and best_pc >= unconstrained - ACCURACY_MARGIN
    monotone = sum(r["monotone_from_zero"] for r in unique_rows)
    headline = (f"largest distance between the fixed points from {sizes['starts']} starts "
                f"{max(r['largest_distance'] for r in unique_rows):.1e} at ||W||_2 in {list(NORMS)}, monotone from 0 "
                f"at {monotone} of {len(unique_rows)}; measured <= proven (theorem and tail rates, same steps and "
                f"norm; iterations) in {within} of {len(rate_rows)} samples; best pcDEQ accuracy {best_pc:.3f} vs "
                f"unconstrained DEQ {unconstrained:.3f}")
    result = ClaimResult(NAME, held, headline, {unique_title: (unique_columns, unique_rows),
                                                rate_title: (rate_columns, rate_rows),
                                                train_title: (train_columns, rows)})
    notes = claim_notes(__doc__, NOTES, norms=list(NORMS), batch=BATCH, c_floor=C_FLOOR, start_scale=START_SCALE,
                        stop=STOP, max_steps=MAX_STEPS, floor=FLOOR, tol=TOL, max_iter=MAX_ITER, train=len(train[0]),
                        test=len(test[0]), rate_slack=RATE_SLACK, margin=100 * ACCURACY_MARGIN, **sizes)

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
                       notes, plot if plots else None)

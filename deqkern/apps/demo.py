"""The main job, `python -m deqkern demo`: deqkern's layer families trained side by side on scikit-learn's
handwritten digits (no download): DEQLinear with Picard and with Anderson, PositiveConcaveDEQ, LinfContractiveDEQ,
LipschitzDEQ, a convolutional DEQ through nn.DEQ and a two-branch multiscale DEQ (MDEQ). Prints, per family, test
accuracy, forward and backward solver iterations per batch, seconds per epoch and what its certificate guarantees,
and writes a PNG plot of accuracy and iterations per epoch (--out). `--backends cpu reference ...` (or `--backends available`) trains one
DEQLinear per deqkern backend instead (demo_backends.py).
"""
import argparse
from pathlib import Path

import torch
from torch import nn

from .digits import DigitsClassifier, load_digits_split, seconds_per_epoch, train_classifier


class ConvCell(nn.Module):
    """A generic convolutional map for nn.DEQ: f(z, x) = tanh(conv(z) + conv(x)) on 8x8 maps, with the recurrent
    kernel scaled to a proven operator norm of at most 0.9 (deqkern.lipschitz.conv_operator_norm_upper_bound)."""

    def __init__(self, channels=8):
        super().__init__()
        self.recurrent = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.injection = nn.Conv2d(1, channels, 3, padding=1)

    def forward(self, z, x):
        from ..lipschitz import conv_operator_norm_upper_bound

        K = self.recurrent.weight
        bound = conv_operator_norm_upper_bound(K, (K.shape[1], 8, 8), padding=1)
        K = K * torch.clamp(0.9 / bound.to(K.dtype), max=1.0)
        return torch.tanh(nn.functional.conv2d(z, K, padding=1) + self.injection(x.reshape(-1, 1, 8, 8)))


def families(hidden, tol, max_iter):
    """name -> (model, the layer whose last_info counts iterations, learning rate)."""
    from .. import nn as dnn

    common = dict(tol=tol, max_iter=max_iter, on_nonconvergence="ignore")
    layers = {
        "DEQLinear Picard": dnn.DEQLinear(64, hidden, **common),
        "DEQLinear Anderson": dnn.DEQLinear(64, hidden, method="anderson", **common),
        "PositiveConcaveDEQ": dnn.PositiveConcaveDEQ(64, hidden, activation="tanh", **common),
        "LinfContractiveDEQ": dnn.LinfContractiveDEQ(64, hidden, mu=0.5, diagonal_floor=1.0, **common),
        "LipschitzDEQ": dnn.LipschitzDEQ(64, hidden, gamma=0.9, **common),
    }
    out = {name: (DigitsClassifier(layer, hidden), layer, 1e-2 if "Concave" in name else 3e-3)
           for name, layer in layers.items()}
    conv = dnn.DEQ(ConvCell(8), method="anderson", solver_options=dict(tol=tol, max_iter=max_iter,
                                                                   on_nonconvergence="ignore"), z_shape=(8, 8, 8))
    out["conv DEQ (nn.DEQ, Anderson)"] = (DigitsClassifier(conv, 8 * 64), conv, 3e-3)
    # The MDEQ is no contraction: its solves stop at a looser tolerance, as MDEQ's own training does (30 steps).
    loose = dict(tol=max(tol, 1e-3), max_iter=min(max_iter, 20), on_nonconvergence="ignore")
    mdeq = dnn.MultiscaleDEQClassifier(1, 10, channels=(8, 16), expansion=2, final_channels=32, solver_options=loose,
                                       backward_options=loose)
    out["MDEQ 8x8 + 4x4 (tol 1e-3)"] = (nn.Sequential(nn.Unflatten(1, (1, 8, 8)), mdeq), mdeq, 3e-3)
    return out


def certificate_summary(layer) -> str:
    """One line: what the layer's certificate guarantees (empty for an uncertified layer)."""
    from ..nn import LinfContractiveDEQ, LipschitzDEQ, PositiveConcaveDEQ

    if isinstance(layer, LipschitzDEQ):
        c = layer.certificate()
        return (f"q = {c.contraction_factor:.3f} (proven), forward <= {c.forward_iterations_bound}, backward <= "
                f"{c.backward_iterations_bound} iterations, Lip_2(x -> z*) <= {c.input_lipschitz_bound:.3g}")
    if isinstance(layer, LinfContractiveDEQ):
        c = layer.certificate()
        return (f"mu_inf = {c.mu_inf:.3f} <= 0.5, factor {c.contraction_factor:.3f}, forward <= "
                f"{c.forward_iterations_bound} iterations, Lip_inf(u -> x*) <= {c.input_lipschitz_bound:.3g}")
    if isinstance(layer, PositiveConcaveDEQ):
        return f"W >= 0: unique fixed point for any W, {'yes' if layer.certificate().weight_nonnegative else 'NO'}"
    return ""


def parse_args(argv=None):
    def positive(kind):
        def parse(text):
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
            if not value > 0:
                raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
            return value

        parse.__name__ = f"positive {kind.__name__}"
        return parse

    parser = argparse.ArgumentParser(prog="python -m deqkern demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive(int), default=5)
    parser.add_argument("--hidden", type=positive(int), default=128)
    parser.add_argument("--batch-size", type=positive(int), default=64)
    parser.add_argument("--lr", type=positive(float), default=3e-3, help="(--backends mode)")
    parser.add_argument("--max-weight-norm", type=float, default=0.95,
                        help="(--backends mode) project ||W||_2 to at most this after each step (0: off)")
    parser.add_argument("--tol", type=positive(float), default=1e-4)
    parser.add_argument("--max-iter", type=positive(int), default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="train one DEQLinear per backend instead ('available': every one here)")
    parser.add_argument("--threads", type=positive(int), default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--train-limit", type=positive(int), default=None,
                        help="use only this many training samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="deqkern-demo", help="folder for demo.png (default ./deqkern-demo)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (there is none either when the output is not a terminal)")
    return parser.parse_args(argv)


def run(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    train, test = load_digits_split(device, dtype)
    if args.train_limit:
        train = (train[0][: args.train_limit], train[1][: args.train_limit])
    if args.backends:
        from .demo_backends import run_backends

        return run_backends(args, train, test, device, dtype)
    return run_families(args, train, test, device, dtype)


def run_families(args, train, test, device, dtype):

    print(f"deqkern demo: the layer families on sklearn digits ({len(train[0])} train / {len(test[0])} test), width "
          f"{args.hidden}, {args.epochs} epochs, batch {args.batch_size}, tol {args.tol:g}, {device} {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    results, curves = [], {}
    for name, (model, layer, lr) in families(args.hidden, args.tol, args.max_iter).items():
        torch.manual_seed(args.seed)
        for module in model.modules():  # the same initial weights for a family whatever ran before it
            if hasattr(module, "reset_parameters") and module is not model:
                module.reset_parameters()
        model.to(device=device, dtype=dtype)
        stats = train_classifier(model, layer, train, test, args.epochs, lr, batch_size=args.batch_size,
                                 seed=args.seed, description=name, show_progress=not args.no_progress)
        curves[name] = stats
        results.append(dict(family=name, test_accuracy=stats[-1].test_accuracy,
                            forward_iterations=stats[-1].forward_iterations,
                            backward_iterations=stats[-1].backward_iterations,
                            seconds_per_epoch=seconds_per_epoch(stats), certificate=certificate_summary(layer)))
    width = max(len(r["family"]) for r in results)
    print(f"{'family':>{width}} | test acc | fwd iters | bwd iters | s / epoch | certificate")
    for r in results:
        print(f"{r['family']:>{width}} | {r['test_accuracy']:8.4f} | {r['forward_iterations']:9.1f} | "
              f"{r['backward_iterations']:9.1f} | {r['seconds_per_epoch']:9.3f} | {r['certificate']}")
    path = _plot(Path(args.out), curves)
    if path:
        print(f"wrote {path}")
    return results


def _plot(out: Path, curves):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no plot is written (pip install matplotlib)")
        return None
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, stats in curves.items():
        epochs = [s.epoch for s in stats]
        axes[0].plot(epochs, [s.test_accuracy for s in stats], marker="o", label=name)
        axes[1].plot(epochs, [s.forward_iterations for s in stats], marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="test accuracy", title="accuracy")
    axes[1].set(xlabel="epoch", ylabel="forward iterations per batch", title="solver iterations")
    axes[0].legend(fontsize=7)
    fig.suptitle("deqkern's layer families on the digits")
    fig.tight_layout()
    path = out / "demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The main job: train a DEQLinear classifier on scikit-learn's handwritten digits with every available backend.

Prints, per backend, test accuracy, mean solver iterations (forward and implicit backward) and time per epoch.
"""
import argparse
import time

import torch
from torch import nn

from . import _extension
from .nn import DEQLinear


def available_backends(device: torch.device):
    """The deqkern backends that can run on `device` (the reference last, as the yardstick)."""
    if device.type == "cuda":
        backends = (["cuda"] if _extension.CUDA_EXTENSION_BUILT else []) + (
            ["triton"] if _extension.triton_available() else []
        )
    else:
        backends = ["cpu"]
    return backends + ["reference"]


def load_digits_split(device, dtype, test_fraction=0.25, seed=0):
    """The 8x8 digits that ship inside scikit-learn (no download), standardised, split train/test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=dtype)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(len(x) * test_fraction)
    mean, std = x[n_test:].mean(0), x[n_test:].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return (x[n_test:].to(device), y[n_test:].to(device)), (x[:n_test].to(device), y[:n_test].to(device))


class DigitsClassifier(nn.Module):
    def __init__(self, hidden, backend, dtype, device, tol, max_iter):
        super().__init__()
        self.deq = DEQLinear(64, hidden, activation="tanh", tol=tol, max_iter=max_iter, backend=backend,
                             dtype=dtype, device=device)
        self.head = nn.Linear(hidden, 10, dtype=dtype, device=device)

    def forward(self, x):
        return self.head(self.deq(x))


def train_one_backend(backend, args, train, test, device, dtype):
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    model = DigitsClassifier(args.hidden, backend, dtype, device, args.tol, args.max_iter)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    x_train, y_train = train
    n_batches = (len(x_train) + args.batch_size - 1) // args.batch_size
    epoch_times, forward_iters, backward_iters = [], [], []
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed + epoch))
        bar = tqdm(range(n_batches), desc=f"{backend:>9} epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=True if args.no_progress else None)  # None: no bar when not a terminal
        start = time.perf_counter()
        for i in bar:
            index = order[i * args.batch_size : (i + 1) * args.batch_size].to(device)
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if args.max_weight_norm:
                # Projected gradient: keep ||W||_2 below 1 / Lip(tanh) so every solve stays a contraction.
                with torch.no_grad():
                    W = model.deq.weight
                    W.mul_((args.max_weight_norm / torch.linalg.matrix_norm(W, ord=2)).clamp(max=1.0))
            info = model.deq.last_info
            forward_iters.append(info.iterations.float().mean().item())
            backward_iters.append(info.backward.iterations.float().mean().item())
            bar.set_postfix(loss=f"{loss.item():.3f}", fwd_it=f"{forward_iters[-1]:.1f}",
                            bwd_it=f"{backward_iters[-1]:.1f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_times.append(time.perf_counter() - start)
    with torch.no_grad():
        x_test, y_test = test
        accuracy = (model(x_test).argmax(1) == y_test).double().mean().item()
    return {
        "backend": backend,
        "test_accuracy": accuracy,
        "forward_iterations": sum(forward_iters) / len(forward_iters),
        "backward_iterations": sum(backward_iters) / len(backward_iters),
        # The first epoch includes one-off warm-up (kernel loading, caches): report the later ones when there are.
        "seconds_per_epoch": sum(epoch_times[1:] or epoch_times) / len(epoch_times[1:] or epoch_times),
    }


def _positive(kind):
    """An argparse type: a number of `kind` that must be > 0 (an epoch count of 0 is an error, not a division by 0)."""
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m deqkern demo", description=__doc__)
    parser.add_argument("--epochs", type=_positive(int), default=5)
    parser.add_argument("--hidden", type=_positive(int), default=128)
    parser.add_argument("--batch-size", type=_positive(int), default=64)
    parser.add_argument("--lr", type=_positive(float), default=3e-3)
    parser.add_argument("--max-weight-norm", type=float, default=0.95,
                        help="project ||W||_2 to at most this after each step (0: off)")
    parser.add_argument("--tol", type=_positive(float), default=1e-4)
    parser.add_argument("--max-iter", type=_positive(int), default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--backends", nargs="+", help="default: every backend available on the device")
    parser.add_argument("--threads", type=_positive(int), default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--train-limit", type=_positive(int), default=None,
                        help="use only this many training samples")
    parser.add_argument("--seed", type=int, default=0)
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
    backends = args.backends or available_backends(device)
    print(f"deqkern demo: DEQLinear(64 -> {args.hidden}, tanh) + Linear(-> 10) on sklearn digits "
          f"({len(train[0])} train / {len(test[0])} test), {args.epochs} epochs, batch {args.batch_size}, "
          f"tol {args.tol:g}, {device} {args.dtype}, {torch.get_num_threads()} threads")
    results = [train_one_backend(backend, args, train, test, device, dtype) for backend in backends]
    print(f"{'backend':>10} | {'test acc':>8} | {'fwd iters':>9} | {'bwd iters':>9} | {'s / epoch':>9}")
    for r in results:
        print(f"{r['backend']:>10} | {r['test_accuracy']:8.4f} | {r['forward_iterations']:9.1f} | "
              f"{r['backward_iterations']:9.1f} | {r['seconds_per_epoch']:9.3f}")
    return results

"""The data and the training loop every application shares (the demo, the reproductions, benchmarks): scikit-learn's
8x8 handwritten digits (no download), a classifier around any layer, and a seeded loop that records accuracy,
solver iterations and time per epoch."""
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn


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


def digits(dtype=torch.float32, limit: Optional[int] = None):
    """scikit-learn's 8x8 digits (no download), standardised, split 75/25 with a fixed seed: (train, test)."""
    train, test = load_digits_split("cpu", dtype)
    if limit:
        train = (train[0][:limit], train[1][:limit])
    return train, test


def progress(iterable, description: str, enabled: bool = True):
    """A tqdm bar on a terminal (none otherwise, or without tqdm)."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, leave=False, disable=None)


class DigitsClassifier(nn.Module):
    """A layer, then a linear head to the 10 digit classes: x (batch, 64) -> logits. image=True feeds the layer the
    digit as a (batch, 1, 8, 8) image; z is flattened into the head's `features`."""

    def __init__(self, layer: nn.Module, features: int, image: bool = False, device=None, dtype=None):
        super().__init__()
        self.layer, self.head, self.image = layer, nn.Linear(features, 10, device=device, dtype=dtype), image

    def forward(self, x):
        z = self.layer(x.reshape(-1, 1, 8, 8) if self.image else x)
        return self.head(z.flatten(1))


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    test_accuracy: float
    forward_iterations: float
    backward_iterations: float
    seconds: float


def train_classifier(model: nn.Module, deq_layer: Optional[nn.Module], train, test, epochs: int, lr: float,
                     batch_size: int = 64, seed: int = 0, extra_loss: Optional[Callable[[], torch.Tensor]] = None,
                     after_step: Optional[Callable[[], None]] = None, description: str = "",
                     show_progress: bool = True, optimizer: Optional[torch.optim.Optimizer] = None
                     ) -> List[EpochStats]:
    """Adam on cross-entropy (+ extra_loss() when given), shuffled with a fixed seed per epoch. The iteration
    counts are the means over the epoch's batches of deq_layer.last_info (forward) and .backward (implicit
    backward); NaN for a model without a DEQ. optimizer: to go on with one (its state kept across calls), else a new
    Adam at lr."""
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=lr)
    x_train, y_train = train
    stats = []
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed + epoch))
        losses, fwd, bwd = [], [], []
        start = time.perf_counter()
        model.train()
        for i in progress(range(0, len(x_train), batch_size), f"{description} epoch {epoch + 1}/{epochs}",
                          show_progress):
            index = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            if extra_loss is not None:
                loss = loss + extra_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            losses.append(loss.item())
            info = getattr(deq_layer, "last_info", None)
            if info is not None:
                fwd.append(info.iterations.double().mean().item())
                if info.backward is not None:
                    bwd.append(info.backward.iterations.double().mean().item())
        if x_train.is_cuda:
            torch.cuda.synchronize()  # the epoch's kernels have finished before it is timed
        seconds = time.perf_counter() - start
        stats.append(EpochStats(epoch + 1, sum(losses) / len(losses), accuracy(model, test),
                                sum(fwd) / len(fwd) if fwd else float("nan"),
                                sum(bwd) / len(bwd) if bwd else float("nan"), seconds))
    return stats


def seconds_per_epoch(stats: List[EpochStats]) -> float:
    """The mean over the epochs after the first (which includes one-off warm-up: allocation, caches), or the first
    when there is only one."""
    later = stats[1:] or stats
    return sum(s.seconds for s in later) / len(later)


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data
    value = (model(x).argmax(1) == y).double().mean().item()
    model.train()
    return value

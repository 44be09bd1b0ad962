"""What every reproduction shares: the digits, a seeded training loop that records what a claim is about,
the run's provenance, a progress bar on a terminal, and the files a claim writes (Markdown table, CSV, PNG plot)."""
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .tables import fmt, markdown_table, write_csv, write_markdown


@dataclass
class ClaimResult:
    """What a claim's run gives back: the verdict (True: the claim held here), its one-line figures, the tables
    (title -> (columns, rows)) and the files written."""

    name: str
    held: bool
    headline: str
    tables: Dict[str, tuple] = field(default_factory=dict)
    files: List[Path] = field(default_factory=list)

    def closing_line(self) -> str:
        return f"{self.name}: {'HOLDS' if self.held else 'DOES NOT HOLD'} -- {self.headline}"


def digits(dtype=torch.float32, limit: Optional[int] = None):
    """scikit-learn's 8x8 digits (no download), standardised, split 75/25 with a fixed seed: (train, test)."""
    from ..demo import load_digits_split

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
    digit as a (batch, 1, 8, 8) image; a layer that returns (z, info) (an nn.DEQ) has its z taken; z is flattened
    into the head's `features`."""

    def __init__(self, layer: nn.Module, features: int, image: bool = False, device=None, dtype=None):
        super().__init__()
        self.layer, self.head, self.image = layer, nn.Linear(features, 10, device=device, dtype=dtype), image

    def forward(self, x):
        z = self.layer(x.reshape(-1, 1, 8, 8) if self.image else x)
        if isinstance(z, tuple):
            z = z[0]
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
                     show_progress: bool = True) -> List[EpochStats]:
    """Adam on cross-entropy (+ extra_loss() when given), shuffled with a fixed seed per epoch. The iteration
    counts are the means over the epoch's batches of deq_layer.last_info (forward) and .backward (implicit
    backward); NaN for a model without a DEQ."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
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


def cpu_name() -> str:
    """The CPU's model name and logical CPU count (the benchmarks' headers use it too)."""
    name = platform.processor() or "unknown CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def provenance(command: Sequence[str]) -> List[str]:
    """The header lines of a results file: device, date, commit, versions, threads, command."""
    from .. import __version__

    return [
        f"device: {cpu_name()}, torch.get_num_threads() = {torch.get_num_threads()}",
        f"date (UTC): {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')}",
        f"git commit: {_git_commit()}",
        f"versions: torch {torch.__version__}, deqkern {__version__}, python {platform.python_version()}",
        f"command: {shlex.join(command)}",
    ]


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        run = lambda *cmd: subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True,  # noqa: E731
                                          timeout=20).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        # -dirty: tracked files differ from HEAD (the results files under bench/results/ that runs rewrite aside)
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
        return (commit + ("-dirty" if dirty else "")) or "unknown"
    except Exception:
        return "unknown (not a git checkout)"


def write_claim(out: Path, result: ClaimResult, title: str, header: List[str], notes: List[str],
                plot: Callable[[Path], None]) -> ClaimResult:
    """<out>/<name>.md (header, notes, tables, verdict), <name>.csv (the tables, one after the other with a
    `table` column) and <name>.png (plot(path))."""
    out.mkdir(parents=True, exist_ok=True)
    blocks = [("\n".join(notes))] if notes else []
    csv_rows, columns_all = [], ["table"]
    for table_title, (columns, rows) in result.tables.items():
        blocks.append(f"## {table_title}\n\n" + markdown_table(columns, ([fmt(r.get(c)) for c in columns]
                                                                          for r in rows)))
        columns_all += [c for c in columns if c not in columns_all]
        csv_rows += [dict(table=table_title, **r) for r in rows]
    blocks.append(f"**Verdict:** {result.closing_line()}")
    md, csv_path, png = out / f"{result.name}.md", out / f"{result.name}.csv", out / f"{result.name}.png"
    write_markdown(md, title, header, blocks)
    write_csv(csv_path, header, columns_all, ({c: r.get(c) for c in columns_all} for r in csv_rows))
    import matplotlib

    matplotlib.use("Agg")
    plot(png)
    result.files = [md, csv_path, png]
    return result


def finish_figure(fig, path: Path, title: str) -> None:
    """Title, layout, write (110 dpi) and close: the end of every claim's plot."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(title: str, columns: Sequence[str], rows: Sequence[dict]) -> None:
    print(f"\n{title}\n" + markdown_table(columns, ([fmt(r.get(c)) for c in columns] for r in rows)), flush=True)


def command_line() -> List[str]:
    return [sys.executable, *sys.argv]

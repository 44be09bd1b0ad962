"""The header every results file starts with: on what, when, from which code, under what load, by which command."""
import datetime
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import List

import torch

import deqkern
from deqkern.reproduce.common import cpu_name

from . import timing

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Provenance:
    """device_name and date_utc also title the plot; lines is the header, to which a script adds its own lines."""

    device_name: str
    date_utc: str
    lines: List[str]


def collect(device: torch.device, threads: int) -> Provenance:
    """The shared header lines; call after torch.set_num_threads(threads). On CPU this runs the stall check."""
    name = device_name(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    threads_line = (f"threads: torch.set_num_threads({threads}) -> {torch.get_num_threads()}; "
                    f"load average (1/5/15 min) at start: {load_average()}")
    if device.type == "cpu":
        threads_line += f"; {stall_check(threads)}"
    return Provenance(name, date, [
        f"device: {name}",
        f"date (UTC): {date}",
        f"git commit: {git_commit()}",
        f"versions: torch {torch.__version__}, triton {package_version('triton')}, "
        f"torchdeq {package_version('torchdeq')}, deqkern {deqkern.__version__}, python {platform.python_version()}",
        threads_line,
        f"command: {shlex.join([sys.executable, *sys.argv])}",
    ])


def end_line() -> str:
    """The last header line, written once the run is over: was the machine as quiet at the end as at the start?"""
    return f"load average (1/5/15 min) at end: {load_average()}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def package_version(name: str) -> str:
    """Read from the installed metadata, so that the header does not import triton or torchdeq."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """Short hash of HEAD, with -dirty when tracked files differ from it (untracked files, and the results files
    under bench/results/ that runs rewrite, do not count)."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                      ":(exclude)bench/results") else "")


def _git(*cmd) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""


def load_average() -> str:
    """Other processes on the machine make every multi-threaded op stall: the header records how busy it was."""
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def stall_check(threads: int) -> str:
    """Median time of a 64x64 torch.mm with `threads` threads and with 1: a busy machine stalls the first."""
    a, out = torch.randn(64, 64), torch.empty(64, 64)
    medians = []
    for n in (threads, 1):
        torch.set_num_threads(n)
        medians.append(timing.measure(lambda: torch.mm(a, a, out=out), torch.device("cpu"), 0.05).median)
    torch.set_num_threads(threads)
    text = f"64x64 torch.mm {medians[0] * 1e3:.1f} us with {threads} threads, {medians[1] * 1e3:.1f} us with 1"
    if medians[0] > 3 * medians[1]:
        text += " -- WARNING: multi-threaded ops stall, the machine is busy: timings are not representative"
    return text

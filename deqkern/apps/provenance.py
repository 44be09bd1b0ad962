"""The header every results file starts with (reproduce's and the benchmarks'): on what, when, from which code, by
which command. bench/harness/provenance.py adds the machine's load and a stall check for timings."""
import datetime
import os
import platform
import shlex
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import List, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def cpu_name() -> str:
    """The CPU's model name and logical CPU count (the benchmarks' headers use it too)."""
    name = platform.processor() or "unknown CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def package_version(name: str) -> str:
    """Read from the installed metadata, so that the header does not import triton or torchdeq."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def versions_line() -> str:
    from .. import __version__

    return (f"versions: torch {torch.__version__}, triton {package_version('triton')}, torchdeq "
            f"{package_version('torchdeq')}, deqkern {__version__}, python {platform.python_version()}")


def provenance(command: Sequence[str], device: torch.device = torch.device("cpu")) -> List[str]:
    """The header lines of a results file: device, date, commit, versions, threads, command."""
    return [
        f"device: {device_name(device)}, torch.get_num_threads() = {torch.get_num_threads()}",
        f"date (UTC): {utc_now()}",
        f"git commit: {git_commit()}",
        versions_line(),
        f"command: {shlex.join(command)}",
    ]


def git_commit() -> str:
    """Short hash of HEAD, with -dirty when tracked files differ from it (untracked files, and the results files
    under bench/results/ that runs rewrite, do not count)."""
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    return commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                      ":(exclude)bench/results") else "")


def _git(*cmd) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""

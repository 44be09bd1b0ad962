"""The header every benchmark results file starts with: deqkern.apps.provenance's lines (on what, when, from which
code and versions, by which command: written once, shared with the reproductions of the papers' claims) plus what
timings need besides: the threads, the machine's load at start and end, and a stall check."""
import os
import shlex
import sys
from dataclasses import dataclass
from typing import List

import torch

from deqkern.apps.provenance import device_name, git_commit, utc_now, versions_line

from . import timing


@dataclass
class Provenance:
    """device_name and date_utc also title the plot; lines is the header, to which a script adds its own lines."""

    device_name: str
    date_utc: str
    lines: List[str]


def collect(device: torch.device, threads: int) -> Provenance:
    """The shared header lines; call after torch.set_num_threads(threads). On CPU this runs the stall check."""
    name = device_name(device)
    date = utc_now()
    threads_line = (f"threads: torch.set_num_threads({threads}) -> {torch.get_num_threads()}; "
                    f"load average (1/5/15 min) at start: {load_average()}")
    if device.type == "cpu":
        threads_line += f"; {stall_check(threads)}"
    return Provenance(name, date, [
        f"device: {name}",
        f"date (UTC): {date}",
        f"git commit: {git_commit()}",
        versions_line(),
        threads_line,
        f"command: {shlex.join([sys.executable, *sys.argv])}",
    ])


def end_line() -> str:
    """The last header line, written once the run is over: was the machine as quiet at the end as at the start?"""
    return f"load average (1/5/15 min) at end: {load_average()}"


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

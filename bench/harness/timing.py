"""Timing of callables in ms: warm-up, repeats to a time budget, median / p20 / p80.

measure() times one callable on its own (triton.testing.do_bench on CUDA where there is no per-call setup);
interleaved_times() / measure_interleaved() time several in rounds, one call of each per round, for when their
ratio is the result. The garbage collector is off while timing: a collection inside a timed call is noise, not
solver time.
"""
import gc
import math
import time
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch


class Timing(NamedTuple):
    """Quantiles of the timed calls in ms; repeats is None where do_bench chose the count."""

    median: float
    p20: float
    p80: float
    repeats: Optional[int]

    def fields(self):
        """The row fields the results tables use."""
        return dict(median_ms=self.median, p20_ms=self.p20, p80_ms=self.p80, repeats=self.repeats)


def interpolated_quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear interpolation between the two nearest ranks (numpy's default)."""
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def nearest_rank_quantile(sorted_xs: Sequence[float], q: float) -> float:
    """The sample at the nearest rank: what bench_power_iteration has always reported."""
    return sorted_xs[min(len(sorted_xs) - 1, int(q * (len(sorted_xs) - 1) + 0.5))]


def summarize(times_ms: Sequence[float], quantile=interpolated_quantile) -> Timing:
    t = sorted(times_ms)
    return Timing(quantile(t, 0.5), quantile(t, 0.2), quantile(t, 0.8), len(t))


def warm_up(fn: Callable, seconds: float, max_calls: int = 1000, setup: Optional[Callable] = None):
    """At least 3 calls, then until `seconds` have passed or max_calls are made (the first calls of a process
    and of a shape are slower: allocation, page faults, lazy initialisation)."""
    deadline = time.perf_counter() + seconds
    for i in range(max_calls):
        if setup is not None:
            setup()
        fn()
        if i >= 2 and time.perf_counter() > deadline:
            break


def measure(fn: Callable, device: torch.device, min_time: float, setup: Optional[Callable] = None, *,
            warmup_s: Optional[float] = None, max_warmup_calls: int = 1000,
            quantile=interpolated_quantile) -> Timing:
    """Timing of fn(): warm-up (default 0.2 * min_time seconds), then repeats until min_time seconds and >= 5.

    `setup` runs before every call, untimed. On CUDA without setup, triton.testing.do_bench does the timing.
    """
    if device.type == "cuda" and setup is None:
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            median, p20, p80 = do_bench(fn, warmup=max(25, 200 * min_time), rep=1000 * min_time,
                                        quantiles=[0.5, 0.2, 0.8])
            return Timing(median, p20, p80, None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    setup = setup or (lambda: None)
    warm_up(fn, 0.2 * min_time if warmup_s is None else warmup_s, max_warmup_calls, setup)
    sync()
    times = []
    gc.collect()
    gc.disable()
    try:
        while sum(times) < min_time or len(times) < 5:
            setup()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return summarize([1e3 * t for t in times], quantile)


def interleaved_times(fns: Dict[str, Callable], min_time: float) -> Dict[str, list]:
    """{name: [ms of each timed call]} for CPU callables timed in rounds, one call of each per round.

    A ratio between two implementations is what a benchmark reports; on a shared machine the speed drifts over
    seconds, and timing one implementation after the other puts that drift into the ratio. Interleaving exposes
    both to the same conditions. Warm-up as in measure(); then rounds for min_time seconds per callable in all
    (a fast callable gets as many samples as the slowest, not min_time of its own), at least 5 rounds.
    """
    for fn in fns.values():
        measure(fn, torch.device("cpu"), 0.2 * min_time)  # warm-up only
    times = {name: [] for name in fns}
    gc.collect()
    gc.disable()
    deadline = time.perf_counter() + min_time * len(fns)
    try:
        while time.perf_counter() < deadline or len(times[next(iter(fns))]) < 5:
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - t0))
    finally:
        gc.enable()
    return times


def measure_interleaved(fns: Dict[str, Callable], min_time: float) -> Dict[str, Timing]:
    """{name: Timing} of interleaved_times(fns, min_time)."""
    return {name: summarize(t) for name, t in interleaved_times(fns, min_time).items()}

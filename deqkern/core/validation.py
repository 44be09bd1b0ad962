"""Argument validation shared by every public entry point: one rule per kind of argument, one message style.

Every message starts with "deqkern.<what>: " (what = the function or class the user called) and names the
argument, the allowed range and the value given. Numbers reject bool (True is not a tolerance).
"""
import math
import numbers

import torch

from .constants import ANDERSON_MAX_HISTORY

FLOAT_DTYPES = (torch.float32, torch.float64)
MAX_INT32 = 2**31 - 1


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(what, name, rule, value, error=ValueError):
    raise error(f"deqkern.{what}: {name} must be {rule}, got {value!r}")


def check_positive(what, name, value) -> float:
    """A finite number > 0 (a tolerance, a scale)."""
    if not _is_real(value) or not math.isfinite(value) or not value > 0:
        _fail(what, name, "a finite number > 0", value)
    return float(value)


def check_nonnegative(what, name, value) -> float:
    """A finite number >= 0 (a regulariser)."""
    if not _is_real(value) or not math.isfinite(value) or not value >= 0:
        _fail(what, name, "a finite number >= 0", value)
    return float(value)


def check_unit_interval(what, name, value) -> float:
    """A number in (0, 1] (a damping or mixing factor)."""
    if not _is_real(value) or not 0 < value <= 1:
        _fail(what, name, "a number in (0, 1]", value)
    return float(value)


def check_fraction(what, name, value) -> float:
    """A number in [0, 1) (a dropout rate, a mixing weight that leaves room for the rest)."""
    if not _is_real(value) or not 0 <= value < 1:
        _fail(what, name, "a number in [0, 1)", value)
    return float(value)


def check_contraction_factor(what, gamma, kept_below: str) -> float:
    """gamma in (0, 1), the contraction factor a certified layer keeps `kept_below` (what it bounds) below."""
    if not _is_real(gamma) or not 0 < gamma < 1:
        _fail(what, "gamma", f"a number in (0, 1) (the contraction factor {kept_below} is kept below)", gamma)
    return float(gamma)


def check_finite_number(what, name, value) -> float:
    if not _is_real(value) or not math.isfinite(value):
        _fail(what, name, "a finite number", value)
    return float(value)


def check_int(what, name, value, low, high=MAX_INT32) -> int:
    """An integer in [low, high] (an iteration count, a history length)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= value <= high:
        rule = f"an integer >= {low}" if high == MAX_INT32 else f"an integer in [{low}, {high}]"
        _fail(what, name, rule, value)
    return int(value)


def check_layer_sizes(what, in_features, hidden_features):
    """The widths of a dense implicit layer: integers >= 1 (a width of 0 has no fixed point to speak of)."""
    check_int(what, "in_features", in_features, 1)
    check_int(what, "hidden_features", hidden_features, 1)


def check_choice(what, name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"deqkern.{what}: unknown {name} {value!r}; choose one of {tuple(choices)}")
    return value


def check_tensor(what, name, t, dtypes=FLOAT_DTYPES, like=None, like_name="W"):
    """A tensor of one of `dtypes`; with `like`, of like's dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"deqkern.{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"deqkern.{what}: {name} must be {names}, got {t.dtype}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"deqkern.{what}: {name} has dtype {t.dtype} but {like_name} has {like.dtype}: use one "
                            "dtype")
        if t.device != like.device:
            raise ValueError(f"deqkern.{what}: {name} is on {t.device} but {like_name} is on {like.device}: use one "
                             "device")
    return t


def check_finite(what, **tensors):
    """ValueError naming every given tensor (None skipped) that holds NaN or Inf; one host synchronisation."""
    named = [(name, t) for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not named:
        return
    flags = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named]).tolist()
    bad = [name for (name, _), ok in zip(named, flags) if not ok]
    if bad:
        raise ValueError(f"deqkern.{what}: {' and '.join(bad)} contain NaN or Inf")


def check_solver_options(what, alpha, tol, max_iter, prefix=""):
    """Picard damping alpha in (0, 1], tolerance tol > 0, max_iter >= 1."""
    check_unit_interval(what, f"{prefix}alpha", alpha)
    check_positive(what, f"{prefix}tol", tol)
    check_int(what, f"{prefix}max_iter", max_iter, 1)


def check_anderson_options(what, m, beta, lam, m_name="m (the Anderson history length)",
                           max_m=ANDERSON_MAX_HISTORY):
    """Anderson history m in [1, ANDERSON_MAX_HISTORY], mixing beta in (0, 1], regulariser lam >= 0."""
    check_int(what, m_name, m, 1, max_m)
    check_unit_interval(what, "beta (the Anderson mixing)", beta)
    check_nonnegative(what, "lam (the Anderson regulariser, relative to the Gram diagonal)", lam)

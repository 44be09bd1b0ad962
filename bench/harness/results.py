"""Result rows: their dataclass (keys, timing quantiles, statistics), and filling one, where a peer that fails
gets its error in its row instead of stopping the benchmark."""
from dataclasses import field, make_dataclass
from typing import Callable, Dict, Optional

TIMING_FIELDS = {"median_ms": float, "p20_ms": float, "p80_ms": float, "repeats": int}  # see timing.Timing.fields


def row_class(name: str, keys: Dict[str, type], stats: Dict[str, type]):
    """A dataclass with the fields, in this order (the CSV's columns): the keys (required, they name the row),
    the TIMING_FIELDS, then the stats. Timing and stats fields default to None, str stats to ""."""
    optional = {**TIMING_FIELDS, **stats}
    return make_dataclass(name, [*keys.items(), *(
        (n, t, field(default="")) if t is str else (n, Optional[t], field(default=None)) for n, t in optional.items())])


def error_text(exc: BaseException) -> str:
    """One line, no table separators, at most 300 characters: fits a Markdown cell."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text[:300]


def fill(row, work: Callable[[], Dict[str, object]]):
    """Sets the fields work() returns on row (a dataclass with an `error` field); an exception goes to row.error."""
    try:
        for key, value in work().items():
            setattr(row, key, value)
    except Exception as exc:  # a failing peer must not stop the benchmark
        row.error = error_text(exc)
    return row

"""What every reproduction shares besides the digits (../digits.py): the result of a claim and the files it writes
(Markdown table with the run's provenance, CSV, PNG plot when matplotlib is installed)."""
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..provenance import provenance  # noqa: F401  (the claims write its header)
from ..tables import fmt, markdown_table, write_csv, write_markdown


NO_PLOT_NOTE = ("note: matplotlib is not installed, so no plot is written (pip install matplotlib); the tables are "
                "still written, as .md and .csv")


def plotting_available() -> bool:
    """Whether matplotlib imports (then with the file-only Agg backend): checked before a claim runs, so that a
    missing matplotlib skips the plot instead of failing after the computation."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    return True


def number(x: float) -> str:
    """A size or setting in running text: 1e-4, 3e-3, 0.5, 1000 (not 0.0001, 0.003, 1000.0)."""
    if x != 0 and abs(x) < 1e-2:
        mantissa, exponent = f"{x:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{x:g}"


class _NotesFormatter(string.Formatter):
    def format_field(self, value, format_spec):
        if isinstance(value, float) and format_spec in ("", "g"):
            return number(value)
        return super().format_field(value, format_spec)


def claim_notes(doc: str, template: str, **values) -> List[str]:
    """The notes a claim writes before its tables: the first paragraph of its module docstring (the claim), then
    what ran and when the claim holds, `template` filled in with the sizes and settings of this run (floats with
    `number`), so that no text states a size the run did not use."""
    return [doc.strip().split("\n\n")[0], _NotesFormatter().format(template, **values).strip()]


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


def write_claim(out: Path, result: ClaimResult, title: str, header: List[str], notes: List[str],
                plot: Optional[Callable[[Path], None]]) -> ClaimResult:
    """<out>/<name>.md (header, notes (one paragraph each), tables, verdict), <name>.csv (the tables, one after the
    other with a `table` column) and, unless plot is None (no matplotlib: see plotting_available), <name>.png
    (plot(path))."""
    out.mkdir(parents=True, exist_ok=True)
    blocks = ["\n\n".join(notes)] if notes else []
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
    result.files = [md, csv_path]
    if plot is not None:
        plot(png)
        result.files.append(png)
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

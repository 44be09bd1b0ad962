"""Markdown tables and files, CSV files: the formats every results file of deqkern shares (the reproductions
here, and the benchmarks under bench/, whose harness imports them)."""
import csv
from pathlib import Path
from typing import Dict, Iterable, List, Sequence


def fmt(value, digits: int = 3) -> str:
    """A table cell: None is empty, a float has `digits` significant digits (no exponent from 1e4 to 1e12)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if not 1e4 <= abs(value) < 1e12 else f"{value:.0f}"
    return str(value)


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Rows of already formatted cells (str() is applied); a `|` inside a cell is escaped."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cells in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, title: str, header: List[str], blocks: List[str]) -> None:
    """`# title`, the header as a bullet list, then the blocks (tables, `## headings`), a blank line between each."""
    text = f"# {title}\n\n" + "\n".join(f"- {line}" for line in header) + "\n\n" + "\n\n".join(blocks) + "\n"
    Path(path).write_text(text)


def write_csv(path: Path, header: List[str], columns: Sequence[str], rows: Iterable[Dict[str, object]]) -> None:
    """The header as `# ` comment lines, then one line per row dict (None written as an empty field)."""
    with open(path, "w", newline="") as fh:
        for line in header:
            fh.write(f"# {line}\n")
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})

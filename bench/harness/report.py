"""One run's results side by side under one stem: STEM.md (header + tables), STEM.csv (header + rows), STEM.png."""
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from . import plot, provenance, writers

CsvTable = Tuple[Sequence[str], List[dict]]  # (columns, rows as dicts)


def stem_path(out: str, name: str, quick: bool) -> Path:
    """OUT/NAME (with _quick added for --quick runs); an --out that names a .md file is used as is."""
    out = Path(out)
    if out.suffix == ".md":
        out.parent.mkdir(parents=True, exist_ok=True)
        return out.with_suffix("")
    out.mkdir(parents=True, exist_ok=True)
    return out / (name + ("_quick" if quick else ""))


def write(stem: Path, title: str, prov: provenance.Provenance, blocks: List[str],
          csv_tables: Dict[str, CsvTable], panels: plot.Panels) -> None:
    """Adds the end-of-run load average to the header, then writes and names the files.

    blocks: the Markdown body (tables, `## headings`); csv_tables: {suffix of the stem: (columns, rows)}, ""
    for the main table; panels: the plot's data (see harness.plot).
    """
    prov.lines.append(provenance.end_line())
    written = [_beside(stem, ".md")]
    writers.write_markdown(written[0], title, prov.lines, blocks)
    for suffix, (columns, rows) in csv_tables.items():
        written.append(_beside(stem, f"{suffix}.csv"))
        writers.write_csv(written[-1], prov.lines, columns, rows)
    png = plot.speedup_chart(_beside(stem, ".png"), panels, title, prov.device_name, prov.date_utc)
    written += [png] if png else []
    print("\nwrote " + ", ".join(str(p) for p in written))


def write_table(args, name: str, title: str, prov: provenance.Provenance, columns: Sequence[str], rows: List[dict],
                panels: plot.Panels) -> None:
    """The common end of a benchmark with one table: prints it as Markdown, then writes OUT/NAME_<device>{.md, .csv,
    .png} (args: the parsed command line of harness.cli, for --out, --device and --quick)."""
    table = writers.markdown_table(columns, ([writers.fmt(r.get(c, "")) for c in columns] for r in rows))
    print("\n" + table)
    write(stem_path(args.out, f"{name}_{args.device}", args.quick), title, prov, [table], {"": (columns, rows)},
          panels)


def _beside(stem: Path, ending: str) -> Path:
    """stem + ending, whatever dots the stem holds (Path.with_suffix would replace the part after the last one)."""
    return stem.parent / (stem.name + ending)

"""Markdown tables and files, CSV files: the formats every results file shares, written once in
deqkern.apps.tables (the reproductions of the papers' claims write the same files)."""
from deqkern.apps.tables import fmt, markdown_table, write_csv, write_markdown  # noqa: F401

"""Markdown tables and files, CSV files: the formats every results file shares, written once in
deqkern.reproduce.tables (the reproductions of the papers' claims write the same files)."""
from deqkern.reproduce.tables import fmt, markdown_table, write_csv, write_markdown  # noqa: F401

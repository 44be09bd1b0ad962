"""Shared pieces of the deqkern benchmarks; each bench/bench_*.py script imports what it needs.

  cli         the command-line options every script shares (--quick, --threads, --out, --device, --sizes, ...)
  timing      warm-up + repeated timing (median / p20 / p80), interleaved rounds for ratios, do_bench on CUDA
  results     result rows: their dataclass, and filling one (a failing peer records its error, the run goes on)
  peers       the implementations deqkern is compared with, and the problems shared by several scripts
  provenance  the header every results file starts with (device, date, commit, versions, load, command)
  writers     Markdown tables and CSV files
  plot        the PNG bar chart of deqkern's speed-up over each peer, per problem size
  report      one run's .md, .csv and .png, written side by side under one stem

Nothing here imports a bench script: the scripts depend on the harness, never the other way round.
"""

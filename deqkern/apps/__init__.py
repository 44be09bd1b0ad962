"""The applications built on deqkern: the demo (`python -m deqkern demo`), the papers' claims as commands
(`python -m deqkern reproduce`), the digits data and training loop they share, and the results-file header and
tables the benchmarks write too."""

"""`python -m deqkern reproduce CLAIM|all [--out DIR] [--quick]`: the papers behind deqkern, their claims as commands.

Each claim trains or solves on data that ships inside a Python package (scikit-learn's digits; no download) with
a fixed seed, prints its tables, writes <out>/<claim>.md, .csv and .png (the plot only with matplotlib installed:
without it a note says so before the run starts), and ends with one line: the verdict and its figures. One module
per claim; common holds what they share, ../tables the file formats.
"""
import argparse
import importlib
import sys
from pathlib import Path

from .common import NO_PLOT_NOTE, plotting_available

# claim name -> module (each has NAME and run(out, quick, show_progress, command, plots) -> ClaimResult)
CLAIMS = {
    "pcdeq": "pcdeq",
    "jacobian-reg": "jacobian_reg",
    "gd-convergence": "gd_convergence",
    "linf-contractive": "linf_contractive",
    "lipschitz": "lipschitz",
    "lipschitz-mdeq": "lipschitz_mdeq",
}
DEFAULT_OUT = "deqkern-reproduce"


def run_claim(name, out, quick=False, show_progress=True, command=(), plots=None):
    """Run one claim. plots: whether to write its plot (None: if matplotlib imports, checked here, before the run,
    with a printed note when it does not)."""
    if plots is None:
        plots = _check_plotting()
    module = importlib.import_module(f".{CLAIMS[name]}", __name__)
    return module.run(Path(out), quick=quick, show_progress=show_progress, command=command, plots=plots)


def _check_plotting():
    plots = plotting_available()
    if not plots:
        print(NO_PLOT_NOTE, flush=True)
    return plots


def main(argv=None):
    argv = sys.argv[2:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m deqkern reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("claim", choices=[*CLAIMS, "all"])
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder for the .md, .csv and .png (default ./{DEFAULT_OUT}; the .png needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer epochs (seconds, for tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    plots = _check_plotting()  # before anything is computed: no matplotlib skips the plots, not the run
    names = list(CLAIMS) if args.claim == "all" else [args.claim]
    command = [sys.executable, "-m", "deqkern", "reproduce", *argv]
    results = []
    for name in names:
        print(f"\n=== {name}", flush=True)
        results.append(run_claim(name, args.out, args.quick, not args.no_progress, command, plots))
        print(results[-1].closing_line(), flush=True)
        print("wrote " + ", ".join(str(p) for p in results[-1].files), flush=True)
    if len(results) > 1:
        print("\n" + "\n".join(r.closing_line() for r in results))
    return results

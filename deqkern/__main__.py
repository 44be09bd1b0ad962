"""Command line: `python -m deqkern demo|reproduce|info [options]` (or the `deqkern` console script)."""
import argparse
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="deqkern", description="deqkern command line")
    parser.add_argument("command", choices=["demo", "reproduce", "info"],
                        help="demo: train a DEQ on sklearn digits; reproduce CLAIM|all: the papers' claims as "
                        "commands; info: what is built and available")
    known, rest = parser.parse_known_args(argv[:1])
    if known.command == "demo":
        from .demo import run

        run(argv[1:])
    elif known.command == "reproduce":
        from .reproduce import main as reproduce

        reproduce(argv[1:])  # a claim that does not hold is a finding, printed and written, not an error
    else:
        import torch

        from . import _extension

        print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
        print(f"CPU extension: built; CUDA extension: {'built' if _extension.CUDA_EXTENSION_BUILT else 'not built'}")
        print(f"Triton: {'installed' if _extension.triton_available() else 'not installed'}"
              f"{' (interpreter on)' if _extension.triton_interpreter_on() else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

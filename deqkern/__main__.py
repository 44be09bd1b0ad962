"""Command line: `python -m deqkern demo|reproduce|info [options]` (or the `deqkern` console script)."""
import argparse
import sys


def info():
    """What is built, and which backend can run on which device here (and why not)."""
    import torch

    from . import __version__, _extension
    from .core.backends import backend_status

    print(f"deqkern {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print(f"CPU extension: built; CUDA extension: {'built' if _extension.CUDA_EXTENSION_BUILT else 'not built'}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for backend, why_not in backend_status(device).items():
            print(f"  {device} tensors, backend {backend}: {'available' if why_not is None else why_not}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="deqkern", description="deqkern command line")
    parser.add_argument("command", choices=["demo", "reproduce", "info"],
                        help="demo: train a DEQ on sklearn digits; reproduce CLAIM|all: the papers' claims as "
                        "commands; info: what is built and available")
    known, rest = parser.parse_known_args(argv[:1])
    if known.command == "demo":
        from .apps.demo import run

        run(argv[1:])
    elif known.command == "reproduce":
        from .apps.reproduce import main as reproduce

        reproduce(argv[1:])  # a claim that does not hold is a finding, printed and written, not an error
    else:
        info()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command-line options every bench script shares, and what they set up: device and thread count.

    parser = cli.BenchParser(__doc__, sizes={"cpu": [(32, 64)]}, quick_sizes=[(32, 64)], quick_help="...")
    parser.add_argument(...)              # the script's own options
    args = parser.parse_args(argv)        # adds args.size_list; args.min_time gets its (quick) default
    device = cli.start(args)
"""
import argparse
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import torch

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
Size = Union[int, Tuple[int, ...]]


class BenchParser(argparse.ArgumentParser):
    """--quick, --threads, --out, --device, --sizes, --min-time, with each script's defaults.

    sizes: {device: default sizes}; quick_sizes: the sizes of --quick; size_format: "BxD" for (batch, d) pairs
    or "d" for single dimensions; min_time: (default seconds, seconds with --quick).
    """

    def __init__(self, doc: str, *, sizes: Dict[str, List[Size]], quick_sizes: List[Size], quick_help: str,
                 size_format: str = "BxD", sizes_help: str = "", min_time: Tuple[float, float] = (0.5, 0.05)):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.default_sizes, self.quick_sizes, self.size_format = sizes, quick_sizes, size_format
        self.default_min_time = min_time
        example = "32x64,256x256" if size_format == "BxD" else "64,256"
        self.add_argument("--quick", action="store_true", help=quick_help)
        self.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
        self.add_argument("--out", default=str(RESULTS_DIR),
                          help="output folder for the .md, .csv and .png (default bench/results/); "
                               "a path ending in .md names the Markdown file, the others go next to it")
        self.add_argument("--device", choices=sorted(sizes), default="cpu",
                          help="where to run (default cpu)" + ("" if "cuda" in sizes else "; this script is CPU-only"))
        self.add_argument("--sizes", default=None, help=sizes_help or f"comma-separated {size_format} sizes, "
                          f"e.g. {example} (default {_format_sizes(sizes.get('cpu', []))} on CPU)")
        self.add_argument("--min-time", type=float, default=None,
                          help=f"seconds of timed repeats per measurement (default {min_time[0]:g}, "
                               f"{min_time[1]:g} with --quick)")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.sizes:
            parsed.size_list = self._parse_sizes(parsed.sizes)
        else:
            parsed.size_list = list(self.quick_sizes if parsed.quick else self.default_sizes[parsed.device])
        if parsed.min_time is None:
            parsed.min_time = self.default_min_time[1 if parsed.quick else 0]
        return parsed

    def _parse_sizes(self, text: str) -> List[Size]:
        dims = 2 if self.size_format == "BxD" else 1
        try:
            sizes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
            if not sizes or not all(len(s) == dims and min(s) > 0 for s in sizes):
                raise ValueError
        except ValueError:
            self.error(f"--sizes must look like {'32x64,256x256' if dims == 2 else '64,256'}, got {text!r}")
        return sizes if dims == 2 else [s[0] for s in sizes]


def start(args) -> torch.device:
    """The device of --device (exits if CUDA is asked for and absent), with torch.set_num_threads(--threads)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    return torch.device(args.device)


def _format_sizes(sizes: Sequence[Size]) -> str:
    return ",".join("x".join(map(str, s)) if isinstance(s, tuple) else str(s) for s in sizes)

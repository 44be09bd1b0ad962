"""Loads the compiled extensions; importing them registers the torch.ops.deqkern.* kernels."""
import importlib.util
import os

import torch  # noqa: F401  (loads libc10/libtorch, which the extensions link against)

try:
    from . import _C  # noqa: F401  (schemas + CPU kernels)
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "deqkern's C++ extension (deqkern._C) is not built or does not match this torch. "
        "Install with `pip install --no-build-isolation --use-pep517 -e .` from the repository root (pip before 24 "
        "needs --use-pep517 there)."
    ) from error

try:
    from . import _C_cuda  # noqa: F401  (CUDA kernels, when built)

    CUDA_EXTENSION_BUILT = True
except ImportError:
    CUDA_EXTENSION_BUILT = False


def triton_available() -> bool:
    """True when Triton is installed (kernels run on CUDA tensors, or on CPU with TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"

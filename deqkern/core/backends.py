"""Which implementation of an op runs: the backend names, the rule for "auto", and the registry op -> backends.

Each op module registers its implementations once (`register_backends("fixed_point_dense", cpu=..., ...)`), as
zero-argument loaders, so that Triton is imported only when a Triton kernel is asked for. `kernel(op, backend)`
returns the callable, whose signature is the registered op's (csrc/<op>/<op>.cpp).
"""
import importlib
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import _extension

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

_REGISTRY: Dict[str, Dict[str, Callable[[], Callable]]] = {}


def register_backends(op: str, **loaders: Callable[[], Callable]) -> None:
    """loaders: backend name -> zero-argument function returning the op's callable on that backend."""
    unknown = set(loaders) - set(BACKENDS[1:])
    if unknown:
        raise ValueError(f"register_backends({op!r}): unknown backend(s) {sorted(unknown)}")
    _REGISTRY.setdefault(op, {}).update(loaders)


def register_kernel_backends(op: str, reference: Callable, triton_module: str) -> None:
    """The registration of an op with kernels on every backend: cpu and cuda run torch.ops.deqkern.<op> (the dispatcher
    picks the device's kernel), triton runs deqkern.triton_kernels.<triton_module>.<op>_triton (imported on first use),
    reference is the specification."""
    compiled = lambda: getattr(torch.ops.deqkern, op)  # noqa: E731
    triton = lambda: getattr(importlib.import_module(f"deqkern.triton_kernels.{triton_module}"), f"{op}_triton")  # noqa
    register_backends(op, cpu=compiled, cuda=compiled, triton=triton, reference=lambda: reference)


def kernel(op: str, backend: str) -> Callable:
    """The callable of `op` on a resolved backend (not "auto")."""
    try:
        loader = _REGISTRY[op][backend]
    except KeyError:
        raise ValueError(f"deqkern: op {op!r} has no {backend!r} backend (registered: "
                         f"{sorted(_REGISTRY.get(op, {}))})") from None
    return loader()


def registered_backends(op: str):
    return tuple(sorted(_REGISTRY.get(op, {})))


def resolve_backend(backend: str, device: torch.device, what: str = "deqkern") -> str:
    """The concrete backend for tensors on `device`: "auto" picks cpu on CPU tensors, cuda (else triton) on CUDA
    tensors, the reference elsewhere (meta tensors); an explicit choice is checked against the device and the build."""
    if backend not in BACKENDS:
        raise ValueError(f"deqkern.{what}: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            if _extension.CUDA_EXTENSION_BUILT:
                return "cuda"
            if _extension.triton_available():
                return "triton"
            raise RuntimeError(f"deqkern.{what}: no GPU backend: the CUDA extension is not built and Triton is not "
                               "installed")
        return "reference"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"deqkern.{what}: backend='cpu' needs CPU tensors, got {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"deqkern.{what}: backend='cuda' needs CUDA tensors, got {device}")
        if not _extension.CUDA_EXTENSION_BUILT:
            raise RuntimeError(
                f"deqkern.{what}: backend='cuda': the CUDA extension (deqkern._C_cuda) is not built; reinstall with a "
                "CUDA build of torch and nvcc on PATH (DEQKERN_FORCE_CUDA=1 makes a missing toolkit an error)"
            )
    if backend == "triton":
        if not _extension.triton_available():
            raise RuntimeError(f"deqkern.{what}: backend='triton': Triton is not installed (pip install triton)")
        if device.type != "cuda" and not _extension.triton_interpreter_on():
            raise ValueError(f"deqkern.{what}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), "
                             f"got {device}")
    return backend


def backend_status(device) -> Dict[str, Optional[str]]:
    """For each backend: None when it can run on tensors of `device` here, else why it cannot (one sentence). The one
    place that says so: `available_backends`, `python -m deqkern info`, the demo, the tests' kit and the benchmarks
    read it."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    needs_cuda = "needs CUDA tensors" + ("" if torch.cuda.is_available() else " (no CUDA device here)")
    status = {"cpu": None if device.type == "cpu" else f"runs on CPU tensors, not {device.type} ones"}
    if on_gpu and not torch.cuda.is_available():
        # A CUDA build of torch (and of deqkern) on a machine without a GPU or driver: nothing can make CUDA tensors.
        no_gpu = "no CUDA device here (torch.cuda.is_available() is False)"
        return {**status, "cuda": no_gpu, "triton": no_gpu, "reference": no_gpu}
    if not on_gpu:
        status["cuda"] = needs_cuda
    elif not _extension.CUDA_EXTENSION_BUILT:
        status["cuda"] = ("the CUDA extension (deqkern._C_cuda) is not built: reinstall with a CUDA build of torch and "
                          "nvcc on PATH")
    else:
        status["cuda"] = None
    if not _extension.triton_available():
        status["triton"] = "Triton is not installed (pip install triton)"
    elif on_gpu or (device.type == "cpu" and _extension.triton_interpreter_on()):
        status["triton"] = None
    else:
        status["triton"] = needs_cuda + ", or TRITON_INTERPRET=1 for CPU tensors"
    status["reference"] = None
    return status


def available_backends(device) -> Tuple[str, ...]:
    """The backends that can run on tensors of `device` here, kernels first and the reference last."""
    return tuple(name for name, why_not in backend_status(device).items() if why_not is None)

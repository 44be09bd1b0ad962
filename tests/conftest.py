import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when its kernels are decorated: set it before any test module imports them, so that
# the Triton kernels run on the CPU when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kit  # noqa: E402


@pytest.fixture(params=kit.KERNEL_BACKENDS)
def backend(request):
    """Every kernel backend; the ones this machine cannot run are skipped (kit.unavailable says why)."""
    reason = kit.unavailable(request.param)
    if reason:
        pytest.skip(reason)
    return request.param

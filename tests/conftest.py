import os

import torch

# Triton reads TRITON_INTERPRET when its kernels are decorated: set it before any test module imports them,
# so that the Triton kernels run on the CPU when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""The dtypes of deqkern's solves, and the one rule for the dtype they accumulate in.

Half-precision data (float16, bfloat16) is stored as given and computed with in float32: products, iterates kept
by a solve, Anderson Gram matrices and residuals. float32 and float64 data are computed with in their own dtype.
(The dense solves follow the same rule: the C++ ops widen half data to float32 once per solve,
csrc/common/params_from_tensors.h: solve_in_accumulation_dtype; the Triton kernels widen it on load,
triton_kernels/common.py: widen; anderson_step accumulates in at::opmath_type.)
"""
import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
SOLVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half and float32 data, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32

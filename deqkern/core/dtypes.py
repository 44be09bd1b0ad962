"""The dtypes of deqkern's solves, and the one rule for the dtype they accumulate in.

Half-precision data (float16, bfloat16) is stored as given and computed with in float32: products, iterates kept
by a solve, Anderson Gram matrices and residuals. float32 and float64 data are computed with in their own dtype.
(csrc/common/params_from_tensors.h and the Triton kernels follow the same rule: at::opmath_type, and widening loads.)
"""
import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
SOLVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half and float32 data, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32

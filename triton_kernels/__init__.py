"""Triton kernels of deqkern, installed as `deqkern.triton_kernels` (the name `triton_kernels` belongs to Triton).

Importing `fixed_point_dense` registers the custom ops `deqkern::fixed_point_dense_triton` and
`deqkern::fixed_point_dense_backward_triton`. Set TRITON_INTERPRET=1 before importing to run them on CPU tensors.
"""
from .fixed_point_dense import fixed_point_dense_backward_triton, fixed_point_dense_triton

__all__ = ["fixed_point_dense_triton", "fixed_point_dense_backward_triton"]

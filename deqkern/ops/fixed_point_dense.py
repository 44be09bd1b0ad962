"""fixed_point_dense: fake kernels and backends of the dense Picard solve and its implicit backward (schema:
csrc/fixed_point_dense/fixed_point_dense.cpp; autograd and the public function: deqkern/solvers/dense.py)."""
from ..reference import fixed_point_dense_backward_ref, fixed_point_dense_ref
from ._dense_solve import register_dense_solve

register_dense_solve("fixed_point_dense", fixed_point_dense_ref, fixed_point_dense_backward_ref)

"""fixed_point_dense_anderson: fake kernels and backends of the dense Anderson solve and its implicit backward
(schema: csrc/fixed_point_dense_anderson/fixed_point_dense_anderson.cpp; autograd and the public function:
deqkern/solvers/dense.py, method="anderson")."""
import torch

from ..core.constants import ANDERSON_MAX_HISTORY
from ..reference import fixed_point_dense_anderson_backward_ref, fixed_point_dense_anderson_ref
from ._dense_solve import register_dense_solve


def _check_options(m, beta, lam, tol, max_iter):
    torch._check(1 <= m <= ANDERSON_MAX_HISTORY, lambda: f"m must be in [1, {ANDERSON_MAX_HISTORY}]")


register_dense_solve("fixed_point_dense_anderson", fixed_point_dense_anderson_ref,
                     fixed_point_dense_anderson_backward_ref, _check_options)

"""The solves users call: `solve` (any f, Picard / Anderson / Broyden, one `anderson_step` op per iteration) and
`fixed_point_dense` (a dense layer, one fused op per solve), each with its implicit backward."""
from .dense import fixed_point_dense
from .generic import SOLVE_OPTIONS, release_cached_buffers, solve

__all__ = ["SOLVE_OPTIONS", "fixed_point_dense", "release_cached_buffers", "solve"]

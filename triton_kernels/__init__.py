"""Triton kernels of deqkern, installed as `deqkern.triton_kernels` (the name `triton_kernels` belongs to Triton).

One module per op, named as the op (fixed_point_dense, fixed_point_dense_anderson, anderson_step, power_iteration);
common.py and anderson_weights.py hold what they share, activations.py the activation table. Importing an op module
registers its custom ops (`deqkern::<op>_triton`). Set TRITON_INTERPRET=1 before importing to run them on CPU tensors.
"""

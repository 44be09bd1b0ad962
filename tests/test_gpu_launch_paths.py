"""What only a GPU run can show about the launchers: a solve on a side stream is ordered on that stream (not on the
default one), grids of hundreds of thousands of blocks, and the CUDA Picard kernel's shared-memory paths (W in shared
memory, W read from global memory with 4-row tiles; the one-row tiles are test_fixed_point_dense.py's
test_cuda_wide_rows_tile_of_one). Skipped without a CUDA device; bench/gpu_check.sh runs them."""
import pytest
import torch

from deqkern.core.backends import kernel
from deqkern.reference import fixed_point_dense_anderson_ref, fixed_point_dense_ref

import kit

GPU_BACKENDS = ("cuda", "triton")


def skip_without_gpu(backend):
    if not kit.HAS_GPU:
        pytest.skip("no CUDA device")
    reason = kit.unavailable(backend)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("method", ["picard", "anderson"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_solve_runs_on_the_current_stream(backend, method):
    """c holds NaN until a side stream, behind a ~50 ms sleep, copies the real values in; the solve is called on that
    stream without waiting. Launched on any other stream, the kernel would read the NaN rows and flag them (0
    iterations, residual NaN) instead of solving. A first call warms the kernel (Triton compiles and autotunes,
    which synchronises) so that the timed order is the launch's own."""
    skip_without_gpu(backend)
    W, c_host, z0 = kit.dense_problem(37, 33, torch.float32)
    W, z0, c_source = W.cuda(), z0.cuda(), c_host.cuda()
    if method == "picard":
        def solve(c):
            return kernel("fixed_point_dense", backend)(W, c, z0, "tanh", 1.0, 1e-5, 200)
        ref = fixed_point_dense_ref(W.cpu(), c_host, z0.cpu(), "tanh", 1.0, 1e-5, 200)
    else:
        def solve(c):
            return kernel("fixed_point_dense_anderson", backend)(W, c, z0, "tanh", 5, 1.0, 1e-4, 1e-5, 200)
        ref = fixed_point_dense_anderson_ref(W.cpu(), c_host, z0.cpu(), "tanh", 5, 1.0, 1e-4, 1e-5, 200)
    solve(c_source)  # warm-up
    c = torch.full_like(c_source, float("nan"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # cycles: ~50 ms at ~2 GHz
        c.copy_(c_source)
        out = solve(c)
    side.synchronize()
    kit.assert_solve_matches(out, ref, torch.float32)
    assert bool(out[3].all())


@pytest.mark.parametrize("method", ["picard", "anderson"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_grid_of_hundreds_of_thousands_of_blocks(backend, method):
    """250,000 samples of width 4: 250,000 blocks for the CUDA Anderson kernel (one per sample), 62,500 for the CUDA
    Picard kernel (4-row tiles), 15,625 Triton programs; every sample against the reference (a few iterations)."""
    skip_without_gpu(backend)
    W, c, z0 = kit.dense_problem(250_000, 4, torch.float32)
    if method == "picard":
        args = ("tanh", 1.0, 1e-30, 6)
        out = kernel("fixed_point_dense", backend)(*kit.to_device("cuda", W, c, z0), *args)
        ref = fixed_point_dense_ref(W, c, z0, *args)
    else:
        args = ("tanh", 3, 1.0, 1e-4, 1e-30, 6)
        out = kernel("fixed_point_dense_anderson", backend)(*kit.to_device("cuda", W, c, z0), *args)
        ref = fixed_point_dense_anderson_ref(W, c, z0, *args)
    torch.cuda.synchronize()
    kit.assert_solve_matches(out, ref, torch.float32)
    assert bool((out[1] >= 1).all())  # every block ran: none left at the not-iterated 0


@pytest.mark.parametrize("d, path", [(60, "W in shared memory, 4-row tiles"), (300, "W in global memory, 4-row tiles")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=kit.dtype_id)
def test_cuda_picard_shared_memory_paths(d, path, dtype):
    """float32 d = 60: W (14 KB) fits next to the tile; d = 300: W (352 KB in float32) does not, the tile does."""
    skip_without_gpu("cuda")
    W, c, z0 = kit.dense_problem(9, d, dtype)
    args = ("softsign", 0.8, 1e-9 if dtype == torch.float64 else 1e-5, 300)
    out = kernel("fixed_point_dense", "cuda")(*kit.to_device("cuda", W, c, z0), *args)
    kit.assert_solve_matches(out, fixed_point_dense_ref(W, c, z0, *args), dtype)

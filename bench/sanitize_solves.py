"""Small solves of every GPU op, for compute-sanitizer (memcheck, racecheck, synccheck) on a GPU machine.

Each case runs one op on CUDA tensors at a size that reaches one of its launch paths, synchronises, and checks its
result against the reference, so that a sanitizer report can be traced to a path:
  - fixed_point_dense (CUDA Picard): d = 7 (4-row tiles, W in shared memory), d = 300 (4-row tiles, W read from
    global memory), d = 2500 (one-row tiles), forward and adjoint, float32, float64 and bfloat16, a batch that does not
    fill the last tile and a row with a NaN;
  - fixed_point_dense_anderson (CUDA), forward and adjoint; anderson_step through deqkern.solve; power_iteration;
  - with --triton, the same dense solves on the Triton backend, the dense Anderson at d = 33 (its register kernel)
    and d = 70 (its scratch kernel) (slow under the sanitizer: keep it for memcheck).
Exit status 1 if a result does not match (the sanitizer's own findings give it a non-zero status of its own).
--device cpu rehearses the script without a GPU: the same cases on the CPU backend (and Triton under
TRITON_INTERPRET=1).

    compute-sanitizer --tool memcheck --error-exitcode 2 python bench/sanitize_solves.py [--triton] [--small]
"""
import argparse
import sys

import torch

import deqkern
from deqkern.core.backends import kernel
from deqkern.reference import (
    fixed_point_dense_anderson_backward_ref,
    fixed_point_dense_anderson_ref,
    fixed_point_dense_backward_ref,
    fixed_point_dense_ref,
    power_iteration_ref,
)

DENSE_WIDTHS = (7, 300, 2500)
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 3e-2}


def problem(batch, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    W = 0.8 * a / torch.linalg.matrix_norm(a, ord=2)
    c = torch.randn(batch, d, dtype=torch.float64, generator=g)
    c[1, 0] = float("nan")  # a row that must not be iterated
    return W.to(dtype), c.to(dtype), torch.zeros(batch, d, dtype=dtype)


def close(out, ref, dtype):
    """z within TOLERANCE of the reference's (relative, over the finite rows) and the same not-iterated rows."""
    z, ref_z = out[0].cpu().double(), ref[0].double()
    rows = torch.isfinite(ref[2])
    same_flags = torch.equal(torch.isnan(out[2].cpu()), torch.isnan(ref[2]))
    error = ((z[rows] - ref_z[rows]).norm() / ref_z[rows].norm().clamp_min(1e-30)).item()
    return same_flags and error <= TOLERANCE[dtype], error


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense_cases(backend, widths):
    for d in widths if backend != "triton" else [w for w in widths if w <= 300]:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            W, c, z0 = problem(6, d, dtype)
            args = ("tanh", 1.0, 1e-5, 60)
            yield (f"{backend} fixed_point_dense d={d} {dtype}", "fixed_point_dense", (W, c, z0), args,
                   fixed_point_dense_ref)
            z = fixed_point_dense_ref(W, c, z0, *args)[0].nan_to_num()
            yield (f"{backend} fixed_point_dense_backward d={d} {dtype}", "fixed_point_dense_backward",
                   (W, c, z, torch.ones_like(z)), args, fixed_point_dense_backward_ref)
            yield (f"{backend} fixed_point_dense_backward d={d} {dtype} jacobian penalty", "fixed_point_dense_backward",
                   (W, c, z, torch.ones_like(z)), (*args, 0.5), fixed_point_dense_backward_ref)
    for d in (33, 300) if backend != "triton" else (33, 70):  # Triton: the register and the scratch kernel
        W, c, z0 = problem(5, d, torch.float32)
        args = ("tanh", 5, 1.0, 1e-6, 1e-5, 60)
        yield (f"{backend} fixed_point_dense_anderson d={d}", "fixed_point_dense_anderson", (W, c, z0), args,
               fixed_point_dense_anderson_ref)
        z = fixed_point_dense_anderson_ref(W, c, z0, *args)[0].nan_to_num()
        yield (f"{backend} fixed_point_dense_anderson_backward d={d}", "fixed_point_dense_anderson_backward",
               (W, c, z, torch.ones_like(z)), args, fixed_point_dense_anderson_backward_ref)
        yield (f"{backend} fixed_point_dense_anderson_backward d={d} jacobian penalty",
               "fixed_point_dense_anderson_backward", (W, c, z, torch.ones_like(z)), (*args, 0.5),
               fixed_point_dense_anderson_backward_ref)


def run_case(name, op, inputs, args, reference, backend, device):
    dtype = inputs[0].dtype
    out = kernel(op, backend)(*(t.to(device) for t in inputs), *args)
    synchronize(device)
    ok, error = close(out, reference(*inputs, *args), dtype)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: relative error {error:.2e}", flush=True)
    return ok


def other_ops(backend, device):
    """power_iteration (the raw op) and deqkern.solve (Anderson: one anderson_step per iteration)."""
    ok = True
    W = torch.randn(40, 30, dtype=torch.float64)
    u0 = torch.randn(3, 30, dtype=torch.float64)
    out = kernel("power_iteration", backend)(W.to(device), None, u0.to(device), "gram", 0.0, 200, 1e-10)
    synchronize(device)
    ref = power_iteration_ref(W, None, u0, "gram", 0.0, 200, 1e-10)
    good = torch.allclose(out[0].cpu(), ref[0], rtol=1e-6)
    print(f"{'ok  ' if good else 'FAIL'} {backend} power_iteration gram 40x30", flush=True)
    ok &= good
    W, c, z0 = problem(4, 64, torch.float32)
    c = c.nan_to_num().to(device)
    W = W.to(device)
    z, info = deqkern.solve(lambda z: torch.tanh(z @ W.T + c), z0.to(device), method="anderson", tol=1e-5, max_iter=80,
                            on_nonconvergence="ignore")
    synchronize(device)
    residual = ((torch.tanh(z @ W.T + c) - z).norm() / z.norm()).item()
    good = bool(info.converged.all()) and residual < 1e-4
    print(f"{'ok  ' if good else 'FAIL'} deqkern.solve anderson (anderson_step on {z.device}): residual "
          f"{residual:.1e}", flush=True)
    return ok and good


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton", action="store_true", help="also the Triton backend's dense solves")
    parser.add_argument("--small", action="store_true",
                        help="skip the one-row-tile width d = 2500 (for racecheck and synccheck, which are slow)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default), or cpu to rehearse without a GPU")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sanitize_solves.py needs a CUDA device (or --device cpu to rehearse)")
    compiled = device.type  # the compiled backend of the device: cuda, or cpu in a rehearsal
    backends = [compiled] + (["triton"] if args.triton else [])
    ok = True
    for backend in backends:
        for case in dense_cases(backend, DENSE_WIDTHS[:2] if args.small else DENSE_WIDTHS):
            ok &= run_case(*case, backend, device)
    ok &= other_ops(compiled, device)
    print("all results match" if ok else "SOME RESULTS DO NOT MATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

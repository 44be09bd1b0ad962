"""GPU readiness without a GPU: every Triton kernel compiled ahead of time for sm_90 at exactly the configurations its
launcher picks, and the CUDA extension's ptxas resource report, held to the limits of an H100/H200.

The launchers run for real on CPU tensors (no GPU is needed); their Triton launches are intercepted and compiled for
GPUTarget("cuda", 90, 32) with the Triton wheel's own ptxas, whose log gives registers, spills and stack; the
compiled kernel gives its shared memory. A size a launcher refuses with a clear error is recorded as refused (that is
its documented behaviour, not a crash on the GPU). The CUDA kernels' figures come from the `ptxas -v` lines of the
extension's build log (--cuda-log; CI builds with NVCC_APPEND_FLAGS="-Xptxas -v").

Fails (exit 1) when a kernel does not compile, needs more shared memory than an sm_90 block may have (232,448 bytes),
spills more than 64 bytes of registers per thread in a float32 or half kernel (smaller spills, and float64 ones, are
noted, not failed: see SPILL_BUDGET), or has a stack frame of 1 KB or more per thread, or when a dense solve allowed TF32
(torch.set_float32_matmul_precision("high")) has no tensor-core instruction in its PTX. Writes compile_check_sm90.md
and .csv to --out (default bench/results).

Run: python bench/compile_check.py [--cuda-log BUILD.log] [--sizes 1,16,...] [--kernels NAME,...] [--out DIR]
(deqkern must be importable; any torch build works, the Triton wheel brings ptxas. It uses Triton's launch-binding
internals, checked with Triton 3.8 and 3.9.)
"""
import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from harness import provenance, writers

SM90_MAX_SHARED = 232448          # bytes of shared memory one block may use on sm_90 (opt-in above 48 KB)
SM90_SHARED_PER_SM = 233472       # 228 KB per SM
SM90_REGISTERS_PER_SM = 65536
SM90_MAX_WARPS_PER_SM = 64
SM90_MAX_BLOCKS_PER_SM = 32
# ptxas trades a few spilled registers for occupancy on its own (it caps registers at 168 with 4 warps and 128 with 8,
# so that 3 or 2 blocks fit an SM), and how many depends on the Triton version: the same kernels spill 0 bytes with
# Triton 3.8 and 4-44 with 3.9. Kilobytes (the register-resident dense Anderson at d = 100: 5,676 bytes) mean that a
# design does not fit. Float32 / half kernels may spill at most this many bytes per thread.
SPILL_BUDGET = 64
# A per-thread stack frame is local memory the driver reserves for every thread the GPU can hold (1 KB x 2048
# threads x 132 SMs = 277 MB outside PyTorch's allocator): a kernel may not need that much.
MAX_STACK = 1024
SIZES = (1, 16, 64, 100, 256, 512, 1024, 2048, 4096)
TARGET = GPUTarget("cuda", 90, 32)


@dataclass
class Row:
    kernel: str
    config: str
    status: str                  # compiled / refused / error
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack: Optional[int] = None
    shared: Optional[int] = None
    warps: Optional[int] = None
    occupancy: Optional[float] = None
    tensor_core_ops: Optional[int] = None  # mma / wgmma instructions in the PTX (Triton kernels)
    problem: str = ""


# ---------------------------------------------------------------- intercepting and compiling Triton launches
@contextlib.contextmanager
def captured_launches(into: list):
    """Replaces Triton's launch by a record of (kernel, args, kwargs); an autotuner records each of its configs."""
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def record(self, *args, grid, warmup, **kwargs):
        into.append((self, args, kwargs))

    def record_configs(self, *args, **kwargs):
        for config in self.configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    JITFunction.run, Autotuner.run = record, record_configs
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run


_COMPILED = {}


def compile_sm90(kernel, args, kwargs):
    """(compiled kernel, ptxas log) of one launch, specialised as the real launch would be. Widths that specialise
    alike give the same kernel: it is compiled once (Triton's own cache would return it without a ptxas log)."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    key = repr((kernel.fn.__qualname__, signature, constexprs, attrs, sorted(options.__dict__.items())))
    if key not in _COMPILED:
        log = io.StringIO()
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                                      options=options.__dict__)
        _COMPILED[key] = compiled, log.getvalue()
    return _COMPILED[key]


PTXAS_USED = re.compile(r"Used (\d+) registers")
TENSOR_CORE_OP = re.compile(r"^\s*(?:wgmma\.mma_async|mma\.sync)\S*", re.MULTILINE)
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def occupancy(registers, warps, shared):
    """Resident warps / 64 on one sm_90 SM, from registers (allocated per warp in units of 256), shared memory and
    the block limits."""
    threads = 32 * warps
    per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256
    blocks = min(SM90_MAX_BLOCKS_PER_SM, SM90_MAX_WARPS_PER_SM // warps,
                 SM90_REGISTERS_PER_SM // (per_warp * warps) if per_warp * warps else SM90_MAX_BLOCKS_PER_SM,
                 SM90_SHARED_PER_SM // max(shared + 1024, 1) if shared else SM90_MAX_BLOCKS_PER_SM)
    return round(blocks * threads / 32 / SM90_MAX_WARPS_PER_SM, 3)


def triton_rows(name, config, call) -> List[Row]:
    """Runs a launcher (call) with launches captured, compiles each for sm_90, one row per compiled kernel."""
    launches = []
    try:
        with captured_launches(launches):
            call()
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        return [Row(name, config, "refused", problem=f"{type(exc).__name__}: {str(exc)[:150]}")]
    rows = []
    for kernel, args, kwargs in launches:
        warps = kwargs.get("num_warps", 4)
        label = f"{config}, {warps} warps"
        try:
            compiled, log = compile_sm90(kernel, args, kwargs)
        except Exception as exc:  # a compile error is the finding
            rows.append(Row(name, label, "error", problem=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
            continue
        used, spill = PTXAS_USED.search(log), PTXAS_SPILL.search(log)
        row = Row(name, label, "compiled", registers=int(used.group(1)) if used else None,
                  stack=int(spill.group(1)) if spill else None, spill_stores=int(spill.group(2)) if spill else None,
                  spill_loads=int(spill.group(3)) if spill else None, shared=int(compiled.metadata.shared),
                  warps=int(compiled.metadata.num_warps),
                  tensor_core_ops=len(TENSOR_CORE_OP.findall(compiled.asm.get("ptx", ""))))
        row.occupancy = occupancy(row.registers or 0, row.warps, row.shared)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the launchers at every size
def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def with_matmul_precision(precision, call):
    """call() with torch.set_float32_matmul_precision(precision) in force (the launchers read it: TF32 or not)."""
    def run():
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            return call()
        finally:
            torch.set_float32_matmul_precision(previous)
    return run


# The dense solves' data dtypes, each with PyTorch's float32 matmul precision: "highest" (exact products, the default)
# or "high" (TF32 tensor cores); half data is solved in float32, so TF32 applies to it too.
DENSE_VARIANTS = [(torch.float16, "highest"), (torch.bfloat16, "highest"), (torch.float32, "highest"),
                  (torch.float64, "highest"), (torch.float32, "high"), (torch.bfloat16, "high")]
# The variants whose adjoint is also compiled with the Jacobian penalty (PENALTY, a kernel of its own).
PENALTY_VARIANTS = [(torch.bfloat16, "highest"), (torch.float32, "highest"), (torch.float64, "highest")]


def triton_cases(sizes):
    from deqkern.triton_kernels import anderson_step, fixed_point_dense, fixed_point_dense_anderson, power_iteration

    batch = 4
    for d in sizes:
        for dtype, precision in DENSE_VARIANTS:
            W, c = torch.zeros(d, d, dtype=dtype), torch.zeros(batch, d, dtype=dtype)
            penalties = (0.0, 0.5) if (dtype, precision) in PENALTY_VARIANTS else (0.0,)
            for adjoint, penalty in [(False, 0.0)] + [(True, p) for p in penalties]:
                direction = ("adjoint, jacobian penalty" if penalty else "adjoint") if adjoint else "forward"
                tf32 = ", tf32" if precision != "highest" else ""
                config = f"d={d}, {dtype_name(dtype)}{tf32}, {direction}"
                grad_z = c if adjoint else None
                yield ("fixed_point_dense", config, with_matmul_precision(
                    precision, lambda W=W, c=c, g=grad_z, a=adjoint, p=penalty: fixed_point_dense.launch(
                        W, c, c, g, "tanh", 1.0, 1e-4, 10, adjoint=a, jacobian_penalty=p)))
                yield ("fixed_point_dense_anderson", config, with_matmul_precision(
                    precision, lambda W=W, c=c, g=grad_z, a=adjoint, p=penalty: fixed_point_dense_anderson.launch(
                        W, c, c, g, "tanh", 5, 1.0, 1e-4, 1e-4, 10, adjoint=a, jacobian_penalty=p)))
        for dtype in (torch.float32, torch.float64):
            W, c = torch.zeros(d, d, dtype=dtype), torch.zeros(batch, d, dtype=dtype)
            for mode in ("gram", "symmetric"):
                yield ("power_iteration", f"d={d}, {dtype_name(dtype)}, {mode}",
                       lambda W=W, c=c, mode=mode: power_iteration.launch(W, None, c, mode, 0.0, 10, 1e-6))
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            m = 5
            state = [torch.zeros(batch, m, d, dtype=dtype), torch.zeros(batch, m, d, dtype=dtype),
                     torch.zeros(batch, m, m, dtype=acc), torch.zeros(batch, d, dtype=dtype),
                     torch.zeros(batch, d, dtype=dtype), torch.zeros(batch, d, dtype=dtype),
                     torch.zeros(batch, d, dtype=dtype), torch.zeros(batch, dtype=acc), torch.zeros(batch, dtype=acc),
                     torch.ones(batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.int32)]
            yield ("anderson_step", f"n={d}, {dtype_name(dtype)}, m={m}",
                   lambda state=state: anderson_step.launch(*state, 3, 1.0, 1e-4, 1e-4))


# ---------------------------------------------------------------- the CUDA extension's ptxas report
CUDA_BLOCK_WARPS = 8
CUDA_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
CUDA_USED = re.compile(r"Used (\d+) registers.*?(?:, (\d+) bytes smem)?$")


def cuda_rows(log_path) -> List[Row]:
    import subprocess

    text = open(log_path, errors="replace").read().splitlines()
    rows, current = [], None
    for line in text:
        entry = CUDA_ENTRY.search(line)
        if entry:
            name = subprocess.run(["c++filt"], input=entry.group(1), capture_output=True, text=True).stdout.strip()
            name = re.sub(r"deqkern::\(anonymous namespace\)::|\(anonymous namespace\)::|deqkern::|^void ", "", name)
            name = re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", name)  # the argument list
            current = Row(name, entry.group(2), "compiled")
            rows.append(current)
            continue
        if current is None:
            continue
        spill = PTXAS_SPILL.search(line)
        if spill:
            current.stack, current.spill_stores, current.spill_loads = (int(g) for g in spill.groups())
        used = CUDA_USED.search(line.strip())
        if used and "registers" in line:
            current.registers = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.shared = int(smem.group(1)) if smem else 0
    for row in rows:  # every CUDA launcher uses blocks of 256 threads (the dense solve: up to 256, from d = 225 on)
        row.warps = CUDA_BLOCK_WARPS
        row.occupancy = occupancy(row.registers or 0, row.warps, row.shared or 0)
    return rows


# ---------------------------------------------------------------- the verdict
def is_float64(row: Row) -> bool:
    return "float64" in row.config or "<double" in row.kernel


def problems(row: Row) -> List[str]:
    """What fails the check: no compile, too much shared memory, a spill beyond SPILL_BUDGET in a float32 / half
    kernel (the dtypes run for speed; float64 is the checking precision), or a stack of MAX_STACK or more."""
    found = []
    if row.status == "error":
        found.append("does not compile")
    if row.shared is not None and row.shared > SM90_MAX_SHARED:
        found.append(f"needs {row.shared} bytes of shared memory (sm_90 allows {SM90_MAX_SHARED})")
    if (row.spill_stores or 0) > SPILL_BUDGET and not is_float64(row):
        found.append(f"spills {row.spill_stores} bytes of registers")
    if row.stack is not None and row.stack >= MAX_STACK:
        found.append(f"{row.stack} bytes of stack per thread (local memory reserved for every resident thread)")
    if row.status == "compiled" and "tf32" in row.config and not row.tensor_core_ops:
        found.append("TF32 was allowed but the PTX has no tensor-core (mma / wgmma) instruction")
    return found


def notes(row: Row) -> List[str]:
    """Spills that do not fail the check, listed so that they stay visible."""
    if not row.spill_stores or problems(row):
        return []
    why = "float64" if is_float64(row) else f"within the {SPILL_BUDGET}-byte budget"
    return [f"spills {row.spill_stores} bytes ({why}: not a failure)"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda-log", help="a build log of the CUDA extension with ptxas -v lines")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="widths d (comma-separated)")
    parser.add_argument("--kernels", default="", help="only these Triton kernels (comma-separated names)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    prov = provenance.collect(torch.device("cpu"), torch.get_num_threads())
    rows = []
    only = set(filter(None, args.kernels.split(",")))
    for name, config, call in triton_cases(sizes):
        if only and name not in only:
            continue
        rows += triton_rows(f"triton {name}", config, call)
        print(f"{name:28s} {config:40s} -> {rows[-1].status} {rows[-1].problem[:80]}", flush=True)
    if args.cuda_log:
        rows += cuda_rows(args.cuda_log)
    failures = [(row, p) for row in rows for p in problems(row)]
    for row in rows:
        row.problem = "; ".join(problems(row) + notes(row)) or row.problem
    head = ["kernel", "config", "status", "registers", "spill stores", "spill loads", "stack", "shared memory",
            "warps", "occupancy (sm_90)", "tensor-core ops", "problem"]
    table = writers.markdown_table(head, [[r.kernel, r.config, r.status, writers.fmt(r.registers),
                                           writers.fmt(r.spill_stores), writers.fmt(r.spill_loads), writers.fmt(r.stack),
                                           writers.fmt(r.shared), writers.fmt(r.warps), writers.fmt(r.occupancy),
                                           writers.fmt(r.tensor_core_ops), r.problem] for r in rows])
    summary = (f"{len(rows)} kernels or configurations: {sum(r.status == 'compiled' for r in rows)} compiled, "
               f"{sum(r.status == 'refused' for r in rows)} refused by their launcher with a clear error, "
               f"{len(failures)} problems.")
    blocks = ["What each launcher picks at each width, compiled for sm_90 (registers and spills from ptxas; shared "
              "memory in bytes; occupancy: resident warps / 64 per SM). CUDA rows: every instantiation of the "
              "extension, from its build's ptxas report, at 256 threads per block and with its static shared memory only "
              "(the dynamic part grows with d and is checked against the device's limit by the launcher).", summary, table]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "compile_check_sm90")
    header = prov.lines + [f"triton {triton.__version__} (its own ptxas), target {TARGET}", provenance.end_line()]
    writers.write_markdown(stem + ".md", "Compile check for sm_90 (H100 / H200), without a GPU", header, blocks)
    writers.write_csv(stem + ".csv", header, list(asdict(rows[0])), [asdict(r) for r in rows])
    print(summary)
    for row, problem in failures:
        print(f"PROBLEM: {row.kernel} [{row.config}]: {problem}")
    return 1 if failures else 0


if __name__ == "__main__":
    # Compiled, not interpreted: Triton reads TRITON_INTERPRET when deqkern.triton_kernels is imported (in
    # triton_cases). A fresh cache, so that nothing compiled by another run is reused without its ptxas log.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="deqkern-compile-check-")
    sys.exit(main())

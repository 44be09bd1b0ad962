"""bench/compile_check.py, the sm_90 compile check CI runs after the CUDA build: its rules fail what they must, the
ptxas report of the CUDA build is parsed, and a real launcher's kernel is compiled for sm_90 (no GPU needed)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deqkern import _extension
from deqkern.core.constants import TRITON_DENSE_ANDERSON_REGISTER_WIDTH

BENCH = Path(__file__).resolve().parents[1] / "bench"
if _extension.triton_available():
    sys.path.insert(0, str(BENCH))
    import compile_check  # noqa: E402  (changes no environment on import: its __main__ block does)
else:
    compile_check = None

needs_triton = pytest.mark.skipif(compile_check is None, reason="Triton is not installed")


@needs_triton
@pytest.mark.parametrize(
    "row, expected",
    [
        (dict(kernel="triton k", config="d=4, float32", status="error"), "does not compile"),
        (dict(kernel="triton k", config="d=4, float32", status="compiled", shared=232449), "shared memory"),
        (dict(kernel="triton k", config="d=4, float32", status="compiled", spill_stores=68), "spills 68 bytes"),
        (dict(kernel="triton k", config="n=4, bfloat16", status="compiled", spill_stores=5676), "spills 5676 bytes"),
        (dict(kernel="k<float>", config="sm_90", status="compiled", spill_stores=68), "spills 68 bytes"),
        (dict(kernel="k<double>", config="sm_90", status="compiled", stack=1024), "1024 bytes of stack"),
    ],
)
def test_the_rules_fail_what_cannot_run_well(row, expected):
    found = compile_check.problems(compile_check.Row(**row))
    assert len(found) == 1 and expected in found[0]


@needs_triton
def test_what_the_rules_let_through():
    Row = compile_check.Row
    assert compile_check.problems(Row("triton k", "d=4, float32", "compiled", shared=232448, stack=1016)) == []
    assert compile_check.problems(Row("triton k", "d=4", "refused")) == []
    float64_spill = Row("triton k", "d=4, float64", "compiled", spill_stores=560)
    assert compile_check.problems(float64_spill) == []
    assert compile_check.notes(float64_spill) == ["spills 560 bytes (float64: not a failure)"]
    small_spill = Row("triton k", "d=4, float32", "compiled", spill_stores=compile_check.SPILL_BUDGET)
    assert compile_check.problems(small_spill) == []
    assert compile_check.notes(small_spill) == ["spills 64 bytes (within the 64-byte budget: not a failure)"]


# What nvcc -Xptxas -v prints for one kernel (the real mangled name of anderson_kernel<float>).
MANGLED = ("_ZN7deqkern73_GLOBAL__N__c204749a_34_fixed_point_dense_anderson_cuda_cu_e6ffb44c_2434615anderson_kernelIfEEvN"
           "S0_11SolveParamsIT_EE")
PTXAS_LOG = f"""\
ptxas info    : Compiling entry function '{MANGLED}' for 'sm_90'
ptxas info    : Function properties for {MANGLED}
    2448 bytes stack frame, 80 bytes spill stores, 96 bytes spill loads
ptxas info    : Used 76 registers, used 1 barriers, 2448 bytes cumulative stack size, 5648 bytes smem
"""


@needs_triton
def test_the_cuda_build_log_is_parsed(tmp_path):
    log = tmp_path / "build.log"
    log.write_text(PTXAS_LOG)
    (row,) = compile_check.cuda_rows(str(log))
    assert row.kernel == "anderson_kernel<float>" and row.config == "sm_90"
    assert (row.registers, row.stack, row.spill_stores, row.spill_loads, row.shared) == (76, 2448, 80, 96, 5648)
    assert row.warps == 8 and 0 < row.occupancy <= 1
    assert len(compile_check.problems(row)) == 2  # the float spill and the stack


@needs_triton
def test_a_launcher_is_compiled_for_sm90_at_each_of_its_paths(tmp_path):
    """The real thing at its smallest: the dense Anderson launcher at d = 16 (the register kernel) and one past the
    widest register row (the scratch kernel), forward and adjoint (and the adjoint with the Jacobian penalty), in
    every dtype and precision variant: all compile, and tensor-core instructions appear exactly where TF32 was
    allowed. A subprocess, because the tests run Triton under the interpreter, which replaces the compiler."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    sizes = f"16,{TRITON_DENSE_ANDERSON_REGISTER_WIDTH + 1}"
    done = subprocess.run([sys.executable, str(BENCH / "compile_check.py"), "--sizes", sizes,
                           "--kernels", "fixed_point_dense_anderson", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(tmp_path / "compile_check_sm90.csv") as f:
        rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))]
    # widths x (directions x variants + the adjoint with the Jacobian penalty in its variants)
    assert len(rows) == 2 * (2 * len(compile_check.DENSE_VARIANTS) + len(compile_check.PENALTY_VARIANTS))
    assert sum("jacobian penalty" in r["config"] for r in rows) == 2 * len(compile_check.PENALTY_VARIANTS)
    assert all(r["status"] == "compiled" for r in rows)  # and none with a problem: the exit status above
    assert all(int(r["registers"]) > 0 and int(r["shared"]) >= 0 for r in rows)
    assert all((int(r["tensor_core_ops"]) > 0) == ("tf32" in r["config"]) for r in rows)
#!/usr/bin/env bash
# The one device call of issue 9: on a fresh H100/H200 (torch 2.11, triton 3.6, Python 3.12, no internet) it builds
# deqkern, runs the CUDA and Triton tests, runs compute-sanitizer (memcheck, racecheck, synccheck) on small solves of
# every op (bench/sanitize_solves.py) and the GPU benchmarks, within a budget of GPU_CHECK_SECONDS (default 450 s:
# every step has its own limit, cut to what is left, and a step with under 15 s left is skipped and says so). It
# writes $OUT/summary.txt, $OUT/gpu_check.tar.gz (every log and result table) and the benchmark tables as .md, and
# prints the summary last.
#
#   device: OUT is set there; torchdeq (pure Python) travels as a wheel in .whl/ (carry: [".whl"]):
#     python3 -m pip download --no-deps torchdeq==0.1.0 -d .whl   (here, once; .whl/ is git-ignored)
#     bash bench/gpu_check.sh
#   here, without a GPU: bash bench/gpu_check.sh --rehearse   (the script's logic on the CPU, not the GPU work: no
#     build (the checkout's own is imported), a Triton-interpreter subset of the tests, sanitize_solves.py with
#     --device cpu and no sanitizer, the benchmarks --quick on the CPU)
# Exit status: 0 when every step passed, 1 otherwise (a failed, stopped or skipped step).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
[ "${1:-}" = "--rehearse" ] && mode=rehearse
out=${OUT:-$(mktemp -d)}
work=$(mktemp -d)
budget=${GPU_CHECK_SECONDS:-450}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$SECONDS
mkdir -p "$out" "$work/results"
: >"$work/summary.txt"

note() { echo "$*" | tee -a "$work/summary.txt"; }

# step NAME LIMIT CMD...: CMD (a program, not a shell function: `timeout` runs it) under `timeout`, LIMIT cut to what
# is left of the budget, its output in NAME.log (the last 400 lines kept), one line in the summary with the log's last
# line. A step that fails or is stopped sets the script's exit status.
status=0
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  if [ "$left" -lt 15 ]; then
    note "$(printf '%-18s %-24s' "$name" "skipped: out of time")"
    status=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="STOPPED at its ${limit} s"; elif [ $rc -ne 0 ]; then verdict="FAILED (exit $rc)"; fi
  [ $rc -ne 0 ] && status=1
  tail -n 400 "$work/$name.log" >"$work/$name.tail" && mv "$work/$name.tail" "$work/$name.log"
  note "$(printf '%-18s %-24s %4d s  %s' "$name" "$verdict" $((SECONDS - t0)) "$(tail -n 1 "$work/$name.log" | cut -c1-110)")"
  return $rc
}

finish() {
  note "total $((SECONDS - start)) s of a ${budget} s budget; mode $mode; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  cp "$work"/results/*.md "$out"/ 2>/dev/null
  tar -czf "$out/gpu_check.tar.gz" -C "$work" .
  cp "$work/summary.txt" "$out/summary.txt"
  echo "=== gpu_check summary ($out) ==="
  cat "$work/summary.txt"
  exit $status
}
trap finish EXIT

# The GPU tests: the launch paths, the dense solves (both methods, half precision), anderson_step and power iteration.
gpu_tests="tests/test_gpu_launch_paths.py tests/test_fixed_point_dense.py tests/test_fixed_point_dense_anderson.py
  tests/test_half_precision.py tests/test_anderson_step.py tests/test_power_iteration.py"

if [ "$mode" = gpu ]; then
  sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  step environment 30 bash -c "nvidia-smi; ninja --version; $py -c 'import sys, torch, triton; print(sys.version); print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
  if ls .whl/*.whl >/dev/null 2>&1; then
    step wheels 60 "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  step build 240 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 DEQKERN_FORCE_CUDA=1 \
    "$py" -m pip install -v --no-build-isolation --no-deps --use-pep517 -e . || exit
  step import 30 "$py" -c "import deqkern._extension as e; assert e.CUDA_EXTENSION_BUILT; print('CUDA extension loaded')" || exit
  # The cheap, decisive checks first; the long test run and the slow sanitizers last.
  step memcheck 60 "$sanitizer" --tool memcheck --error-exitcode 2 "$py" bench/sanitize_solves.py
  step bench_dense 90 "$py" bench/bench_fixed_point_dense.py --device cuda --no-compile --min-time 0.3 --out "$work/results"
  step bench_per_iter 45 "$py" bench/bench_per_iteration.py --device cuda --min-time 0.2 --out "$work/results"
  step bench_anderson 45 "$py" bench/bench_anderson_step.py --device cuda --sizes 32x64 --min-time 0.3 --out "$work/results"
  xdist=$("$py" -c "import xdist" 2>/dev/null && echo "-n 8")
  step tests 120 "$py" -m pytest -q -p no:cacheprovider $xdist -k "cuda or triton" --junitxml "$work/results/tests.xml" $gpu_tests
  step memcheck_triton 45 "$sanitizer" --tool memcheck --error-exitcode 2 "$py" bench/sanitize_solves.py --triton --small
  # racecheck and synccheck see shared-memory hazards and barrier misuse (the CUDA kernels); the Triton scratch
  # kernels hand data between threads through global memory, which no sanitizer tool checks.
  step racecheck 40 "$sanitizer" --tool racecheck --error-exitcode 2 "$py" bench/sanitize_solves.py --small
  step synccheck 30 "$sanitizer" --tool synccheck --error-exitcode 2 "$py" bench/sanitize_solves.py --small
  step bench_multiscale 45 "$py" bench/bench_multiscale.py --device cuda --min-time 0.3 --out "$work/results"
  # issue 20: eager against torch.compile and mode="reduce-overhead" (CUDA graphs), host synchronisations counted
  step bench_compiled 120 "$py" bench/bench_compiled.py --device cuda --graph-case --min-time 0.3 --out "$work/results"
else
  py=${PYTHON:-.venv/bin/python}
  export TRITON_INTERPRET=1
  step environment 30 "$py" -c "import sys, torch, triton; print(sys.version); print(torch.__version__, triton.__version__, 'no GPU: rehearsal')"
  step import 30 "$py" -c "import deqkern, torch; print('deqkern', deqkern.__file__, 'CPU ops', hasattr(torch.ops.deqkern, 'fixed_point_dense'))" || exit
  step memcheck 150 "$py" bench/sanitize_solves.py --device cpu --small
  step bench_dense 120 "$py" bench/bench_fixed_point_dense.py --quick --no-compile --out "$work/results"
  step bench_per_iter 60 "$py" bench/bench_per_iteration.py --quick --out "$work/results"
  step bench_anderson 90 "$py" bench/bench_anderson_step.py --quick --out "$work/results"
  step tests 150 "$py" -m pytest -q -p no:cacheprovider -k "triton and (B3-D5 or B6-D70)" --junitxml "$work/results/tests.xml" tests/test_half_precision.py
  step memcheck_triton 240 "$py" bench/sanitize_solves.py --device cpu --triton --small
  step bench_multiscale 60 "$py" bench/bench_multiscale.py --quick --out "$work/results"
  step bench_compiled 240 "$py" bench/bench_compiled.py --quick --graph-case --out "$work/results"
fi

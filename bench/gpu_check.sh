#!/usr/bin/env bash
# One prepared run for a short GPU session: the GPU image has torch, nvcc,
# cmake, ninja, pybind11, scikit-build-core, pytest and pytest-timeout
# installed, and no package index. In order:
#   1. builds the CUDA extension for sm_90 only against the installed torch
#      (pip --no-index --no-build-isolation; torch < 2.14 builds as C++17,
#      torch >= 2.14 as C++20, see CMakeLists.txt),
#   2. runs the CUDA tests (tests/test_cuda*.py and the CUDA samples of
#      tests/test_op_samples.py) with a per-test timeout,
#   3. runs bench/bench_cuda.py, which prints the side-by-side table and
#      writes it to bench/results/ and to $OUT.
# The benchmark runs even when tests fail (its numbers are still worth
# having); the exit status is non-zero if any step failed. The steps share a
# budget of DEADLINE seconds (default 480, so that the run with its start-up
# stays under 9 minutes), each with its own cap; every step is
# interrupted with SIGINT, so pytest still writes its junit XML and summary.
# Everything printed also goes to $OUT/gpu_check.log.
#
#   PYTHON    interpreter with torch (default: python3)
#   OUT       folder for the log, junit XML and benchmark table
#             (default: bench/results)
#   DEADLINE  seconds for the whole run (default 480)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
start=$SECONDS
deadline=${DEADLINE:-480}
python=${PYTHON:-python3}
out_dir=${OUT:-bench/results}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
log="$out_dir/gpu_check.log"
exec > >(tee -a "$log") 2>&1
tee_pid=$!
status=0
summary=()

# Seconds a step may take: its cap, but never past the deadline minus what
# the later steps are promised.
budget() {
  local cap=$1 reserve=$2
  local left=$((deadline - (SECONDS - start) - reserve))
  if ((left < cap)); then cap=$left; fi
  if ((cap < 10)); then cap=10; fi
  echo "$cap"
}

# step NAME CAP RESERVE COMMAND...: runs COMMAND under `timeout -s INT`
# (KILL 20 s later if it ignores that) and records its status and time.
step() {
  local name=$1 cap
  cap=$(budget "$2" "$3")
  shift 3
  local step_start=$SECONDS
  echo "== $name (limit ${cap} s, at $((SECONDS - start)) s)"
  timeout -s INT -k 20 "$cap" "$@"
  local result=$?
  if ((result == 124)); then echo "gpu_check: $name ran past its ${cap} s limit"; fi
  summary+=("$(printf '%-10s status %3d  %4d s' "$name" "$result" $((SECONDS - step_start)))")
  return "$result"
}

finish() {
  echo "== gpu_check finished in $((SECONDS - start)) s, status $status"
  printf '%s\n' "${summary[@]}" | tee "$out_dir/summary.txt"
  # Let tee write the last lines into the log before the script ends.
  exec >&- 2>&-
  wait "$tee_pid"
  exit "$status"
}

echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), results in $out_dir"
# nvcc may live in the toolkit folder without being on PATH.
if ! command -v nvcc >/dev/null; then
  for toolkit in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0; do
    if [[ -n "$toolkit" && -x "$toolkit/bin/nvcc" ]]; then
      export PATH="$toolkit/bin:$PATH"
      break
    fi
  done
fi
if ! command -v nvcc >/dev/null; then
  echo "gpu_check: no nvcc on PATH, in \$CUDA_HOME or /usr/local/cuda" >&2
  status=1
  finish
fi
export CUDACXX
CUDACXX=$(command -v nvcc)
# cmake and ninja may be pip-installed next to the interpreter.
python_bin=$(dirname "$(command -v "$python")")
export PATH="$python_bin:$PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
echo "nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') at $CUDACXX;" \
  "$(cmake --version 2>/dev/null | head -n 1); ninja $(ninja --version 2>/dev/null)"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0))" \
  || { status=1; finish; }
timeout_option=()
if "$python" -c "import pytest_timeout" 2>/dev/null; then
  timeout_option=(--timeout=60)
else
  echo "gpu_check: pytest-timeout missing, tests run without a per-test limit"
fi

# Build: no index (nothing can be fetched), no isolation (build against the
# torch that runs the tests), one arch.
export CMAKE_BUILD_PARALLEL_LEVEL
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
if ! step build 240 250 \
    "$python" -m pip install --no-index --no-build-isolation --no-deps . \
    -C cmake.define.LOWRANK_CUDA=ON -C cmake.define.LOWRANK_CUDA_ARCHS=90 \
    -C build-dir=build/gpu-check; then
  echo "gpu_check: build failed" >&2
  status=1
  finish
fi
(cd "$out_dir" && "$python" -c "import lowrank_ext; print(lowrank_ext.build_info())")

step tests 210 120 "$python" -m pytest tests/test_cuda.py tests/test_cuda_multi_lora.py \
  tests/test_op_samples.py -k cuda -q -p no:cacheprovider -rfE --maxfail=50 "${timeout_option[@]}" \
  --junitxml="$out_dir/test_cuda.xml" || status=1

step bench 150 0 "$python" bench/bench_cuda.py || status=1
finish

#!/usr/bin/env bash
# One prepared run for a short GPU session (an H200, sm_90, with torch, nvcc,
# cmake, ninja, pybind11, scikit-build-core and pytest installed; no network):
#   1. builds the CUDA extension for sm_90 only against the installed torch,
#   2. runs the CUDA tests (tests/test_cuda*.py),
#   3. runs bench/bench_cuda.py, which prints the side-by-side table and
#      writes it to bench/results/ and to $OUT when set.
# The benchmark runs even when tests fail (its numbers are still worth
# having); the exit status is non-zero if any step failed. Each step has a
# time limit so the whole run stays well under 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
status=0
log_dir=${OUT:-bench/results}
mkdir -p "$log_dir"

echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0))"

echo "== build (LOWRANK_CUDA=ON, arch 90)"
if ! CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout 240 python -m pip install --quiet \
    --no-build-isolation --no-deps . -C cmake.define.LOWRANK_CUDA=ON \
    -C cmake.define.LOWRANK_CUDA_ARCHS=90 -C build-dir=build/gpu-check; then
  echo "gpu_check: build failed" >&2
  exit 1
fi
echo "   build done at $((SECONDS - start)) s"
python -c "import lowrank_ext; print(lowrank_ext.build_info())"

echo "== CUDA tests"
timeout 200 python -m pytest tests/test_cuda.py tests/test_cuda_multi_lora.py -q -p no:cacheprovider --maxfail=25 \
  --junitxml="$log_dir/test_cuda.xml" || status=1
echo "   tests done at $((SECONDS - start)) s"

echo "== bench/bench_cuda.py"
timeout 120 python bench/bench_cuda.py || status=1
echo "== gpu_check finished in $((SECONDS - start)) s, status $status"
exit $status

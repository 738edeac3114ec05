// Baseline-compiled on purpose: nothing here may use AVX instructions.
#include "cpu/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "cpu/isa_tables.h"

namespace lowrank {
namespace cpu {
namespace {

std::atomic<int> g_active{-1};
std::once_flag g_init_flag;

void initialize_from_environment() {
  const char* requested = std::getenv("LOWRANK_CPU_ISA");
  if (requested == nullptr || *requested == '\0') {
    g_active.store(static_cast<int>(best_supported_isa()));
    return;
  }
  Isa isa;
  try {
    isa = parse_isa(requested);
  } catch (const std::invalid_argument& error) {
    throw std::runtime_error(std::string("LOWRANK_CPU_ISA: ") + error.what());
  }
  if (!isa_supported(isa)) {
    throw std::runtime_error(std::string("LOWRANK_CPU_ISA=") + requested +
                             " but this CPU does not support it (best available: " +
                             isa_name(best_supported_isa()) + ")");
  }
  g_active.store(static_cast<int>(isa));
}

void check_supported(Isa isa) {
  if (!isa_supported(isa)) {
    throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) +
                                " kernels (best available: " + isa_name(best_supported_isa()) + ")");
  }
}

// The table of `isa`, every family's part from its <family>_<isa>.cpp. Call
// only once isa_supported(isa): this runs code of the ISA's files.
CpuKernels build_table(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case Isa::Avx512: {
      CpuKernels table{Isa::Avx512, nf4_avx512_kernels(), dropout_avx512_kernels(),
                       multi_lora_avx512_kernels()};
      // The one entry that needs a feature beyond the table's ISA.
      if (bf16_dot_product_supported()) table.nf4.gemv_bf16 = nf4_gemv_avx512bf16;
      return table;
    }
    case Isa::Avx2:
      return CpuKernels{Isa::Avx2, nf4_avx2_kernels(), dropout_avx2_kernels(),
                        multi_lora_avx2_kernels()};
    case Isa::Scalar:
      break;
  }
#endif
  return CpuKernels{Isa::Scalar, nf4_scalar_kernels(), dropout_scalar_kernels(),
                    multi_lora_scalar_kernels()};
}

// kernels_for() without the check, for an ISA already checked (active_isa()
// is). Each table is built once, on first use (thread-safe statics).
const CpuKernels& table_for(Isa isa) {
  switch (isa) {
    case Isa::Avx512: {
      static const CpuKernels table = build_table(Isa::Avx512);
      return table;
    }
    case Isa::Avx2: {
      static const CpuKernels table = build_table(Isa::Avx2);
      return table;
    }
    case Isa::Scalar:
      break;
  }
  static const CpuKernels table = build_table(Isa::Scalar);
  return table;
}

}  // namespace

bool isa_supported(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case Isa::Scalar:
      return true;
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::Avx512:
      return isa_supported(Isa::Avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == Isa::Scalar;
#endif
}

bool bf16_dot_product_supported() {
#if defined(__x86_64__) || defined(__i386__)
  return isa_supported(Isa::Avx512) && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

Isa best_supported_isa() {
  if (isa_supported(Isa::Avx512)) return Isa::Avx512;
  if (isa_supported(Isa::Avx2)) return Isa::Avx2;
  return Isa::Scalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return "scalar";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
  }
  return "unknown";
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512") return Isa::Avx512;
  throw std::invalid_argument("unknown CPU ISA '" + name + "'; expected scalar, avx2 or avx512");
}

Isa active_isa() {
  std::call_once(g_init_flag, initialize_from_environment);
  return static_cast<Isa>(g_active.load());
}

void set_active_isa(Isa isa) {
  check_supported(isa);
  std::call_once(g_init_flag, [] {});
  g_active.store(static_cast<int>(isa));
}

const CpuKernels& kernels_for(Isa isa) {
  check_supported(isa);
  return table_for(isa);
}

const CpuKernels& active_kernels() { return table_for(active_isa()); }

}  // namespace cpu
}  // namespace lowrank

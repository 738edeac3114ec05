// The one chooser of the CPU kernel table (kernels.h): the ISA is picked
// once, from the CPU's features (baseline code, __builtin_cpu_supports),
// unless LOWRANK_CPU_ISA=scalar|avx2|avx512 or set_active_isa() says
// otherwise, and every op, test and benchmark gets its kernels here.
#pragma once

#include <string>

#include "cpu/kernels.h"

namespace lowrank {
namespace cpu {

bool isa_supported(Isa isa);
// Whether this CPU has AVX512-BF16 (on top of the AVX-512 table's features).
bool bf16_dot_product_supported();
Isa best_supported_isa();
const char* isa_name(Isa isa);
// Parses "scalar" / "avx2" / "avx512"; throws std::invalid_argument otherwise.
Isa parse_isa(const std::string& name);

// The ISA every op uses now. Throws std::runtime_error when LOWRANK_CPU_ISA
// names an unknown or unsupported ISA.
Isa active_isa();
// Throws std::invalid_argument when this CPU cannot run `isa`.
void set_active_isa(Isa isa);
// The table of active_isa().
const CpuKernels& active_kernels();
// The table of `isa`, built on first use; its gemv_bf16 is set only where
// bf16_dot_product_supported(). Throws std::invalid_argument when this CPU
// cannot run `isa` (off x86, only the scalar table exists), so no
// ISA-flagged code is reached without the runtime check.
const CpuKernels& kernels_for(Isa isa);

}  // namespace cpu
}  // namespace lowrank

// Chooses the CPU kernel table once, from the CPU's features (baseline code,
// __builtin_cpu_supports), unless LOWRANK_CPU_ISA=scalar|avx2|avx512 or
// set_active_isa() says otherwise.
#pragma once

#include <string>

#include "cpu/kernels.h"

namespace lowrank {
namespace cpu {

bool isa_supported(Isa isa);
Isa best_supported_isa();
const char* isa_name(Isa isa);
// Parses "scalar" / "avx2" / "avx512"; throws std::invalid_argument otherwise.
Isa parse_isa(const std::string& name);

// The ISA every op uses now. Throws std::runtime_error when LOWRANK_CPU_ISA
// names an unknown or unsupported ISA.
Isa active_isa();
// Throws std::invalid_argument when this CPU cannot run `isa`.
void set_active_isa(Isa isa);
const CpuKernels& active_kernels();
const CpuKernels& kernels_for(Isa isa);

}  // namespace cpu
}  // namespace lowrank

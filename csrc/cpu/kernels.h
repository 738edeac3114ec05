// The CPU kernel table: one CpuKernels per ISA, holding the entries of every
// kernel family (NF4, dropout, multi-LoRA) compiled for that ISA. Each family
// part is filled by the family's translation unit for that ISA,
// csrc/cpu/<family>_<isa>.cpp (see isa_tables.h), and dispatch.cpp's
// kernels_for() / active_kernels() is the one chooser: the only code that
// reaches an ISA-flagged unit, and only after the runtime CPU check.
//
// Torch-free, raw pointers only. Headers included by ISA-flagged files keep
// their helpers `static` (or constexpr), so every ISA translation unit gets
// a private copy and no out-of-line copy built with AVX-512 flags can be
// shared with baseline code.
#pragma once

#include "core/types.h"
#include "cpu/dropout_kernels.h"
#include "cpu/multi_lora_kernels.h"
#include "cpu/nf4_kernels.h"

namespace lowrank {
namespace cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// Defined once in core/types.h; lowrank::cpu::Dtype and
// lowrank::cpu::BlockScales name them here.
using ::lowrank::BlockScales;
using ::lowrank::Dtype;

struct CpuKernels {
  Isa isa;
  Nf4Kernels nf4;
  DropoutKernels dropout;
  MultiLoraKernels multi_lora;
};

}  // namespace cpu
}  // namespace lowrank

// The per-ISA parts of the CPU kernel table (kernels.h): each
// `<family>_<isa>_kernels()` is defined in csrc/cpu/<family>_<isa>.cpp and
// returns that family's entries compiled for that ISA. Only dispatch.cpp
// calls these, and those of an ISA-flagged file only once the runtime CPU
// check has passed: even building such a table may run instructions of its
// ISA. Everything else reaches the kernels through kernels_for() or
// active_kernels() (dispatch.h).
#pragma once

#include <cstdint>

#include "cpu/kernels.h"

namespace lowrank {
namespace cpu {

Nf4Kernels nf4_scalar_kernels();
Nf4Kernels nf4_avx2_kernels();
Nf4Kernels nf4_avx512_kernels();  // gemv_bf16 null: dispatch.cpp adds it

// Nf4Kernels::gemv_bf16 of the AVX-512 table on CPUs with AVX512-BF16
// (nf4_avx512bf16.cpp).
void nf4_gemv_avx512bf16(const GemvBf16Input& input, const std::uint8_t* packed,
                         const BlockScales& scales, std::int64_t out_features,
                         std::int64_t in_features, std::int64_t blocksize, const float* bias,
                         std::int64_t out_begin, std::int64_t out_end, void* out,
                         Dtype out_dtype);

DropoutKernels dropout_scalar_kernels();
DropoutKernels dropout_avx2_kernels();
DropoutKernels dropout_avx512_kernels();

MultiLoraKernels multi_lora_scalar_kernels();
MultiLoraKernels multi_lora_avx2_kernels();
MultiLoraKernels multi_lora_avx512_kernels();

}  // namespace cpu
}  // namespace lowrank

// Types shared by the torch-free kernel interfaces (cpu/*_kernels.h, and the
// CUDA one, whose BlockScales holds device pointers): the element type of a
// buffer and an NF4 tensor's per-block scales.
#pragma once

#include <cstdint>

namespace lowrank {

// Element type of an activation / output buffer.
enum class Dtype : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// Per-block NF4 scales: plain fp32 absmax, or double-quantized (8-bit codes
// into `nested_code`, one fp32 scale per 256 blocks, plus `offset`), each
// block's scale nested_code[code] * nested_absmax[block / 256] + offset with
// every step rounded in fp32.
struct BlockScales {
  const float* absmax = nullptr;
  const std::uint8_t* nested_codes = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.0f;
};

}  // namespace lowrank

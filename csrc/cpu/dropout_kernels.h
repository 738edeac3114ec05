// Torch-free dropout kernels with a counter-based random mask.
//
// Element i is kept iff hash(seed, i) >= threshold (threshold = p * 2^32),
// so the mask is a pure function of (seed, i): the backward pass regenerates
// it instead of storing it, every ISA and thread count gives the same mask,
// and no generator state is touched. Kept elements are x * scale
// (scale = 1 / (1 - p)) computed in fp32 and rounded once to the dtype.
#pragma once

#include <cstdint>

#include "core/types.h"

namespace lowrank {
namespace cpu {

// The mixing function (murmur3's 32-bit finalizer over an index/seed blend),
// shared by every ISA file. `index_high` is the index's upper 32 bits, which
// callers keep constant over one kernel call.
static inline std::uint32_t dropout_hash(std::uint32_t index_low, std::uint32_t index_high,
                                         std::uint64_t seed) {
  std::uint32_t x = index_low * 0x9e3779b1u + static_cast<std::uint32_t>(seed);
  x ^= static_cast<std::uint32_t>(seed >> 32) ^ (index_high * 0x85ebca77u);
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

// The dropout part of the CPU kernel table (kernels.h), one per ISA, filled
// by dropout_scalar.cpp, dropout_avx2.cpp and dropout_avx512.cpp.
struct DropoutKernels {
  // out[i] = keep(i) ? input[i] * scale : 0 for i in [begin, end); the range
  // must not cross a multiple of 2^32 (the glue splits it).
  void (*apply)(const void* input, void* out, Dtype dtype, std::int64_t begin, std::int64_t end,
                std::uint64_t seed, std::uint32_t threshold, float scale);
};

}  // namespace cpu
}  // namespace lowrank

// The dropout kernel written once over an ISA's 32-bit integer and float
// lane operations (`Simd`) and used by dropout_scalar.cpp, dropout_avx2.cpp
// and dropout_avx512.cpp. Include only from those files: everything here is
// in an anonymous namespace, so each ISA's translation unit compiles its own
// copy with its own flags (see kernels.h).
//
// Simd provides: `Vec` (fp32 lanes), `Ints` (uint32 lanes), `kLanes`;
// `ints(value)` (broadcast), `lane_indices(first)` (first, first + 1, ...),
// `add`, `mullo`, `xor_bits`, `shift_right<N>` on Ints; `set1`, `load(input,
// dtype, index)`, `store(out, dtype, index, v)` on Vec; and
// `keep_scaled(hash, threshold, values, scale)`: values * scale where
// hash >= threshold (unsigned), 0 elsewhere.
#pragma once

#include <cstdint>

#include "cpu/dropout_kernels.h"
#include "cpu/scalar_tail.h"

namespace lowrank {
namespace cpu {
namespace {

// dropout_hash on every lane: the same 32-bit integer arithmetic, so every
// table's mask equals the scalar one.
template <class Simd>
typename Simd::Ints dropout_hash_lanes(typename Simd::Ints index_low,
                                       typename Simd::Ints seed_low,
                                       typename Simd::Ints mixed_high) {
  auto x = Simd::add(Simd::mullo(index_low, Simd::ints(0x9e3779b1u)), seed_low);
  x = Simd::xor_bits(x, mixed_high);
  x = Simd::xor_bits(x, Simd::template shift_right<16>(x));
  x = Simd::mullo(x, Simd::ints(0x85ebca6bu));
  x = Simd::xor_bits(x, Simd::template shift_right<13>(x));
  x = Simd::mullo(x, Simd::ints(0xc2b2ae35u));
  return Simd::xor_bits(x, Simd::template shift_right<16>(x));
}

template <class Simd>
void dropout_apply(const void* input, void* out, Dtype dtype, std::int64_t begin,
                   std::int64_t end, std::uint64_t seed, std::uint32_t threshold, float scale) {
  const auto index_high = static_cast<std::uint32_t>(begin >> 32);
  const auto seed_low = Simd::ints(static_cast<std::uint32_t>(seed));
  const auto mixed_high =
      Simd::ints(static_cast<std::uint32_t>(seed >> 32) ^ (index_high * 0x85ebca77u));
  const auto scale_lanes = Simd::set1(scale);
  std::int64_t i = begin;
  for (; i + Simd::kLanes <= end; i += Simd::kLanes) {
    const auto hash = dropout_hash_lanes<Simd>(
        Simd::lane_indices(static_cast<std::uint32_t>(i)), seed_low, mixed_high);
    Simd::store(out, dtype, i,
                Simd::keep_scaled(hash, threshold, Simd::load(input, dtype, i), scale_lanes));
  }
  for (; i < end; ++i) {
    bool keep = dropout_hash(static_cast<std::uint32_t>(i), index_high, seed) >= threshold;
    tail::store_float(out, dtype, i, keep ? tail::load_float(input, dtype, i) * scale : 0.0f);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace lowrank

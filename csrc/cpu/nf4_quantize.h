// NF4 quantization, written once over an ISA's operations on 16 elements
// (`Simd`) and used by nf4_scalar.cpp, nf4_avx2.cpp and nf4_avx512.cpp.
// Include only from those files: everything here is in an anonymous
// namespace, so each ISA's translation unit compiles its own copy with its
// own flags (see kernels.h).
//
// Simd provides, for 16 consecutive elements from `index` on:
// `magnitude_max(state, input, dtype, index)` (folds the fp32 bit patterns
// of their magnitudes into `state`, a `MaxState` from `max_start()`),
// `max_finish(state)` (the largest pattern folded in), and
// `encode16(input, dtype, index, factor, full_block, out)` (scales them as
// tail::scale_value does, encodes them as nf4::encode does and writes their
// 8 packed bytes). Everything else (block bounds, absmax rules, the partial
// tail) is the scalar code of scalar_tail.h, so all tables give the same bits.
#pragma once

#include <cstdint>

#include "core/float_convert.h"
#include "core/nf4.h"
#include "cpu/nf4_kernels.h"
#include "cpu/scalar_tail.h"

namespace lowrank {
namespace cpu {
namespace {

constexpr std::int64_t kQuantizeStep = 16;

template <class Simd>
bool nf4_quantize(const void* input, Dtype dtype, std::int64_t numel, std::int64_t blocksize,
                  std::int64_t block_begin, std::int64_t block_end, std::uint8_t* packed,
                  float* absmax) {
  bool finite = true;
  for (std::int64_t block = block_begin; block < block_end; ++block) {
    const std::int64_t begin = block * blocksize;
    const std::int64_t end = begin + blocksize < numel ? begin + blocksize : numel;
    const bool full_block = end - begin == blocksize;
    const std::int64_t vector_end = begin + (end - begin) / kQuantizeStep * kQuantizeStep;

    // Max over the magnitude bit patterns: ordered like the magnitudes, and
    // any Inf/NaN lands at or above the Inf pattern.
    typename Simd::MaxState state = Simd::max_start();
    for (std::int64_t i = begin; i < vector_end; i += kQuantizeStep) {
      Simd::magnitude_max(state, input, dtype, i);
    }
    std::uint32_t block_bits = Simd::max_finish(state);
    for (std::int64_t i = vector_end; i < end; ++i) {
      const std::uint32_t bits = float_bits(tail::load_float(input, dtype, i)) & 0x7fffffffu;
      block_bits = bits > block_bits ? bits : block_bits;
    }
    finite &= block_bits < 0x7f800000u;
    const float block_absmax = bits_float(block_bits);
    // A partial last block stores its clamped absmax (the format's rule).
    absmax[block] =
        full_block || block_absmax >= nf4::kAbsmaxFloor ? block_absmax : nf4::kAbsmaxFloor;

    const float factor = tail::block_factor(block_absmax, full_block);
    for (std::int64_t i = begin; i < vector_end; i += kQuantizeStep) {
      Simd::encode16(input, dtype, i, factor, full_block, packed + i / 2);
    }
    tail::encode_range(input, dtype, vector_end, end, factor, full_block, packed);
  }
  return finite;
}

}  // namespace
}  // namespace cpu
}  // namespace lowrank

// Scalar building blocks shared by the reference kernels and by the scalar
// tails after every SIMD loop. All functions are `static inline` so each ISA
// translation unit keeps a private copy (see kernels.h).
#pragma once

#include <cstdint>
#include <type_traits>

#include "core/float_convert.h"
#include "core/nf4.h"
#include "cpu/kernels.h"

namespace lowrank {
namespace cpu {
namespace tail {

static inline float load_float(const void* data, Dtype dtype, std::int64_t index) {
  switch (dtype) {
    case Dtype::Float32:
      return static_cast<const float*>(data)[index];
    case Dtype::BFloat16:
      return bf16_to_float(static_cast<const std::uint16_t*>(data)[index]);
    case Dtype::Float16:
      return fp16_to_float(static_cast<const std::uint16_t*>(data)[index]);
  }
  return 0.0f;
}

static inline void store_float(void* data, Dtype dtype, std::int64_t index, float value) {
  switch (dtype) {
    case Dtype::Float32:
      static_cast<float*>(data)[index] = value;
      return;
    case Dtype::BFloat16:
      static_cast<std::uint16_t*>(data)[index] = float_to_bf16(value);
      return;
    case Dtype::Float16:
      static_cast<std::uint16_t*>(data)[index] = float_to_fp16(value);
      return;
  }
}

// Scales one value into [-1, 1] the way the format prescribes: full blocks
// multiply by the reciprocal of the clamped absmax, a partial last block
// divides by it.
static inline float scale_value(float value, float factor, bool full_block) {
  return nf4::clamp_unit(full_block ? value * factor : value / factor);
}

// Encodes elements [begin, end) (begin even) of a block whose scale factor is
// `factor` (1/absmax for a full block, absmax for a partial one) and writes
// their packed bytes. An odd final element gets the zero code as partner.
static inline void encode_range(const void* input, Dtype dtype, std::int64_t begin,
                                std::int64_t end, float factor, bool full_block,
                                std::uint8_t* packed) {
  for (std::int64_t i = begin; i < end; i += 2) {
    std::uint8_t high = nf4::encode(scale_value(load_float(input, dtype, i), factor, full_block));
    std::uint8_t low = i + 1 < end
                           ? nf4::encode(scale_value(load_float(input, dtype, i + 1), factor, full_block))
                           : nf4::kZeroCode;
    packed[i / 2] = static_cast<std::uint8_t>((high << 4) | low);
  }
}

// Scale factor for encode_range given a block's absmax.
static inline float block_factor(float absmax, bool full_block) {
  float clamped = absmax < nf4::kAbsmaxFloor ? nf4::kAbsmaxFloor : absmax;
  return full_block ? 1.0f / clamped : clamped;
}

// Quantizes one whole block [begin, end). Returns false on NaN/Inf.
static inline bool quantize_block(const void* input, Dtype dtype, std::int64_t numel,
                                  std::int64_t begin, std::int64_t end, bool full_block,
                                  std::uint8_t* packed, float* absmax_out) {
  (void)numel;
  // Max over the magnitude bit patterns: ordered like the magnitudes, and any
  // Inf/NaN lands at or above the Inf pattern.
  std::uint32_t max_bits = 0;
  for (std::int64_t i = begin; i < end; ++i) {
    std::uint32_t bits = float_bits(load_float(input, dtype, i)) & 0x7fffffffu;
    max_bits = bits > max_bits ? bits : max_bits;
  }
  float absmax = bits_float(max_bits);
  // A partial last block stores its clamped absmax (the format's rule).
  *absmax_out = full_block || absmax >= nf4::kAbsmaxFloor ? absmax : nf4::kAbsmaxFloor;
  encode_range(input, dtype, begin, end, block_factor(absmax, full_block), full_block, packed);
  return max_bits < 0x7f800000u;
}

// Dequantizes elements [begin, end) (begin even) of a block with scale `absmax`.
static inline void dequantize_range(const std::uint8_t* packed, float absmax, std::int64_t begin,
                                    std::int64_t end, void* out, Dtype dtype) {
  for (std::int64_t i = begin; i < end; ++i) {
    std::uint8_t byte = packed[i / 2];
    std::uint8_t code = (i & 1) ? (byte & 0x0f) : (byte >> 4);
    store_float(out, dtype, i, nf4::kCodebook[code] * absmax);
  }
}

// NF4 code of flat element `index`: the high nibble of its byte for even
// indices, the low nibble for odd ones.
static inline std::uint8_t code_at(const std::uint8_t* packed, std::int64_t index) {
  std::uint8_t byte = packed[index / 2];
  return (index & 1) ? (byte & 0x0f) : (byte >> 4);
}

// Calls segment(segment_begin, segment_end, block) for the pieces of the flat
// range [begin, end) cut at block boundaries, in order. Divides once: a
// division per block would sit on the loop's critical path.
template <typename Segment>
static inline void for_each_block_segment(std::int64_t begin, std::int64_t end,
                                          std::int64_t blocksize, Segment&& segment) {
  std::int64_t block = begin / blocksize;
  std::int64_t block_end = (block + 1) * blocksize;
  while (begin < end) {
    std::int64_t segment_end = block_end < end ? block_end : end;
    segment(begin, segment_end, block);
    begin = segment_end;
    ++block;
    block_end += blocksize;
  }
}

// Dot product of flat weight elements [begin, end), all in one block with
// scale `scale`, with x[0, end - begin); the weight is codebook * scale
// rounded to fp32 exactly as dequantization rounds it.
static inline float dot_range(const std::uint8_t* packed, float scale, std::int64_t begin,
                              std::int64_t end, const float* x) {
  float sum = 0.0f;
  for (std::int64_t i = begin; i < end; ++i) {
    sum += (nf4::kCodebook[code_at(packed, i)] * scale) * x[i - begin];
  }
  return sum;
}

// Calls body(std::integral_constant<int, N>{}) with N = count for 1..3 and 4
// for anything larger: the GEMV kernels keep up to four activation rows in
// registers per pass and are instantiated once per row count.
template <class Body>
static inline void with_row_count(std::int64_t count, Body&& body) {
  switch (count) {
    case 1:
      body(std::integral_constant<int, 1>{});
      return;
    case 2:
      body(std::integral_constant<int, 2>{});
      return;
    case 3:
      body(std::integral_constant<int, 3>{});
      return;
    default:
      body(std::integral_constant<int, 4>{});
      return;
  }
}

}  // namespace tail
}  // namespace cpu
}  // namespace lowrank

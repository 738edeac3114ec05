// NF4 dequantization (whole blocks and arbitrary flat ranges) and the
// transposed GEMV built on it, written once over an ISA's vector operations
// (`Simd`, the same traits as nf4_gemv.h's) and used by nf4_scalar.cpp,
// nf4_avx2.cpp and nf4_avx512.cpp. Include only from those files: everything
// here is in an anonymous namespace, so each ISA's translation unit compiles
// its own copy with its own flags (see kernels.h).
//
// Besides what nf4_gemv.h needs, Simd provides `decode_ordered(bytes, lut,
// first, second)` (kLanes packed bytes into their 2 * kLanes weights in
// element order), `set1`, `storeu` of fp32 and `store(out, dtype, index, v)`
// (rounded to `dtype` as tail::store_float rounds).
//
// Every weight is the fp32 product codebook[code] * block scale, whichever
// ISA computes it, so all tables give the same bits.
#pragma once

#include <cstdint>

#include "core/nf4.h"
#include "cpu/nf4_kernels.h"
#include "cpu/scalar_tail.h"

namespace lowrank {
namespace cpu {
namespace {

template <class Simd>
void nf4_dequantize_range(const std::uint8_t* packed, const BlockScales& scales,
                          std::int64_t blocksize, std::int64_t begin, std::int64_t end, void* out,
                          Dtype dtype) {
  using Vec = typename Simd::Vec;
  constexpr int kLanes = Simd::kLanes;
  std::int64_t start = begin;
  if ((start & 1) && start < end) {
    // A low-nibble start goes alone so the vector steps begin on a byte.
    tail::store_float(out, dtype, 0,
                      nf4::kCodebook[tail::code_at(packed, start)] *
                          block_scale(scales, start / blocksize));
    ++start;
  }
  tail::for_each_block_segment(
      start, end, blocksize,
      [&](std::int64_t segment_begin, std::int64_t segment_end, std::int64_t block) {
        const typename Simd::Lut lut = Simd::lut(scales, block);
        std::int64_t i = segment_begin;
        for (; i + 2 * kLanes <= segment_end; i += 2 * kLanes) {
          Vec first, second;
          Simd::decode_ordered(packed + i / 2, lut, first, second);
          Simd::store(out, dtype, i - begin, first);
          Simd::store(out, dtype, i - begin + kLanes, second);
        }
        const float scale = block_scale(scales, block);
        for (; i < segment_end; ++i) {
          tail::store_float(out, dtype, i - begin, nf4::kCodebook[tail::code_at(packed, i)] * scale);
        }
      });
}

// Blocks [block_begin, block_end) of a tensor of `numel` elements with plain
// fp32 scales: the range of their elements.
template <class Simd>
void nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t numel,
                    std::int64_t blocksize, std::int64_t block_begin, std::int64_t block_end,
                    void* out, Dtype dtype) {
  const std::int64_t begin = block_begin * blocksize;
  const std::int64_t end = block_end * blocksize < numel ? block_end * blocksize : numel;
  if (begin >= end) return;
  BlockScales scales;
  scales.absmax = absmax;
  const std::int64_t width = dtype == Dtype::Float32 ? 4 : 2;
  nf4_dequantize_range<Simd>(packed, scales, blocksize, begin, end,
                             static_cast<char*>(out) + begin * width, dtype);
}

// The weight rows' column slices are decoded one row at a time into an
// L1-resident buffer, then added, scaled by each row's gradient, into the
// accumulators (which stay in cache across all out_features rows).
template <class Simd>
void nf4_gemv_transposed(const float* grad, std::int64_t rows, const std::uint8_t* packed,
                         const BlockScales& scales, std::int64_t out_features,
                         std::int64_t in_features, std::int64_t blocksize,
                         std::int64_t column_begin, std::int64_t column_end, float* accumulator,
                         std::int64_t accumulator_stride) {
  constexpr int kLanes = Simd::kLanes;
  const std::int64_t width = column_end - column_begin;
  const std::int64_t vector_end = width / kLanes * kLanes;
  alignas(64) float weights[kGemvTransposedMaxColumns];
  for (std::int64_t row = 0; row < rows; ++row) {
    for (std::int64_t k = 0; k < width; ++k) accumulator[row * accumulator_stride + k] = 0.0f;
  }
  for (std::int64_t output = 0; output < out_features; ++output) {
    const std::int64_t flat = output * in_features + column_begin;
    nf4_dequantize_range<Simd>(packed, scales, blocksize, flat, flat + width, weights,
                               Dtype::Float32);
    for (std::int64_t row = 0; row < rows; ++row) {
      const float factor = grad[row * out_features + output];
      const typename Simd::Vec factor_vector = Simd::set1(factor);
      float* sums = accumulator + row * accumulator_stride;
      std::int64_t k = 0;
      for (; k < vector_end; k += kLanes) {
        Simd::storeu(sums + k,
                     Simd::fmadd(factor_vector, Simd::loadu(weights + k), Simd::loadu(sums + k)));
      }
      for (; k < width; ++k) sums[k] += factor * weights[k];
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace lowrank

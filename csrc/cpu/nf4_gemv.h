// The NF4 GEMV (fp32 activations in the GemvInput layout), written once over
// an ISA's vector operations (`Simd`, see below) and used by nf4_scalar.cpp,
// nf4_avx2.cpp and nf4_avx512.cpp. Include only from those files: everything
// here is in an anonymous namespace, so each ISA's translation unit compiles
// its own copy with its own flags and no vector code is shared across ISAs
// (see kernels.h).
//
// One step reads Simd::kLanes packed bytes (2 * kLanes weights of one block),
// decodes them once with the block's scaled codebook into two vectors (high
// nibbles: the `even` activations of a row, low nibbles: the `odd` ones; see
// GemvInput) and applies them to every activation row of the group, so the
// decode, the costly part of a step, is shared by up to Simd::kMaxRows rows.
// Up to Simd::kPairedRows rows keep two accumulators each (even and odd) so
// that one or two rows still have enough independent FMA chains to hide the
// FMA latency; larger groups keep one per row, which the registers hold.
//
// Simd provides: `Vec`, `kLanes`, `kMaxRows`, `kPairedRows`; `Lut` and
// `lut(scales, block)` (the codebook times the block's scale, each product
// the fp32 value dequantization gives); `decode(bytes, lut, high, low)`;
// `zero`, `add`, `fmadd`, `loadu` of fp32, `reduce_add`, and
// `prefetch(address)` (a hint, may do nothing).
#pragma once

#include <cstdint>

#include "core/nf4.h"
#include "cpu/nf4_kernels.h"
#include "cpu/scalar_tail.h"

namespace lowrank {
namespace cpu {
namespace {

// Output rows per chunk: a chunk's weight slice stays cache-hot while every
// row group passes over it.
constexpr std::int64_t kGemvOutputChunk = 32;

// GEMV over outputs [out_begin, out_end) for activation rows [first_row, first_row + Rows).
template <class Simd, int Rows>
void gemv_rows(const GemvInput& input, std::int64_t first_row, const std::uint8_t* packed,
               const BlockScales& scales, std::int64_t out_features, std::int64_t in_features,
               std::int64_t blocksize, const float* bias, std::int64_t out_begin,
               std::int64_t out_end, void* out, Dtype out_dtype) {
  using Vec = typename Simd::Vec;
  constexpr int kLanes = Simd::kLanes;
  constexpr bool kPaired = Rows <= Simd::kPairedRows;
  for (std::int64_t output = out_begin; output < out_end; ++output) {
    const std::int64_t row_begin = output * in_features;
    const std::int64_t row_end = row_begin + in_features;
    const std::int64_t parity = row_begin & 1;
    const float* natural[Rows];
    const float* even[Rows];
    const float* odd[Rows];
    Vec acc_even[Rows];
    Vec acc_odd[kPaired ? Rows : 1];
    float scalar_sum[Rows];
    for (int r = 0; r < Rows; ++r) {
      natural[r] = gemv_natural(input, first_row + r);
      even[r] = gemv_even(input, first_row + r, parity);
      odd[r] = gemv_odd(input, first_row + r, parity);
      acc_even[r] = Simd::zero();
      if (kPaired) acc_odd[r] = Simd::zero();
      scalar_sum[r] = 0.0f;
    }
    std::int64_t start = row_begin;
    if (parity) {
      // The row starts in a low nibble: take that element alone so every
      // vector step below begins on a byte.
      float weight = nf4::kCodebook[tail::code_at(packed, start)] *
                     block_scale(scales, start / blocksize);
      for (int r = 0; r < Rows; ++r) scalar_sum[r] += weight * natural[r][0];
      ++start;
    }
    // The block segments of [start, row_end), as tail::for_each_block_segment
    // walks them, written out: at -O2 GCC compiled that lambda out of line
    // for 8 rows, with the accumulators in memory (-O3 inlines it).
    std::int64_t block = start / blocksize;
    for (std::int64_t begin = start; begin < row_end; ++block) {
      const std::int64_t block_end = (block + 1) * blocksize;
      const std::int64_t end = block_end < row_end ? block_end : row_end;
      const typename Simd::Lut lut = Simd::lut(scales, block);
      std::int64_t i = begin;
      for (; i + 2 * kLanes <= end; i += 2 * kLanes) {
        // Streaming the weight is the bound; prefetching 1 KiB ahead keeps
        // more cache-line fills in flight than the hardware prefetcher.
        Simd::prefetch(packed + i / 2 + 1024);
        Vec weight_high, weight_low;
        Simd::decode(packed + i / 2, lut, weight_high, weight_low);
        const std::int64_t pair = (i - row_begin - parity) / 2;
        // Unrolled so the accumulators stay in registers at any -O level.
#pragma GCC unroll 16
        for (int r = 0; r < Rows; ++r) {
          acc_even[r] = Simd::fmadd(weight_high, Simd::loadu(even[r] + pair), acc_even[r]);
          Vec& low_sum = kPaired ? acc_odd[kPaired ? r : 0] : acc_even[r];
          low_sum = Simd::fmadd(weight_low, Simd::loadu(odd[r] + pair), low_sum);
        }
      }
      if (i < end) {
        const float scale = block_scale(scales, block);
        for (int r = 0; r < Rows; ++r) {
          scalar_sum[r] += tail::dot_range(packed, scale, i, end, natural[r] + (i - row_begin));
        }
      }
      begin = end;
    }
    for (int r = 0; r < Rows; ++r) {
      const Vec total = kPaired ? Simd::add(acc_even[r], acc_odd[kPaired ? r : 0]) : acc_even[r];
      float sum = Simd::reduce_add(total) + scalar_sum[r];
      if (bias != nullptr) sum += bias[output];
      tail::store_float(out, out_dtype, (first_row + r) * out_features + output, sum);
    }
  }
}

// Calls body(std::integral_constant<int, N>{}) with N = count, 1 <= count <= Max.
template <int Max, class Body>
inline void with_rows(std::int64_t count, Body&& body) {
  if constexpr (Max > 1) {
    if (count < Max) {
      with_rows<Max - 1>(count, body);
      return;
    }
  }
  body(std::integral_constant<int, Max>{});
}

template <class Simd>
void nf4_gemv(const GemvInput& input, const std::uint8_t* packed, const BlockScales& scales,
              std::int64_t out_features, std::int64_t in_features, std::int64_t blocksize,
              const float* bias, std::int64_t out_begin, std::int64_t out_end, void* out,
              Dtype out_dtype) {
  // Rows split into the fewest groups of at most kMaxRows, as even as
  // possible (10 rows on 8 at most: 5 + 5, not 8 + 2).
  const std::int64_t groups = (input.rows + Simd::kMaxRows - 1) / Simd::kMaxRows;
  for (std::int64_t chunk = out_begin; chunk < out_end; chunk += kGemvOutputChunk) {
    const std::int64_t chunk_end =
        chunk + kGemvOutputChunk < out_end ? chunk + kGemvOutputChunk : out_end;
    std::int64_t row = 0;
    for (std::int64_t group = 0; group < groups; ++group) {
      const std::int64_t count = (input.rows - row) / (groups - group) +
                                 ((input.rows - row) % (groups - group) != 0 ? 1 : 0);
      with_rows<Simd::kMaxRows>(count, [&](auto rows) {
        gemv_rows<Simd, decltype(rows)::value>(input, row, packed, scales, out_features,
                                               in_features, blocksize, bias, chunk, chunk_end,
                                               out, out_dtype);
      });
      row += count;
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace lowrank

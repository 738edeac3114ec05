// AVX512-BF16 NF4 GEMV for bf16 activations. Compiled with AVX-512 plus
// AVX512-BF16 flags for this file only and reached only through the AVX-512
// table's Nf4Kernels::gemv_bf16, which dispatch.cpp sets after a runtime
// CPU check.
//
// Per 64 weights (32 packed bytes) the decode is one broadcast load, a
// masked shift, an AND, two byte shuffles (the low and the high bytes of the
// 16 bf16 codebook values) and two byte unpacks; two _mm512_dpbf16_ps per
// activation row then multiply-add 64 bf16 products into fp32. The decode's
// element order is gemv_bf16_column's, which the prepared activations
// already follow.
#include <immintrin.h>

#include "core/float_convert.h"
#include "core/nf4.h"
#include "cpu/isa_tables.h"
#include "cpu/scalar_tail.h"
#include "cpu/simd_avx512.h"

namespace lowrank {
namespace cpu {
namespace {

using avx512::block_scale16;

// Activation rows handled together by one pass over a weight row, and output
// rows per chunk: a chunk's weight slice stays cache-hot while every row
// group passes over it.
constexpr int kRowGroup = 4;
constexpr std::int64_t kOutputChunk = 32;

// The bf16 codebook split into its low and its high bytes, each 16-entry
// table repeated in all four 128-bit lanes for _mm512_shuffle_epi8.
struct Bf16Codebook {
  __m512i low_bytes;
  __m512i high_bytes;
};

inline Bf16Codebook make_bf16_codebook() {
  alignas(16) std::uint8_t low[16];
  alignas(16) std::uint8_t high[16];
  for (int code = 0; code < 16; ++code) {
    const std::uint16_t bits = float_to_bf16(nf4::kCodebook[code]);
    low[code] = static_cast<std::uint8_t>(bits & 0xff);
    high[code] = static_cast<std::uint8_t>(bits >> 8);
  }
  return {_mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(low))),
          _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(high)))};
}

// Decodes the 64 weights of packed bytes [bytes, bytes + 32) into bf16
// codebook values: `first` holds group positions 0..31, `second` 32..63
// (see gemv_bf16_column).
inline void decode64(const std::uint8_t* bytes, const Bf16Codebook& codebook, __m512i& first,
                     __m512i& second) {
  const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  // High nibbles into the lower 256 bits (words 0..15), low nibbles stay in
  // the upper 256; the AND clears bit 7, which would make a shuffle write 0.
  const __m512i codes = _mm512_and_si512(_mm512_mask_srli_epi16(both, 0x0000ffff, both, 4),
                                         _mm512_set1_epi8(0x0f));
  const __m512i low = _mm512_shuffle_epi8(codebook.low_bytes, codes);
  const __m512i high = _mm512_shuffle_epi8(codebook.high_bytes, codes);
  first = _mm512_unpacklo_epi8(low, high);
  second = _mm512_unpackhi_epi8(low, high);
}

// One 64-weight step: accumulates the products with each row's permuted
// activations at `column` (a multiple of 64) into `acc_first`/`acc_second`
// (which may be the same array: one chain per row).
template <int Rows>
inline void dot64(const std::uint8_t* bytes, const Bf16Codebook& codebook,
                  const std::uint16_t* const* activations, std::int64_t column,
                  __m512* acc_first, __m512* acc_second) {
  // Streaming the weight is the other bound; prefetching 1 KiB ahead keeps
  // more cache-line fills in flight than the hardware prefetcher alone does.
  _mm_prefetch(reinterpret_cast<const char*>(bytes) + 1024, _MM_HINT_T0);
  __m512i first;
  __m512i second;
  decode64(bytes, codebook, first, second);
  for (int r = 0; r < Rows; ++r) {
    const std::uint16_t* x = activations[r] + column;
    acc_first[r] = _mm512_dpbf16_ps(acc_first[r], reinterpret_cast<__m512bh>(first),
                                    reinterpret_cast<__m512bh>(_mm512_loadu_si512(x)));
    acc_second[r] = _mm512_dpbf16_ps(acc_second[r], reinterpret_cast<__m512bh>(second),
                                     reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + 32)));
  }
}

// blocksize 64: the block starting at flat element i (a multiple of 64),
// scaled, added to `total`; both halves of the step feed one dot-product chain.
template <int Rows>
inline void block64(const std::uint8_t* packed, const Bf16Codebook& codebook,
                    const std::uint16_t* const* activations, const BlockScales& scales,
                    __m512 offset, std::int64_t i, std::int64_t row_begin, __m512* total) {
  __m512 dot[Rows];
  for (int r = 0; r < Rows; ++r) dot[r] = _mm512_setzero_ps();
  dot64<Rows>(packed + i / 2, codebook, activations, i - row_begin, dot, dot);
  const __m512 scale = block_scale16(scales, i / 64, offset);
  for (int r = 0; r < Rows; ++r) total[r] = _mm512_fmadd_ps(dot[r], scale, total[r]);
}

// GEMV over outputs [out_begin, out_end) for activation rows
// [first_row, first_row + Rows). Every weight row starts on a multiple of 64
// flat elements (in_features % 64 == 0), so block boundaries, at multiples
// of blocksize >= 32, never cut a 64-weight step except for blocksize 32,
// where a step holds exactly two blocks.
template <int Rows>
void gemv_rows(const GemvBf16Input& input, std::int64_t first_row, const std::uint8_t* packed,
               const BlockScales& scales, std::int64_t out_features, std::int64_t in_features,
               std::int64_t blocksize, const float* bias, std::int64_t out_begin,
               std::int64_t out_end, void* out, Dtype out_dtype) {
  const Bf16Codebook codebook = make_bf16_codebook();
  const __m512 offset = _mm512_set1_ps(scales.offset);
  const std::uint16_t* activations[Rows];
  for (int r = 0; r < Rows; ++r) activations[r] = input.data + (first_row + r) * in_features;
  for (std::int64_t output = out_begin; output < out_end; ++output) {
    const std::int64_t row_begin = output * in_features;
    const std::int64_t row_end = row_begin + in_features;
    __m512 total[Rows];
    for (int r = 0; r < Rows; ++r) total[r] = _mm512_setzero_ps();
    if (blocksize == 32) {
      // 128-bit lanes 0 and 2 of a dot product hold packed bytes 0..15 (the
      // step's first block), lanes 1 and 3 bytes 16..31 (its second).
      for (std::int64_t i = row_begin; i < row_end; i += kGemvBf16Group) {
        __m512 acc_first[Rows];
        __m512 acc_second[Rows];
        for (int r = 0; r < Rows; ++r) {
          acc_first[r] = _mm512_setzero_ps();
          acc_second[r] = _mm512_setzero_ps();
        }
        dot64<Rows>(packed + i / 2, codebook, activations, i - row_begin, acc_first, acc_second);
        const std::int64_t block = i / 32;
        const __m512 scale = _mm512_mask_blend_ps(0xf0f0, block_scale16(scales, block, offset),
                                                  block_scale16(scales, block + 1, offset));
        for (int r = 0; r < Rows; ++r) {
          total[r] = _mm512_fmadd_ps(_mm512_add_ps(acc_first[r], acc_second[r]), scale, total[r]);
        }
      }
    } else if (blocksize == 64) {
      // One 64-weight step is one whole block: a single dot-product chain per
      // step, scaled once (measured 1.2x faster than the general path below
      // at batch one). Two steps per iteration fold into separate totals: one
      // chain of dependent FMAs would bound the loop at one block per FMA
      // latency.
      __m512 total_odd[Rows];
      for (int r = 0; r < Rows; ++r) total_odd[r] = _mm512_setzero_ps();
      std::int64_t i = row_begin;
      for (; i + 2 * kGemvBf16Group <= row_end; i += 2 * kGemvBf16Group) {
        block64<Rows>(packed, codebook, activations, scales, offset, i, row_begin, total);
        block64<Rows>(packed, codebook, activations, scales, offset, i + kGemvBf16Group,
                      row_begin, total_odd);
      }
      if (i < row_end) {
        block64<Rows>(packed, codebook, activations, scales, offset, i, row_begin, total);
      }
      for (int r = 0; r < Rows; ++r) total[r] = _mm512_add_ps(total[r], total_odd[r]);
    } else {
      tail::for_each_block_segment(
          row_begin, row_end, blocksize, [&](std::int64_t begin, std::int64_t end, std::int64_t block) {
            // Two independent pairs of accumulators per row hide the dot
            // product's latency when only one row is in flight.
            __m512 acc[2][2][Rows];
            for (int r = 0; r < Rows; ++r) {
              acc[0][0][r] = _mm512_setzero_ps();
              acc[0][1][r] = _mm512_setzero_ps();
              acc[1][0][r] = _mm512_setzero_ps();
              acc[1][1][r] = _mm512_setzero_ps();
            }
            std::int64_t i = begin;
            for (; i + 2 * kGemvBf16Group <= end; i += 2 * kGemvBf16Group) {
              dot64<Rows>(packed + i / 2, codebook, activations, i - row_begin, acc[0][0], acc[0][1]);
              dot64<Rows>(packed + i / 2 + kGemvBf16Group / 2, codebook, activations,
                          i - row_begin + kGemvBf16Group, acc[1][0], acc[1][1]);
            }
            if (i < end) {
              dot64<Rows>(packed + i / 2, codebook, activations, i - row_begin, acc[0][0], acc[0][1]);
            }
            const __m512 scale = block_scale16(scales, block, offset);
            for (int r = 0; r < Rows; ++r) {
              const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0][0][r], acc[0][1][r]),
                                               _mm512_add_ps(acc[1][0][r], acc[1][1][r]));
              total[r] = _mm512_fmadd_ps(sum, scale, total[r]);
            }
          });
    }
    for (int r = 0; r < Rows; ++r) {
      float sum = _mm512_reduce_add_ps(total[r]);
      if (bias != nullptr) sum += bias[output];
      tail::store_float(out, out_dtype, (first_row + r) * out_features + output, sum);
    }
  }
}

}  // namespace

void nf4_gemv_avx512bf16(const GemvBf16Input& input, const std::uint8_t* packed,
                         const BlockScales& scales, std::int64_t out_features,
                         std::int64_t in_features, std::int64_t blocksize, const float* bias,
                         std::int64_t out_begin, std::int64_t out_end, void* out,
                         Dtype out_dtype) {
  for (std::int64_t chunk = out_begin; chunk < out_end; chunk += kOutputChunk) {
    const std::int64_t chunk_end = chunk + kOutputChunk < out_end ? chunk + kOutputChunk : out_end;
    for (std::int64_t row = 0; row < input.rows; row += kRowGroup) {
      const std::int64_t count = input.rows - row < kRowGroup ? input.rows - row : kRowGroup;
      tail::with_row_count(count, [&](auto row_count) {
        gemv_rows<decltype(row_count)::value>(input, row, packed, scales, out_features,
                                              in_features, blocksize, bias, chunk,
                                              chunk_end, out, out_dtype);
      });
    }
  }
}

}  // namespace cpu
}  // namespace lowrank

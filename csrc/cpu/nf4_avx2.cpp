// AVX2 + FMA + F16C NF4 kernels. Compiled with those flags for this file only
// and reached only through the dispatcher after a runtime CPU check.
#include <immintrin.h>

#include "core/nf4.h"
#include "cpu/kernels.h"
#include "cpu/scalar_tail.h"
#include "cpu/simd_avx2.h"

namespace lowrank {
namespace cpu {
namespace {

using avx2::load8;
using avx2::store8;

constexpr std::int64_t kLanes = 8;

// Number of midpoints strictly below each lane = its NF4 code.
inline __m256i encode8(__m256 scaled) {
  __m256i code = _mm256_setzero_si256();
  for (int i = 0; i < 15; ++i) {
    __m256 above = _mm256_cmp_ps(scaled, _mm256_set1_ps(nf4::kMidpoints[i]), _CMP_GT_OQ);
    code = _mm256_sub_epi32(code, _mm256_castps_si256(above));
  }
  return code;
}

inline __m256 scale8(__m256 values, __m256 factor, bool full_block) {
  __m256 scaled = full_block ? _mm256_mul_ps(values, factor) : _mm256_div_ps(values, factor);
  return _mm256_min_ps(_mm256_max_ps(scaled, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(1.0f));
}

// Packs 16 codes (two vectors of 8 int32) into 8 bytes, high nibble first.
inline void pack16(__m256i first, __m256i second, std::uint8_t* out) {
  __m256i words = _mm256_packs_epi32(first, second);
  words = _mm256_permute4x64_epi64(words, 0xd8);
  __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(words),
                                   _mm256_extracti128_si256(words, 1));
  __m128i pairs = _mm_maddubs_epi16(bytes, _mm_set1_epi16(0x0110));  // c[2i]*16 + c[2i+1]
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(pairs, pairs));
}

bool nf4_quantize_avx2(const void* input, Dtype dtype, std::int64_t numel,
                       std::int64_t blocksize, std::int64_t block_begin, std::int64_t block_end,
                       std::uint8_t* packed, float* absmax) {
  const __m256i magnitude_mask = _mm256_set1_epi32(0x7fffffff);
  bool finite = true;
  for (std::int64_t block = block_begin; block < block_end; ++block) {
    std::int64_t begin = block * blocksize;
    std::int64_t end = begin + blocksize < numel ? begin + blocksize : numel;
    bool full_block = end - begin == blocksize;
    std::int64_t vector_end = begin + (end - begin) / (2 * kLanes) * (2 * kLanes);

    __m256i max_bits = _mm256_setzero_si256();
    for (std::int64_t i = begin; i < vector_end; i += kLanes) {
      __m256i bits = _mm256_and_si256(_mm256_castps_si256(load8(input, dtype, i)), magnitude_mask);
      max_bits = _mm256_max_epu32(max_bits, bits);
    }
    alignas(32) std::uint32_t lanes[kLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), max_bits);
    std::uint32_t block_bits = 0;
    for (std::uint32_t lane : lanes) block_bits = lane > block_bits ? lane : block_bits;
    for (std::int64_t i = vector_end; i < end; ++i) {
      std::uint32_t bits = float_bits(tail::load_float(input, dtype, i)) & 0x7fffffffu;
      block_bits = bits > block_bits ? bits : block_bits;
    }
    finite &= block_bits < 0x7f800000u;
    float block_absmax = bits_float(block_bits);
    absmax[block] = full_block || block_absmax >= nf4::kAbsmaxFloor ? block_absmax : nf4::kAbsmaxFloor;

    float factor = tail::block_factor(block_absmax, full_block);
    __m256 factor8 = _mm256_set1_ps(factor);
    for (std::int64_t i = begin; i < vector_end; i += 2 * kLanes) {
      __m256i first = encode8(scale8(load8(input, dtype, i), factor8, full_block));
      __m256i second = encode8(scale8(load8(input, dtype, i + kLanes), factor8, full_block));
      pack16(first, second, packed + i / 2);
    }
    tail::encode_range(input, dtype, vector_end, end, factor, full_block, packed);
  }
  return finite;
}

void nf4_dequantize_avx2(const std::uint8_t* packed, const float* absmax, std::int64_t numel,
                         std::int64_t blocksize, std::int64_t block_begin, std::int64_t block_end,
                         void* out, Dtype dtype) {
  const __m256 codebook_low = _mm256_loadu_ps(nf4::kCodebook);
  const __m256 codebook_high = _mm256_loadu_ps(nf4::kCodebook + 8);
  const __m128i nibble = _mm_set1_epi8(0x0f);
  for (std::int64_t block = block_begin; block < block_end; ++block) {
    std::int64_t begin = block * blocksize;
    std::int64_t end = begin + blocksize < numel ? begin + blocksize : numel;
    std::int64_t vector_end = begin + (end - begin) / (2 * kLanes) * (2 * kLanes);
    __m256 scale = _mm256_set1_ps(absmax[block]);
    for (std::int64_t i = begin; i < vector_end; i += 2 * kLanes) {
      __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2));
      __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
      __m128i low = _mm_and_si128(bytes, nibble);
      __m128i codes = _mm_unpacklo_epi8(high, low);  // element order
      for (int half = 0; half < 2; ++half) {
        __m256i index = _mm256_cvtepu8_epi32(half ? _mm_srli_si128(codes, 8) : codes);
        __m256 from_low = _mm256_permutevar8x32_ps(codebook_low, index);
        __m256 from_high = _mm256_permutevar8x32_ps(codebook_high, index);
        __m256 value = _mm256_blendv_ps(from_low, from_high,
                                        _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
        store8(out, dtype, i + half * kLanes, _mm256_mul_ps(value, scale));
      }
    }
    tail::dequantize_range(packed, absmax[block], vector_end, end, out, dtype);
  }
}

// Codebook lookup for 8 indices (bits 0..3 of each lane select, bits above
// are ignored): two 8-entry permutes (which read bits 0..2), chosen by bit 3
// shifted into the sign bit that blendv reads.
inline __m256 lookup8(__m256i index, __m256 lut_low, __m256 lut_high) {
  __m256 from_low = _mm256_permutevar8x32_ps(lut_low, index);
  __m256 from_high = _mm256_permutevar8x32_ps(lut_high, index);
  return _mm256_blendv_ps(from_low, from_high,
                          _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

inline float reduce_add8(__m256 values) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(values), _mm256_extractf128_ps(values, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// Activation rows handled together by one pass over a weight row, and output
// rows per chunk: a chunk's weight slice stays cache-hot while every row
// group passes over it.
constexpr int kGemvRowGroup = 4;
constexpr std::int64_t kGemvOutputChunk = 32;

// GEMV over outputs [out_begin, out_end) for activation rows [first_row, first_row + Rows).
// A 16-element step reads 8 packed bytes: the high nibbles multiply 8
// consecutive `even` activations, the low nibbles the matching `odd` ones.
template <int Rows>
void gemv_rows(const GemvInput& input, std::int64_t first_row, const std::uint8_t* packed,
               const BlockScales& scales, std::int64_t out_features, std::int64_t in_features,
               std::int64_t blocksize, const float* bias, std::int64_t out_begin,
               std::int64_t out_end, void* out, Dtype out_dtype) {
  const __m256 codebook_low = _mm256_loadu_ps(nf4::kCodebook);
  const __m256 codebook_high = _mm256_loadu_ps(nf4::kCodebook + 8);
  for (std::int64_t output = out_begin; output < out_end; ++output) {
    const std::int64_t row_begin = output * in_features;
    const std::int64_t row_end = row_begin + in_features;
    const std::int64_t parity = row_begin & 1;
    const float* natural[Rows];
    const float* even[Rows];
    const float* odd[Rows];
    __m256 acc_even[Rows];
    __m256 acc_odd[Rows];
    float scalar_sum[Rows];
    for (int r = 0; r < Rows; ++r) {
      natural[r] = gemv_natural(input, first_row + r);
      even[r] = gemv_even(input, first_row + r, parity);
      odd[r] = gemv_odd(input, first_row + r, parity);
      acc_even[r] = _mm256_setzero_ps();
      acc_odd[r] = _mm256_setzero_ps();
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
    tail::for_each_block_segment(
        start, row_end, blocksize, [&](std::int64_t begin, std::int64_t end, std::int64_t block) {
          const float scale = block_scale(scales, block);
          const __m256 scale8 = _mm256_set1_ps(scale);
          const __m256 lut_low = _mm256_mul_ps(codebook_low, scale8);
          const __m256 lut_high = _mm256_mul_ps(codebook_high, scale8);
          std::int64_t i = begin;
          for (; i + 2 * kLanes <= end; i += 2 * kLanes) {
            // Streaming the weight is the bound; prefetching 1 KiB ahead keeps
            // more cache-line fills in flight than the hardware prefetcher.
            _mm_prefetch(reinterpret_cast<const char*>(packed + i / 2) + 1024, _MM_HINT_T0);
            __m256i index = _mm256_cvtepu8_epi32(
                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2)));
            __m256 weight_high = lookup8(_mm256_srli_epi32(index, 4), lut_low, lut_high);
            __m256 weight_low = lookup8(index, lut_low, lut_high);
            const std::int64_t pair = (i - row_begin - parity) / 2;
            for (int r = 0; r < Rows; ++r) {
              acc_even[r] = _mm256_fmadd_ps(weight_high, _mm256_loadu_ps(even[r] + pair), acc_even[r]);
              acc_odd[r] = _mm256_fmadd_ps(weight_low, _mm256_loadu_ps(odd[r] + pair), acc_odd[r]);
            }
          }
          if (i < end) {
            for (int r = 0; r < Rows; ++r) {
              scalar_sum[r] += tail::dot_range(packed, scale, i, end, natural[r] + (i - row_begin));
            }
          }
        });
    for (int r = 0; r < Rows; ++r) {
      float sum = reduce_add8(_mm256_add_ps(acc_even[r], acc_odd[r])) + scalar_sum[r];
      if (bias != nullptr) sum += bias[output];
      tail::store_float(out, out_dtype, (first_row + r) * out_features + output, sum);
    }
  }
}

void nf4_gemv_avx2(const GemvInput& input, const std::uint8_t* packed, const BlockScales& scales,
                   std::int64_t out_features, std::int64_t in_features, std::int64_t blocksize,
                   const float* bias, std::int64_t out_begin, std::int64_t out_end, void* out,
                   Dtype out_dtype) {
  for (std::int64_t chunk = out_begin; chunk < out_end; chunk += kGemvOutputChunk) {
    const std::int64_t chunk_end = chunk + kGemvOutputChunk < out_end ? chunk + kGemvOutputChunk : out_end;
    for (std::int64_t row = 0; row < input.rows; row += kGemvRowGroup) {
      const std::int64_t count = input.rows - row < kGemvRowGroup ? input.rows - row : kGemvRowGroup;
      tail::with_row_count(count, [&](auto row_count) {
        gemv_rows<decltype(row_count)::value>(input, row, packed, scales, out_features,
                                              in_features, blocksize, bias, chunk,
                                              chunk_end, out, out_dtype);
      });
    }
  }
}

void nf4_dequantize_range_avx2(const std::uint8_t* packed, const BlockScales& scales,
                               std::int64_t blocksize, std::int64_t begin, std::int64_t end,
                               void* out, Dtype dtype) {
  const __m256 codebook_low = _mm256_loadu_ps(nf4::kCodebook);
  const __m256 codebook_high = _mm256_loadu_ps(nf4::kCodebook + 8);
  const __m128i nibble = _mm_set1_epi8(0x0f);
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
        const __m256 scale8 = _mm256_set1_ps(block_scale(scales, block));
        const __m256 lut_low = _mm256_mul_ps(codebook_low, scale8);
        const __m256 lut_high = _mm256_mul_ps(codebook_high, scale8);
        std::int64_t i = segment_begin;
        for (; i + 2 * kLanes <= segment_end; i += 2 * kLanes) {
          __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2));
          __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
          __m128i codes = _mm_unpacklo_epi8(high, _mm_and_si128(bytes, nibble));  // element order
          store8(out, dtype, i - begin,
                 lookup8(_mm256_cvtepu8_epi32(codes), lut_low, lut_high));
          store8(out, dtype, i - begin + kLanes,
                 lookup8(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)), lut_low, lut_high));
        }
        const float scale = block_scale(scales, block);
        for (; i < segment_end; ++i) {
          tail::store_float(out, dtype, i - begin, nf4::kCodebook[tail::code_at(packed, i)] * scale);
        }
      });
}

// The weight rows' column slices are decoded one row at a time into an
// L1-resident buffer, then added, scaled by each row's gradient, into the
// accumulators (which stay in cache across all out_features rows).
void nf4_gemv_transposed_avx2(const float* grad, std::int64_t rows, const std::uint8_t* packed,
                              const BlockScales& scales, std::int64_t out_features,
                              std::int64_t in_features, std::int64_t blocksize,
                              std::int64_t column_begin, std::int64_t column_end,
                              float* accumulator, std::int64_t accumulator_stride) {
  const std::int64_t width = column_end - column_begin;
  const std::int64_t vector_end = width / kLanes * kLanes;
  alignas(64) float weights[kGemvTransposedMaxColumns];
  for (std::int64_t row = 0; row < rows; ++row) {
    for (std::int64_t k = 0; k < width; ++k) accumulator[row * accumulator_stride + k] = 0.0f;
  }
  for (std::int64_t output = 0; output < out_features; ++output) {
    const std::int64_t flat = output * in_features + column_begin;
    nf4_dequantize_range_avx2(packed, scales, blocksize, flat, flat + width, weights,
                                Dtype::Float32);
    for (std::int64_t row = 0; row < rows; ++row) {
      const float factor = grad[row * out_features + output];
      const __m256 factor_vector = _mm256_set1_ps(factor);
      float* sums = accumulator + row * accumulator_stride;
      std::int64_t k = 0;
      for (; k < vector_end; k += kLanes) {
        _mm256_storeu_ps(sums + k, _mm256_fmadd_ps(factor_vector, _mm256_loadu_ps(weights + k), _mm256_loadu_ps(sums + k)));
      }
      for (; k < width; ++k) sums[k] += factor * weights[k];
    }
  }
}

}  // namespace

const CpuKernels& avx2_kernels() {
  static const CpuKernels table{Isa::Avx2, nf4_quantize_avx2, nf4_dequantize_avx2, nf4_gemv_avx2,
                                nf4_gemv_transposed_avx2, nf4_dequantize_range_avx2, nullptr};
  return table;
}

}  // namespace cpu
}  // namespace lowrank

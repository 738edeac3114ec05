// AVX-512 (F/BW/VL/DQ) NF4 kernels. Compiled with those flags for this file
// only and reached only through the dispatcher after a runtime CPU check.
// The 16-entry codebook lookup is one _mm512_permutexvar_ps.
#include <immintrin.h>

#include "core/nf4.h"
#include "cpu/kernels.h"
#include "cpu/scalar_tail.h"
#include "cpu/nf4_gemv.h"
#include "cpu/simd_avx512.h"

namespace lowrank {
namespace cpu {
namespace {

using avx512::block_scale16;
using avx512::load16;
using avx512::store16;

constexpr std::int64_t kLanes = 16;



// Binary search over the 15 midpoints: the code is the number of midpoints
// strictly below the value (steps 8, 4, 2, 1 reach every code 0..15).
inline __m512i encode16(__m512 scaled, __m512 midpoints) {
  __m512i code = _mm512_setzero_si512();
  for (int step = 8; step >= 1; step >>= 1) {
    __m512i candidate = _mm512_add_epi32(code, _mm512_set1_epi32(step));
    __m512 boundary =
        _mm512_permutexvar_ps(_mm512_sub_epi32(candidate, _mm512_set1_epi32(1)), midpoints);
    __mmask16 above = _mm512_cmp_ps_mask(scaled, boundary, _CMP_GT_OQ);
    code = _mm512_mask_mov_epi32(code, above, candidate);
  }
  return code;
}

inline __m512 scale16(__m512 values, __m512 factor, bool full_block) {
  __m512 scaled = full_block ? _mm512_mul_ps(values, factor) : _mm512_div_ps(values, factor);
  return _mm512_min_ps(_mm512_max_ps(scaled, _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f));
}

bool nf4_quantize_avx512(const void* input, Dtype dtype, std::int64_t numel,
                         std::int64_t blocksize, std::int64_t block_begin,
                         std::int64_t block_end, std::uint8_t* packed, float* absmax) {
  const __m512i magnitude_mask = _mm512_set1_epi32(0x7fffffff);
  alignas(64) float midpoint_table[16];
  for (int i = 0; i < 15; ++i) midpoint_table[i] = nf4::kMidpoints[i];
  midpoint_table[15] = 2.0f;  // never selected: candidates stop at 15
  const __m512 midpoints = _mm512_load_ps(midpoint_table);
  bool finite = true;
  for (std::int64_t block = block_begin; block < block_end; ++block) {
    std::int64_t begin = block * blocksize;
    std::int64_t end = begin + blocksize < numel ? begin + blocksize : numel;
    bool full_block = end - begin == blocksize;
    std::int64_t vector_end = begin + (end - begin) / kLanes * kLanes;

    __m512i max_bits = _mm512_setzero_si512();
    for (std::int64_t i = begin; i < vector_end; i += kLanes) {
      __m512i bits = _mm512_and_si512(_mm512_castps_si512(load16(input, dtype, i)), magnitude_mask);
      max_bits = _mm512_max_epu32(max_bits, bits);
    }
    std::uint32_t block_bits = _mm512_reduce_max_epu32(max_bits);
    for (std::int64_t i = vector_end; i < end; ++i) {
      std::uint32_t bits = float_bits(tail::load_float(input, dtype, i)) & 0x7fffffffu;
      block_bits = bits > block_bits ? bits : block_bits;
    }
    finite &= block_bits < 0x7f800000u;
    float block_absmax = bits_float(block_bits);
    absmax[block] = full_block || block_absmax >= nf4::kAbsmaxFloor ? block_absmax : nf4::kAbsmaxFloor;

    float factor = tail::block_factor(block_absmax, full_block);
    __m512 factor16 = _mm512_set1_ps(factor);
    for (std::int64_t i = begin; i < vector_end; i += kLanes) {
      __m512i codes = encode16(scale16(load16(input, dtype, i), factor16, full_block), midpoints);
      __m128i bytes = _mm512_cvtepi32_epi8(codes);
      __m128i pairs = _mm_maddubs_epi16(bytes, _mm_set1_epi16(0x0110));  // c[2i]*16 + c[2i+1]
      _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + i / 2), _mm_packus_epi16(pairs, pairs));
    }
    tail::encode_range(input, dtype, vector_end, end, factor, full_block, packed);
  }
  return finite;
}

void nf4_dequantize_avx512(const std::uint8_t* packed, const float* absmax, std::int64_t numel,
                           std::int64_t blocksize, std::int64_t block_begin,
                           std::int64_t block_end, void* out, Dtype dtype) {
  const __m512 codebook = _mm512_loadu_ps(nf4::kCodebook);
  const __m128i nibble = _mm_set1_epi8(0x0f);
  for (std::int64_t block = block_begin; block < block_end; ++block) {
    std::int64_t begin = block * blocksize;
    std::int64_t end = begin + blocksize < numel ? begin + blocksize : numel;
    std::int64_t vector_end = begin + (end - begin) / (2 * kLanes) * (2 * kLanes);
    __m512 scale = _mm512_set1_ps(absmax[block]);
    for (std::int64_t i = begin; i < vector_end; i += 2 * kLanes) {
      __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2));
      __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
      __m128i low = _mm_and_si128(bytes, nibble);
      __m512 first = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(high, low)), codebook);
      __m512 second = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(high, low)), codebook);
      store16(out, dtype, i, _mm512_mul_ps(first, scale));
      store16(out, dtype, i + kLanes, _mm512_mul_ps(second, scale));
    }
    tail::dequantize_range(packed, absmax[block], vector_end, end, out, dtype);
  }
}

// The GEMV's vector operations (see nf4_gemv.h): 16 packed bytes decode into
// two vectors of 16 weights, one permutexvar each (it reads only an index's
// low 4 bits, so the raw byte indexes its low nibble and the byte shifted
// right by 4 its high one).
struct GemvSimd {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kMaxRows = 4;
  static constexpr int kPairedRows = 4;
  using Lut = __m512;
  static __m512 lut(const BlockScales& scales, std::int64_t block) {
    return _mm512_mul_ps(_mm512_loadu_ps(nf4::kCodebook),
                         block_scale16(scales, block, _mm512_set1_ps(scales.offset)));
  }
  static void decode(const std::uint8_t* bytes, __m512 lut, __m512& high, __m512& low) {
    __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    high = _mm512_permutexvar_ps(_mm512_srli_epi32(index, 4), lut);
    low = _mm512_permutexvar_ps(index, lut);
  }
  static __m512 zero() { return _mm512_setzero_ps(); }
  static __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
  static __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
  static __m512 loadu(const float* data) { return _mm512_loadu_ps(data); }
  static float reduce_add(__m512 values) { return _mm512_reduce_add_ps(values); }
  static void prefetch(const std::uint8_t* address) {
    _mm_prefetch(reinterpret_cast<const char*>(address), _MM_HINT_T0);
  }
};

void nf4_dequantize_range_avx512(const std::uint8_t* packed, const BlockScales& scales,
                                 std::int64_t blocksize, std::int64_t begin, std::int64_t end,
                                 void* out, Dtype dtype) {
  const __m512 codebook = _mm512_loadu_ps(nf4::kCodebook);
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
        const float scale = block_scale(scales, block);
        const __m512 lut = _mm512_mul_ps(codebook, _mm512_set1_ps(scale));
        std::int64_t i = segment_begin;
        for (; i + 2 * kLanes <= segment_end; i += 2 * kLanes) {
          __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2));
          // Only the low 4 bits of an index matter, so no masking is needed.
          __m128i high = _mm_srli_epi16(bytes, 4);
          __m512 first = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(high, bytes)), lut);
          __m512 second = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(high, bytes)), lut);
          store16(out, dtype, i - begin, first);
          store16(out, dtype, i - begin + kLanes, second);
        }
        for (; i < segment_end; ++i) {
          tail::store_float(out, dtype, i - begin, nf4::kCodebook[tail::code_at(packed, i)] * scale);
        }
      });
}

// The weight rows' column slices are decoded one row at a time into an
// L1-resident buffer, then added, scaled by each row's gradient, into the
// accumulators (which stay in cache across all out_features rows).
void nf4_gemv_transposed_avx512(const float* grad, std::int64_t rows, const std::uint8_t* packed,
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
    nf4_dequantize_range_avx512(packed, scales, blocksize, flat, flat + width, weights,
                                Dtype::Float32);
    for (std::int64_t row = 0; row < rows; ++row) {
      const float factor = grad[row * out_features + output];
      const __m512 factor_vector = _mm512_set1_ps(factor);
      float* sums = accumulator + row * accumulator_stride;
      std::int64_t k = 0;
      for (; k < vector_end; k += kLanes) {
        _mm512_storeu_ps(sums + k, _mm512_fmadd_ps(factor_vector, _mm512_loadu_ps(weights + k), _mm512_loadu_ps(sums + k)));
      }
      for (; k < width; ++k) sums[k] += factor * weights[k];
    }
  }
}

}  // namespace

const CpuKernels& avx512_kernels() {
  static const CpuKernels table{Isa::Avx512, nf4_quantize_avx512, nf4_dequantize_avx512,
                                nf4_gemv<GemvSimd>, nf4_gemv_transposed_avx512,
                                nf4_dequantize_range_avx512,
                                bf16_dot_product_supported() ? nf4_gemv_avx512bf16 : nullptr};
  return table;
}

}  // namespace cpu
}  // namespace lowrank

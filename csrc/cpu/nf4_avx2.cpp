// AVX2 + FMA + F16C NF4 kernels. Compiled with those flags for this file only
// and reached only through the dispatcher after a runtime CPU check.
#include <immintrin.h>

#include "core/nf4.h"
#include "cpu/isa_tables.h"
#include "cpu/scalar_tail.h"
#include "cpu/nf4_dequantize.h"
#include "cpu/nf4_gemv.h"
#include "cpu/nf4_quantize.h"
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

// Quantization's operations on 16 elements (see nf4_quantize.h).
struct QuantizeSimd {
  using MaxState = __m256i;
  static __m256i max_start() { return _mm256_setzero_si256(); }
  static void magnitude_max(__m256i& state, const void* input, Dtype dtype, std::int64_t index) {
    const __m256i magnitude_mask = _mm256_set1_epi32(0x7fffffff);
    for (std::int64_t half = 0; half < 2; ++half) {
      __m256i bits = _mm256_and_si256(_mm256_castps_si256(load8(input, dtype, index + half * kLanes)),
                                      magnitude_mask);
      state = _mm256_max_epu32(state, bits);
    }
  }
  static std::uint32_t max_finish(__m256i state) {
    alignas(32) std::uint32_t lanes[kLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), state);
    std::uint32_t largest = 0;
    for (std::uint32_t lane : lanes) largest = lane > largest ? lane : largest;
    return largest;
  }
  static void encode16(const void* input, Dtype dtype, std::int64_t index, float factor,
                       bool full_block, std::uint8_t* out) {
    const __m256 factor8 = _mm256_set1_ps(factor);
    __m256i first = encode8(scale8(load8(input, dtype, index), factor8, full_block));
    __m256i second = encode8(scale8(load8(input, dtype, index + kLanes), factor8, full_block));
    pack16(first, second, out);
  }
};

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

// The GEMV's vector operations (see nf4_gemv.h): 8 packed bytes decode into
// two vectors of 8 weights through two 8-entry permutes each (lookup8).
struct GemvSimd {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kMaxRows = 8;
  static constexpr int kPairedRows = 4;
  struct Lut {
    __m256 low, high;
  };
  static Lut lut(const BlockScales& scales, std::int64_t block) {
    const __m256 scale = _mm256_set1_ps(block_scale(scales, block));
    return {_mm256_mul_ps(_mm256_loadu_ps(nf4::kCodebook), scale),
            _mm256_mul_ps(_mm256_loadu_ps(nf4::kCodebook + 8), scale)};
  }
  static void decode(const std::uint8_t* bytes, const Lut& lut, __m256& high, __m256& low) {
    __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    high = lookup8(_mm256_srli_epi32(index, 4), lut.low, lut.high);
    low = lookup8(index, lut.low, lut.high);
  }
  static __m256 zero() { return _mm256_setzero_ps(); }
  static __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
  static __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
  static __m256 loadu(const float* data) { return _mm256_loadu_ps(data); }
  static float reduce_add(__m256 values) { return reduce_add8(values); }
  static void prefetch(const std::uint8_t* address) {
    _mm_prefetch(reinterpret_cast<const char*>(address), _MM_HINT_T0);
  }
  static void decode_ordered(const std::uint8_t* bytes, const Lut& lut, __m256& first,
                             __m256& second) {
    const __m128i nibble = _mm_set1_epi8(0x0f);
    __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
    __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
    __m128i codes = _mm_unpacklo_epi8(high, _mm_and_si128(packed, nibble));  // element order
    first = lookup8(_mm256_cvtepu8_epi32(codes), lut.low, lut.high);
    second = lookup8(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)), lut.low, lut.high);
  }
  static __m256 set1(float value) { return _mm256_set1_ps(value); }
  static void storeu(float* data, __m256 values) { _mm256_storeu_ps(data, values); }
  static void store(void* data, Dtype dtype, std::int64_t index, __m256 values) {
    store8(data, dtype, index, values);
  }
};

}  // namespace

Nf4Kernels nf4_avx2_kernels() {
  return Nf4Kernels{nf4_quantize<QuantizeSimd>, nf4_dequantize<GemvSimd>, nf4_gemv<GemvSimd>,
                    nf4_gemv_transposed<GemvSimd>, nf4_dequantize_range<GemvSimd>, nullptr};
}

}  // namespace cpu
}  // namespace lowrank

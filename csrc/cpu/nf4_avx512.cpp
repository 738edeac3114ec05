// AVX-512 (F/BW/VL/DQ) NF4 kernels. Compiled with those flags for this file
// only and reached only through the dispatcher after a runtime CPU check.
// The 16-entry codebook lookup is one _mm512_permutexvar_ps.
#include <immintrin.h>

#include "core/nf4.h"
#include "cpu/isa_tables.h"
#include "cpu/scalar_tail.h"
#include "cpu/nf4_dequantize.h"
#include "cpu/nf4_gemv.h"
#include "cpu/nf4_quantize.h"
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
inline __m512i encode16_codes(__m512 scaled, __m512 midpoints) {
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

// Quantization's operations on 16 elements (see nf4_quantize.h).
struct QuantizeSimd {
  using MaxState = __m512i;
  static __m512i max_start() { return _mm512_setzero_si512(); }
  static void magnitude_max(__m512i& state, const void* input, Dtype dtype, std::int64_t index) {
    __m512i bits = _mm512_and_si512(_mm512_castps_si512(load16(input, dtype, index)),
                                    _mm512_set1_epi32(0x7fffffff));
    state = _mm512_max_epu32(state, bits);
  }
  static std::uint32_t max_finish(__m512i state) { return _mm512_reduce_max_epu32(state); }
  static void encode16(const void* input, Dtype dtype, std::int64_t index, float factor,
                       bool full_block, std::uint8_t* out) {
    alignas(64) static constexpr float kMidpointTable[16] = {
        nf4::kMidpoints[0],  nf4::kMidpoints[1],  nf4::kMidpoints[2],  nf4::kMidpoints[3],
        nf4::kMidpoints[4],  nf4::kMidpoints[5],  nf4::kMidpoints[6],  nf4::kMidpoints[7],
        nf4::kMidpoints[8],  nf4::kMidpoints[9],  nf4::kMidpoints[10], nf4::kMidpoints[11],
        nf4::kMidpoints[12], nf4::kMidpoints[13], nf4::kMidpoints[14],
        2.0f};  // never selected: candidates stop at 15
    const __m512 midpoints = _mm512_load_ps(kMidpointTable);
    __m512i codes = encode16_codes(
        scale16(load16(input, dtype, index), _mm512_set1_ps(factor), full_block), midpoints);
    __m128i bytes = _mm512_cvtepi32_epi8(codes);
    __m128i pairs = _mm_maddubs_epi16(bytes, _mm_set1_epi16(0x0110));  // c[2i]*16 + c[2i+1]
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(pairs, pairs));
  }
};

// The GEMV's vector operations (see nf4_gemv.h): 16 packed bytes decode into
// two vectors of 16 weights, one permutexvar each (it reads only an index's
// low 4 bits, so the raw byte indexes its low nibble and the byte shifted
// right by 4 its high one).
struct GemvSimd {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kMaxRows = 8;
  static constexpr int kPairedRows = 8;
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
  static void decode_ordered(const std::uint8_t* bytes, __m512 lut, __m512& first,
                             __m512& second) {
    __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    // Only the low 4 bits of an index matter, so no masking is needed.
    __m128i high = _mm_srli_epi16(packed, 4);
    first = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(high, packed)), lut);
    second = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(high, packed)), lut);
  }
  static __m512 set1(float value) { return _mm512_set1_ps(value); }
  static void storeu(float* data, __m512 values) { _mm512_storeu_ps(data, values); }
  static void store(void* data, Dtype dtype, std::int64_t index, __m512 values) {
    store16(data, dtype, index, values);
  }
};

}  // namespace

Nf4Kernels nf4_avx512_kernels() {
  return Nf4Kernels{nf4_quantize<QuantizeSimd>, nf4_dequantize<GemvSimd>, nf4_gemv<GemvSimd>,
                    nf4_gemv_transposed<GemvSimd>, nf4_dequantize_range<GemvSimd>, nullptr};
}

}  // namespace cpu
}  // namespace lowrank

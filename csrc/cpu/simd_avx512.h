// AVX-512 helpers shared by the AVX-512 kernel files. Include only from
// *_avx512.cpp: everything here needs those flags, and is `static` so no
// AVX-512 code is shared across translation units (see kernels.h).
#pragma once

#include <immintrin.h>

namespace lowrank {
namespace cpu {
namespace avx512 {

// fp32 -> bf16 with round-to-nearest-even in integer arithmetic (the BF16
// instruction would flush subnormals); NaN becomes the canonical NaN.
static inline __m256i to_bf16(__m512 values) {
  __m512i bits = _mm512_castps_si512(values);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 is_nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, is_nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(rounded);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace lowrank

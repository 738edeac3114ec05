// AVX-512 helpers shared by the AVX-512 kernel files. Include only from
// *_avx512.cpp and *_avx512bf16.cpp: everything here needs those flags, and is `static` so no
// AVX-512 code is shared across translation units (see kernels.h).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/kernels.h"

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

static inline __m512 load16(const void* data, Dtype dtype, std::int64_t index) {
  switch (dtype) {
    case Dtype::Float32:
      return _mm512_loadu_ps(static_cast<const float*>(data) + index);
    case Dtype::BFloat16: {
      __m256i half = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(data) + index));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    case Dtype::Float16: {
      __m256i half = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(data) + index));
      return _mm512_cvtph_ps(half);
    }
  }
  return _mm512_setzero_ps();
}

static inline void store16(void* data, Dtype dtype, std::int64_t index, __m512 values) {
  switch (dtype) {
    case Dtype::Float32:
      _mm512_storeu_ps(static_cast<float*>(data) + index, values);
      return;
    case Dtype::BFloat16:
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<std::uint16_t*>(data) + index),
                          to_bf16(values));
      return;
    case Dtype::Float16:
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<std::uint16_t*>(data) + index),
                          _mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT));
      return;
  }
}

// A block's scale broadcast to all lanes, computed in vector registers from
// broadcast loads: the same fp32 roundings as block_scale (every lane does
// the scalar computation), without moving a scalar result into a vector,
// which would take a shuffle slot that the decode steps need.
static inline __m512 block_scale16(const BlockScales& scales, std::int64_t block, __m512 offset) {
  if (scales.nested_codes == nullptr) return _mm512_set1_ps(scales.absmax[block]);
  __m512 code = _mm512_set1_ps(scales.nested_code[scales.nested_codes[block]]);
  __m512 nested = _mm512_set1_ps(scales.nested_absmax[block / 256]);
  return _mm512_add_ps(_mm512_mul_ps(code, nested), offset);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace lowrank

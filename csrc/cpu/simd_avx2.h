// AVX2 (+F16C) loads and stores of fp32 / bf16 / fp16 activations, shared by
// the AVX2 kernel files. Include only from *_avx2.cpp: everything here needs
// those flags, and is `static` so no AVX2 code is shared across translation
// units (see kernels.h).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/kernels.h"

namespace lowrank {
namespace cpu {
namespace avx2 {

static inline __m256 load8(const void* data, Dtype dtype, std::int64_t index) {
  switch (dtype) {
    case Dtype::Float32:
      return _mm256_loadu_ps(static_cast<const float*>(data) + index);
    case Dtype::BFloat16: {
      __m128i half = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(data) + index));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    }
    case Dtype::Float16: {
      __m128i half = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(data) + index));
      return _mm256_cvtph_ps(half);
    }
  }
  return _mm256_setzero_ps();
}

// fp32 -> bf16 with round-to-nearest-even; NaN becomes the canonical NaN.
static inline __m128i to_bf16(__m256 values) {
  __m256i bits = _mm256_castps_si256(values);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256 is_nan = _mm256_cmp_ps(values, values, _CMP_UNORD_Q);
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(is_nan));
  __m256i packed = _mm256_packus_epi32(rounded, rounded);  // per 128-bit lane
  packed = _mm256_permute4x64_epi64(packed, 0x08);          // lanes 0 and 2 to the bottom
  return _mm256_castsi256_si128(packed);
}

static inline void store8(void* data, Dtype dtype, std::int64_t index, __m256 values) {
  switch (dtype) {
    case Dtype::Float32:
      _mm256_storeu_ps(static_cast<float*>(data) + index, values);
      return;
    case Dtype::BFloat16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<std::uint16_t*>(data) + index),
                       to_bf16(values));
      return;
    case Dtype::Float16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<std::uint16_t*>(data) + index),
                       _mm256_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT));
      return;
  }
}

}  // namespace avx2
}  // namespace cpu
}  // namespace lowrank

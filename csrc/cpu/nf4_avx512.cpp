// AVX-512 (F/BW/VL/DQ) NF4 kernels. Compiled with those flags for this file
// only and reached only through the dispatcher after a runtime CPU check.
// The 16-entry codebook lookup is one _mm512_permutexvar_ps.
#include <immintrin.h>

#include "core/nf4.h"
#include "cpu/kernels.h"
#include "cpu/scalar_tail.h"

namespace lowrank {
namespace cpu {
namespace {

constexpr std::int64_t kLanes = 16;

inline __m512 load16(const void* data, Dtype dtype, std::int64_t index) {
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

// fp32 -> bf16 with round-to-nearest-even in integer arithmetic (the BF16
// instruction would flush subnormals); NaN becomes the canonical NaN.
inline __m256i to_bf16(__m512 values) {
  __m512i bits = _mm512_castps_si512(values);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 is_nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, is_nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(rounded);
}

inline void store16(void* data, Dtype dtype, std::int64_t index, __m512 values) {
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

}  // namespace

const CpuKernels& avx512_kernels() {
  static const CpuKernels table{Isa::Avx512, nf4_quantize_avx512, nf4_dequantize_avx512};
  return table;
}

}  // namespace cpu
}  // namespace lowrank

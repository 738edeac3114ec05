// AVX-512 dropout kernel: 16 hashes per step; the same integer arithmetic as
// dropout_hash, so the mask equals the scalar one.
#include <immintrin.h>

#include "cpu/dropout_kernels.h"
#include "cpu/scalar_tail.h"
#include "cpu/simd_avx512.h"

namespace lowrank {
namespace cpu {
namespace {

constexpr std::int64_t kLanes = 16;

inline __m512i hash16(__m512i index_low, __m512i seed_low, __m512i mixed_high) {
  __m512i x = _mm512_add_epi32(_mm512_mullo_epi32(index_low, _mm512_set1_epi32(0x9e3779b1u)),
                               seed_low);
  x = _mm512_xor_si512(x, mixed_high);
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x85ebca6bu));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0xc2b2ae35u));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

void dropout_avx512(const void* input, void* out, Dtype dtype, std::int64_t begin,
                    std::int64_t end, std::uint64_t seed, std::uint32_t threshold, float scale) {
  const auto index_high = static_cast<std::uint32_t>(begin >> 32);
  const __m512i seed_low = _mm512_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(seed)));
  const __m512i mixed_high = _mm512_set1_epi32(static_cast<int>(
      static_cast<std::uint32_t>(seed >> 32) ^ (index_high * 0x85ebca77u)));
  const __m512i limit = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512 scale16 = _mm512_set1_ps(scale);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  std::int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(i))), lane);
    __mmask16 keep = _mm512_cmpge_epu32_mask(hash16(index, seed_low, mixed_high), limit);
    __m512 kept = _mm512_maskz_mul_ps(keep, avx512::load16(input, dtype, i), scale16);
    avx512::store16(out, dtype, i, kept);
  }
  for (; i < end; ++i) {
    bool keep = dropout_hash(static_cast<std::uint32_t>(i), index_high, seed) >= threshold;
    tail::store_float(out, dtype, i, keep ? tail::load_float(input, dtype, i) * scale : 0.0f);
  }
}

}  // namespace

const DropoutKernels& dropout_avx512_kernels() {
  static const DropoutKernels table{dropout_avx512};
  return table;
}

}  // namespace cpu
}  // namespace lowrank

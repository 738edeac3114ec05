// AVX2 dropout kernel: 8 hashes per step with 32-bit lane multiplies; the
// same integer arithmetic as dropout_hash, so the mask equals the scalar one.
#include <immintrin.h>

#include "cpu/dropout_kernels.h"
#include "cpu/scalar_tail.h"
#include "cpu/simd_avx2.h"

namespace lowrank {
namespace cpu {
namespace {

constexpr std::int64_t kLanes = 8;

inline __m256i hash8(__m256i index_low, __m256i seed_low, __m256i mixed_high) {
  __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(index_low, _mm256_set1_epi32(0x9e3779b1u)),
                               seed_low);
  x = _mm256_xor_si256(x, mixed_high);
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x85ebca6bu));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0xc2b2ae35u));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

void dropout_avx2(const void* input, void* out, Dtype dtype, std::int64_t begin,
                  std::int64_t end, std::uint64_t seed, std::uint32_t threshold, float scale) {
  const auto index_high = static_cast<std::uint32_t>(begin >> 32);
  const __m256i seed_low = _mm256_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(seed)));
  const __m256i mixed_high = _mm256_set1_epi32(static_cast<int>(
      static_cast<std::uint32_t>(seed >> 32) ^ (index_high * 0x85ebca77u)));
  // Unsigned hash >= threshold, via a signed compare after flipping the sign bits.
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i limit = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(threshold)), sign);
  const __m256 scale8 = _mm256_set1_ps(scale);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  std::int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(i))), lane);
    __m256i hash = _mm256_xor_si256(hash8(index, seed_low, mixed_high), sign);
    __m256i dropped = _mm256_cmpgt_epi32(limit, hash);  // hash < threshold
    __m256 kept = _mm256_mul_ps(avx2::load8(input, dtype, i), scale8);
    avx2::store8(out, dtype, i, _mm256_andnot_ps(_mm256_castsi256_ps(dropped), kept));
  }
  for (; i < end; ++i) {
    bool keep = dropout_hash(static_cast<std::uint32_t>(i), index_high, seed) >= threshold;
    tail::store_float(out, dtype, i, keep ? tail::load_float(input, dtype, i) * scale : 0.0f);
  }
}

}  // namespace

const DropoutKernels& dropout_avx2_kernels() {
  static const DropoutKernels table{dropout_avx2};
  return table;
}

}  // namespace cpu
}  // namespace lowrank

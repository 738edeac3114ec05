// AVX2 dropout kernel: the loop of dropout_body.h over 8 lanes, 32-bit lane
// multiplies for the hash.
#include <immintrin.h>

#include "cpu/dropout_body.h"
#include "cpu/isa_tables.h"
#include "cpu/simd_avx2.h"

namespace lowrank {
namespace cpu {
namespace {

struct DropoutSimd {
  using Vec = __m256;
  using Ints = __m256i;
  static constexpr std::int64_t kLanes = 8;
  static __m256i ints(std::uint32_t value) { return _mm256_set1_epi32(static_cast<int>(value)); }
  static __m256i lane_indices(std::uint32_t first) {
    return _mm256_add_epi32(ints(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static __m256i add(__m256i a, __m256i b) { return _mm256_add_epi32(a, b); }
  static __m256i mullo(__m256i a, __m256i b) { return _mm256_mullo_epi32(a, b); }
  static __m256i xor_bits(__m256i a, __m256i b) { return _mm256_xor_si256(a, b); }
  template <int N>
  static __m256i shift_right(__m256i a) { return _mm256_srli_epi32(a, N); }
  static __m256 set1(float value) { return _mm256_set1_ps(value); }
  static __m256 load(const void* data, Dtype dtype, std::int64_t index) {
    return avx2::load8(data, dtype, index);
  }
  static void store(void* data, Dtype dtype, std::int64_t index, __m256 values) {
    avx2::store8(data, dtype, index, values);
  }
  static __m256 keep_scaled(__m256i hash, std::uint32_t threshold, __m256 values, __m256 scale) {
    // Unsigned hash >= threshold, via a signed compare after flipping the sign bits.
    const __m256i sign = ints(0x80000000u);
    const __m256i dropped = _mm256_cmpgt_epi32(_mm256_xor_si256(ints(threshold), sign),
                                               _mm256_xor_si256(hash, sign));  // hash < threshold
    return _mm256_andnot_ps(_mm256_castsi256_ps(dropped), _mm256_mul_ps(values, scale));
  }
};

}  // namespace

DropoutKernels dropout_avx2_kernels() { return DropoutKernels{dropout_apply<DropoutSimd>}; }

}  // namespace cpu
}  // namespace lowrank

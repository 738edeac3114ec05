// AVX-512 dropout kernel: the loop of dropout_body.h over 16 lanes.
#include <immintrin.h>

#include "cpu/dropout_body.h"
#include "cpu/isa_tables.h"
#include "cpu/simd_avx512.h"

namespace lowrank {
namespace cpu {
namespace {

struct DropoutSimd {
  using Vec = __m512;
  using Ints = __m512i;
  static constexpr std::int64_t kLanes = 16;
  static __m512i ints(std::uint32_t value) { return _mm512_set1_epi32(static_cast<int>(value)); }
  static __m512i lane_indices(std::uint32_t first) {
    return _mm512_add_epi32(
        ints(first), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
  static __m512i add(__m512i a, __m512i b) { return _mm512_add_epi32(a, b); }
  static __m512i mullo(__m512i a, __m512i b) { return _mm512_mullo_epi32(a, b); }
  static __m512i xor_bits(__m512i a, __m512i b) { return _mm512_xor_si512(a, b); }
  template <int N>
  static __m512i shift_right(__m512i a) { return _mm512_srli_epi32(a, N); }
  static __m512 set1(float value) { return _mm512_set1_ps(value); }
  static __m512 load(const void* data, Dtype dtype, std::int64_t index) {
    return avx512::load16(data, dtype, index);
  }
  static void store(void* data, Dtype dtype, std::int64_t index, __m512 values) {
    avx512::store16(data, dtype, index, values);
  }
  static __m512 keep_scaled(__m512i hash, std::uint32_t threshold, __m512 values, __m512 scale) {
    const __mmask16 keep = _mm512_cmpge_epu32_mask(hash, ints(threshold));
    return _mm512_maskz_mul_ps(keep, values, scale);
  }
};

}  // namespace

DropoutKernels dropout_avx512_kernels() { return DropoutKernels{dropout_apply<DropoutSimd>}; }

}  // namespace cpu
}  // namespace lowrank

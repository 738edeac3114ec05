// AVX2 + FMA + F16C multi-adapter LoRA kernels: the loops of
// multi_lora_blocked.h over 8-lane vectors. Compiled with those flags for
// this file only and reached only through kernels_for() / active_kernels()
// (dispatch.cpp) after the runtime CPU check. AVX2 has no masked 16-bit
// loads, so partial vectors go through a zero-padded stack buffer and the
// shared scalar helpers.
#include <immintrin.h>

#include "cpu/multi_lora_blocked.h"
#include "cpu/isa_tables.h"
#include "cpu/scalar_tail.h"
#include "cpu/simd_avx2.h"

namespace lowrank {
namespace cpu {
namespace {

using avx2::load8;

constexpr std::int64_t kLanes = 8;

// The first `count` elements from `index` on (none for count <= 0); the other
// lanes are zero. Partial vectors use AVX masked loads, which never touch the
// masked-off elements: fp32 directly, 16-bit data as 32-bit pairs plus, for
// an odd count, the last element on its own. (Partial vectors are the common
// case for adapters whose rank is not a multiple of 8, as AdaLoRA produces: a
// scalar copy there made rank 4 slower than rank 8.)
inline __m256 load8_partial(const void* data, Dtype dtype, std::int64_t index, std::int64_t count) {
  if (count >= kLanes) return load8(data, dtype, index);
  if (count <= 0) return _mm256_setzero_ps();
  if (dtype == Dtype::Float32) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_ps(static_cast<const float*>(data) + index, mask);
  }
  const auto* halves = static_cast<const std::uint16_t*>(data) + index;
  const __m128i pair_mask =
      _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(count / 2)), _mm_setr_epi32(0, 1, 2, 3));
  __m128i packed = _mm_maskload_epi32(reinterpret_cast<const int*>(halves), pair_mask);
  if (count % 2 != 0) {
    // count is 1, 3, 5 or 7: the last element goes to 16-bit lane count - 1.
    alignas(16) std::uint16_t lanes[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(lanes), packed);
    lanes[count - 1] = halves[count - 1];
    packed = _mm_load_si128(reinterpret_cast<const __m128i*>(lanes));
  }
  if (dtype == Dtype::BFloat16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(packed), 16));
  }
  return _mm256_cvtph_ps(packed);
}

// Stores the first `count` lanes at `index`.
inline void store8_partial(void* data, Dtype dtype, std::int64_t index, __m256 values,
                           std::int64_t count) {
  if (count < kLanes) {
    alignas(32) float buffer[kLanes];
    _mm256_store_ps(buffer, values);
    for (std::int64_t i = 0; i < count; ++i) tail::store_float(data, dtype, index + i, buffer[i]);
    return;
  }
  avx2::store8(data, dtype, index, values);
}

inline float reduce_add(__m256 values) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(values), _mm256_extractf128_ps(values, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// In-register transpose: rows[l] lane k becomes rows[k] lane l.
inline void transpose8(__m256 rows[8]) {
  __m256 pairs[8];
  for (int i = 0; i < 8; i += 2) {
    pairs[i] = _mm256_unpacklo_ps(rows[i], rows[i + 1]);
    pairs[i + 1] = _mm256_unpackhi_ps(rows[i], rows[i + 1]);
  }
  // quads[4 * g + j] holds columns j and j + 4 of rows 4g .. 4g + 3.
  __m256 quads[8];
  for (int g = 0; g < 2; ++g) {
    quads[4 * g + 0] = _mm256_shuffle_ps(pairs[4 * g], pairs[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
    quads[4 * g + 1] = _mm256_shuffle_ps(pairs[4 * g], pairs[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
    quads[4 * g + 2] =
        _mm256_shuffle_ps(pairs[4 * g + 1], pairs[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
    quads[4 * g + 3] =
        _mm256_shuffle_ps(pairs[4 * g + 1], pairs[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    rows[j] = _mm256_permute2f128_ps(quads[j], quads[4 + j], 0x20);
    rows[j + 4] = _mm256_permute2f128_ps(quads[j], quads[4 + j], 0x31);
  }
}

struct Avx2 {
  using Vec = __m256;
  static constexpr std::int64_t kLanes = ::lowrank::cpu::kLanes;
  // Accumulators per shrink block: 8 of the 16 registers, the rest hold the
  // block's input and A vectors.
  static constexpr int kRanksOf4Rows = 2;
  static constexpr int kRanksOf2Rows = 4;
  static constexpr int kRanksOf1Row = 8;

  using Lanes = std::int64_t;  // a count: masked loads, partial stores through a buffer
  static Lanes first(std::int64_t count) { return count; }
  template <Dtype D>
  static Vec load(const void* data, std::int64_t index, Lanes count) {
    return load8_partial(data, D, index, count);
  }
  template <Dtype D>
  static void store(void* data, std::int64_t index, Vec values, Lanes count) {
    store8_partial(data, D, index, values, count);
  }
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float value) { return _mm256_set1_ps(value); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float reduce_add(Vec values) { return ::lowrank::cpu::reduce_add(values); }
  static Vec loadu(const float* data) { return _mm256_loadu_ps(data); }
  static void storeu(float* data, Vec values) { _mm256_storeu_ps(data, values); }
  static void transpose(Vec rows[8]) { transpose8(rows); }
};

}  // namespace

MultiLoraKernels multi_lora_avx2_kernels() { return blocked_kernels<Avx2>(); }

}  // namespace cpu
}  // namespace lowrank

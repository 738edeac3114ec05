// AVX-512 (F/BW/VL/DQ) multi-adapter LoRA kernels: the loops of
// multi_lora_blocked.h over 16-lane vectors. Compiled with those flags for
// this file only and reached only through kernels_for() / active_kernels()
// (dispatch.cpp) after the runtime CPU check. Tails use masked loads and
// stores, so no element outside a row is ever read or written.
#include <immintrin.h>

#include "cpu/multi_lora_blocked.h"
#include "cpu/isa_tables.h"
#include "cpu/simd_avx512.h"

namespace lowrank {
namespace cpu {
namespace {

using avx512::to_bf16;

constexpr std::int64_t kLanes = 16;

// The first `count` lanes (none for count <= 0).
inline __mmask16 first_lanes(std::int64_t count) {
  if (count <= 0) return 0;
  return count >= kLanes ? static_cast<__mmask16>(0xffff)
                         : static_cast<__mmask16>((1u << count) - 1u);
}

// Loads the lanes of `mask` (others are zero) from element `index` on.
template <Dtype D>
inline __m512 load16(const void* data, std::int64_t index, __mmask16 mask) {
  if constexpr (D == Dtype::Float32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(data) + index);
  } else {
    __m256i half = _mm256_maskz_loadu_epi16(mask, static_cast<const std::uint16_t*>(data) + index);
    if constexpr (D == Dtype::BFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    } else {
      return _mm512_cvtph_ps(half);
    }
  }
}

template <Dtype D>
inline void store16(void* data, std::int64_t index, __m512 values, __mmask16 mask) {
  if constexpr (D == Dtype::Float32) {
    _mm512_mask_storeu_ps(static_cast<float*>(data) + index, mask, values);
  } else if constexpr (D == Dtype::BFloat16) {
    _mm256_mask_storeu_epi16(static_cast<std::uint16_t*>(data) + index, mask, to_bf16(values));
  } else {
    _mm256_mask_storeu_epi16(static_cast<std::uint16_t*>(data) + index, mask,
                             _mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT));
  }
}

// In-register transpose: rows[l] lane k becomes rows[k] lane l.
inline void transpose16(__m512 rows[16]) {
  __m512 pairs[16];
  for (int i = 0; i < 16; i += 2) {
    pairs[i] = _mm512_unpacklo_ps(rows[i], rows[i + 1]);
    pairs[i + 1] = _mm512_unpackhi_ps(rows[i], rows[i + 1]);
  }
  // quads[4 * g + j] holds column j, j + 4, j + 8, j + 12 of rows 4g .. 4g + 3,
  // one column per 128-bit lane.
  __m512 quads[16];
  for (int g = 0; g < 4; ++g) {
    const __m512d low = _mm512_castps_pd(pairs[4 * g]);
    const __m512d low_next = _mm512_castps_pd(pairs[4 * g + 2]);
    const __m512d high = _mm512_castps_pd(pairs[4 * g + 1]);
    const __m512d high_next = _mm512_castps_pd(pairs[4 * g + 3]);
    quads[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(low, low_next));
    quads[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(low, low_next));
    quads[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(high, high_next));
    quads[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(high, high_next));
  }
  for (int j = 0; j < 4; ++j) {
    // 0x88 picks 128-bit lanes (0, 2) of each source, 0xdd lanes (1, 3).
    const __m512 top_even = _mm512_shuffle_f32x4(quads[j], quads[4 + j], 0x88);
    const __m512 top_odd = _mm512_shuffle_f32x4(quads[j], quads[4 + j], 0xdd);
    const __m512 bottom_even = _mm512_shuffle_f32x4(quads[8 + j], quads[12 + j], 0x88);
    const __m512 bottom_odd = _mm512_shuffle_f32x4(quads[8 + j], quads[12 + j], 0xdd);
    rows[j] = _mm512_shuffle_f32x4(top_even, bottom_even, 0x88);
    rows[j + 8] = _mm512_shuffle_f32x4(top_even, bottom_even, 0xdd);
    rows[j + 4] = _mm512_shuffle_f32x4(top_odd, bottom_odd, 0x88);
    rows[j + 12] = _mm512_shuffle_f32x4(top_odd, bottom_odd, 0xdd);
  }
}

struct Avx512 {
  using Vec = __m512;
  static constexpr std::int64_t kLanes = 16;
  // Accumulators per shrink block: 16, 16 and 8 of the 32 registers.
  static constexpr int kRanksOf4Rows = 4;
  static constexpr int kRanksOf2Rows = 8;
  static constexpr int kRanksOf1Row = 8;

  using Lanes = __mmask16;
  static Lanes first(std::int64_t count) { return first_lanes(count); }
  template <Dtype D>
  static Vec load(const void* data, std::int64_t index, Lanes lanes) {
    return load16<D>(data, index, lanes);
  }
  template <Dtype D>
  static void store(void* data, std::int64_t index, Vec values, Lanes lanes) {
    store16<D>(data, index, values, lanes);
  }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float value) { return _mm512_set1_ps(value); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce_add(Vec values) { return _mm512_reduce_add_ps(values); }
  static Vec loadu(const float* data) { return _mm512_loadu_ps(data); }
  static void storeu(float* data, Vec values) { _mm512_storeu_ps(data, values); }
  static void transpose(Vec rows[16]) { transpose16(rows); }
};

}  // namespace

MultiLoraKernels multi_lora_avx512_kernels() { return blocked_kernels<Avx512>(); }

}  // namespace cpu
}  // namespace lowrank

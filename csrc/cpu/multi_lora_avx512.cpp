// AVX-512 (F/BW/VL/DQ) multi-adapter LoRA kernels. Compiled with those flags
// for this file only and reached only through multi_lora_kernels_for() after
// the dispatcher's runtime CPU check. Tails use masked loads and stores, so
// no element outside a row is ever read or written.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/multi_lora_kernels.h"
#include "cpu/simd_avx512.h"

namespace lowrank {
namespace cpu {
namespace {

using avx512::to_bf16;

constexpr std::int64_t kLanes = 16;
// Rows of one adapter that share each load of an A row in the shrink.
constexpr int kShrinkRows = 4;

inline __mmask16 first_lanes(std::int64_t count) {
  return count >= kLanes ? static_cast<__mmask16>(0xffff)
                         : static_cast<__mmask16>((1u << count) - 1u);
}

// Loads the lanes of `mask` (others are zero) from element `index` on.
inline __m512 load16(const void* data, Dtype dtype, std::int64_t index, __mmask16 mask) {
  switch (dtype) {
    case Dtype::Float32:
      return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(data) + index);
    case Dtype::BFloat16: {
      __m256i half = _mm256_maskz_loadu_epi16(mask, static_cast<const std::uint16_t*>(data) + index);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    case Dtype::Float16:
      return _mm512_cvtph_ps(
          _mm256_maskz_loadu_epi16(mask, static_cast<const std::uint16_t*>(data) + index));
  }
  return _mm512_setzero_ps();
}

inline void store16(void* data, Dtype dtype, std::int64_t index, __m512 values, __mmask16 mask) {
  switch (dtype) {
    case Dtype::Float32:
      _mm512_mask_storeu_ps(static_cast<float*>(data) + index, mask, values);
      return;
    case Dtype::BFloat16:
      _mm256_mask_storeu_epi16(static_cast<std::uint16_t*>(data) + index, mask, to_bf16(values));
      return;
    case Dtype::Float16:
      _mm256_mask_storeu_epi16(static_cast<std::uint16_t*>(data) + index, mask,
                               _mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT));
      return;
  }
}

// Dot products of `Rows` input rows with one A row, sharing each A load.
template <int Rows>
void dot_rows(const MultiLoraBatch& batch, const std::int64_t* x_offsets, std::int64_t a_offset,
              float* sums) {
  __m512 accumulators[Rows];
  for (int i = 0; i < Rows; ++i) accumulators[i] = _mm512_setzero_ps();
  for (std::int64_t j = 0; j < batch.in_features; j += kLanes) {
    const __mmask16 mask = first_lanes(batch.in_features - j);
    const __m512 a = load16(batch.lora_A, batch.dtype, a_offset + j, mask);
    for (int i = 0; i < Rows; ++i) {
      accumulators[i] = _mm512_fmadd_ps(load16(batch.input, batch.dtype, x_offsets[i] + j, mask),
                                        a, accumulators[i]);
    }
  }
  for (int i = 0; i < Rows; ++i) sums[i] = _mm512_reduce_add_ps(accumulators[i]);
}

void shrink_avx512(const MultiLoraBatch& batch, std::int64_t adapter, std::int64_t rank_begin,
                   std::int64_t rank_end, float* hidden) {
  const std::int64_t group_begin = batch.group_offsets[adapter];
  const std::int64_t group_end = batch.group_offsets[adapter + 1];
  const float scaling = batch.scalings[adapter];
  for (std::int64_t k = rank_begin; k < rank_end; ++k) {
    const std::int64_t a_offset = (adapter * batch.max_rank + k) * batch.in_features;
    for (std::int64_t p = group_begin; p < group_end; p += kShrinkRows) {
      const int rows = static_cast<int>(std::min<std::int64_t>(kShrinkRows, group_end - p));
      std::int64_t x_offsets[kShrinkRows];
      for (int i = 0; i < rows; ++i) x_offsets[i] = batch.sorted_rows[p + i] * batch.in_features;
      float sums[kShrinkRows];
      switch (rows) {
        case 4: dot_rows<4>(batch, x_offsets, a_offset, sums); break;
        case 3: dot_rows<3>(batch, x_offsets, a_offset, sums); break;
        case 2: dot_rows<2>(batch, x_offsets, a_offset, sums); break;
        default: dot_rows<1>(batch, x_offsets, a_offset, sums); break;
      }
      for (int i = 0; i < rows; ++i) hidden[(p + i) * batch.max_rank + k] = scaling * sums[i];
    }
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

// B is [out, max_rank]: a rank's values for 16 consecutive outputs are strided.
// Each 16x16 tile of B is transposed in registers into `columns`
// ([rank][16] fp32), then every row of the adapter costs `rank` FMAs per 16
// outputs with B read from memory once. Adapters are the outer loop: each
// adapter's slice of B is then one sequential stream (rows of different
// adapters are disjoint, so no output is revisited).
void expand_avx512(const MultiLoraBatch& batch, const float* hidden, std::int64_t out_begin,
                   std::int64_t out_end, void* out) {
  const std::int64_t max_rank = batch.max_rank;
  std::vector<float> columns(static_cast<std::size_t>((max_rank + kLanes - 1) / kLanes * kLanes *
                                                      kLanes));
  for (std::int64_t adapter = 0; adapter < batch.num_adapters; ++adapter) {
    const std::int64_t rank = batch.ranks[adapter];
    const std::int64_t group_begin = batch.group_offsets[adapter];
    const std::int64_t group_end = batch.group_offsets[adapter + 1];
    if (rank == 0 || group_begin == group_end) continue;
    for (std::int64_t o = out_begin; o < out_end; o += kLanes) {
      const std::int64_t width = std::min(kLanes, out_end - o);
      const __mmask16 out_mask = first_lanes(width);
      const std::int64_t b_offset = (adapter * batch.out_features + o) * max_rank;
      for (std::int64_t k = 0; k < rank; k += kLanes) {
        const __mmask16 rank_mask = first_lanes(rank - k);
        __m512 tile[16];
        for (std::int64_t l = 0; l < kLanes; ++l) {
          tile[l] = l < width ? load16(batch.lora_B, batch.dtype, b_offset + l * max_rank + k,
                                       rank_mask)
                              : _mm512_setzero_ps();
        }
        transpose16(tile);
        for (std::int64_t l = 0; l < kLanes; ++l) _mm512_storeu_ps(&columns[(k + l) * kLanes], tile[l]);
      }
      for (std::int64_t p = group_begin; p < group_end; ++p) {
        const float* h = hidden + p * max_rank;
        __m512 sum = _mm512_setzero_ps();
        for (std::int64_t k = 0; k < rank; ++k) {
          sum = _mm512_fmadd_ps(_mm512_set1_ps(h[k]), _mm512_loadu_ps(&columns[k * kLanes]), sum);
        }
        const std::int64_t y_offset = batch.sorted_rows[p] * batch.out_features + o;
        store16(out, batch.dtype, y_offset,
                _mm512_add_ps(load16(out, batch.dtype, y_offset, out_mask), sum), out_mask);
      }
    }
  }
}

}  // namespace

const MultiLoraKernels& multi_lora_avx512_kernels() {
  static const MultiLoraKernels table{Isa::Avx512, &shrink_avx512, &expand_avx512};
  return table;
}

}  // namespace cpu
}  // namespace lowrank

// AVX2 + FMA + F16C multi-adapter LoRA kernels. Compiled with those flags for
// this file only and reached only through multi_lora_kernels_for() after the
// dispatcher's runtime CPU check. AVX2 has no masked 16-bit loads, so partial
// vectors go through a zero-padded stack buffer and the shared scalar helpers.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/multi_lora_kernels.h"
#include "cpu/scalar_tail.h"
#include "cpu/simd_avx2.h"

namespace lowrank {
namespace cpu {
namespace {

using avx2::load8;

constexpr std::int64_t kLanes = 8;
// Rows of one adapter that share each load of an A row in the shrink.
constexpr int kShrinkRows = 4;

// The first `count` (<= 8) elements from `index` on; the other lanes are zero.
inline __m256 load8_partial(const void* data, Dtype dtype, std::int64_t index, std::int64_t count) {
  if (count >= kLanes) return load8(data, dtype, index);
  alignas(32) float buffer[kLanes] = {};
  for (std::int64_t i = 0; i < count; ++i) buffer[i] = tail::load_float(data, dtype, index + i);
  return _mm256_load_ps(buffer);
}

// Stores the first `count` (<= 8) lanes at `index`.
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

// Dot products of `Rows` input rows with one A row, sharing each A load.
template <int Rows>
void dot_rows(const MultiLoraBatch& batch, const std::int64_t* x_offsets, std::int64_t a_offset,
              float* sums) {
  __m256 accumulators[Rows];
  for (int i = 0; i < Rows; ++i) accumulators[i] = _mm256_setzero_ps();
  for (std::int64_t j = 0; j < batch.in_features; j += kLanes) {
    const std::int64_t count = batch.in_features - j;
    const __m256 a = load8_partial(batch.lora_A, batch.dtype, a_offset + j, count);
    for (int i = 0; i < Rows; ++i) {
      accumulators[i] = _mm256_fmadd_ps(
          load8_partial(batch.input, batch.dtype, x_offsets[i] + j, count), a, accumulators[i]);
    }
  }
  for (int i = 0; i < Rows; ++i) sums[i] = reduce_add(accumulators[i]);
}

void shrink_avx2(const MultiLoraBatch& batch, std::int64_t adapter, std::int64_t rank_begin,
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
        case 4:
          dot_rows<4>(batch, x_offsets, a_offset, sums);
          break;
        case 3:
          dot_rows<3>(batch, x_offsets, a_offset, sums);
          break;
        case 2:
          dot_rows<2>(batch, x_offsets, a_offset, sums);
          break;
        default:
          dot_rows<1>(batch, x_offsets, a_offset, sums);
          break;
      }
      for (int i = 0; i < rows; ++i) hidden[(p + i) * batch.max_rank + k] = scaling * sums[i];
    }
  }
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

// Same scheme as the AVX-512 expand with 8x8 tiles: B [out, max_rank] is
// transposed tile by tile into `columns` ([rank][8] fp32), read once per call.
void expand_avx2(const MultiLoraBatch& batch, const float* hidden, std::int64_t out_begin,
                 std::int64_t out_end, void* out) {
  const std::int64_t max_rank = batch.max_rank;
  std::vector<float> columns(
      static_cast<std::size_t>((max_rank + kLanes - 1) / kLanes * kLanes * kLanes));
  for (std::int64_t adapter = 0; adapter < batch.num_adapters; ++adapter) {
    const std::int64_t rank = batch.ranks[adapter];
    const std::int64_t group_begin = batch.group_offsets[adapter];
    const std::int64_t group_end = batch.group_offsets[adapter + 1];
    if (rank == 0 || group_begin == group_end) continue;
    for (std::int64_t o = out_begin; o < out_end; o += kLanes) {
      const std::int64_t width = std::min(kLanes, out_end - o);
      const std::int64_t b_offset = (adapter * batch.out_features + o) * max_rank;
      for (std::int64_t k = 0; k < rank; k += kLanes) {
        __m256 tile[8];
        for (std::int64_t l = 0; l < kLanes; ++l) {
          tile[l] = l < width ? load8_partial(batch.lora_B, batch.dtype,
                                              b_offset + l * max_rank + k, rank - k)
                              : _mm256_setzero_ps();
        }
        transpose8(tile);
        for (std::int64_t l = 0; l < kLanes; ++l)
          _mm256_storeu_ps(&columns[(k + l) * kLanes], tile[l]);
      }
      for (std::int64_t p = group_begin; p < group_end; ++p) {
        const float* h = hidden + p * max_rank;
        __m256 sum = _mm256_setzero_ps();
        for (std::int64_t k = 0; k < rank; ++k) {
          sum = _mm256_fmadd_ps(_mm256_set1_ps(h[k]), _mm256_loadu_ps(&columns[k * kLanes]), sum);
        }
        const std::int64_t y_offset = batch.sorted_rows[p] * batch.out_features + o;
        store8_partial(
            out, batch.dtype, y_offset,
            _mm256_add_ps(load8_partial(batch.base_output, batch.dtype, y_offset, width), sum),
            width);
      }
    }
  }
}

}  // namespace

const MultiLoraKernels& multi_lora_avx2_kernels() {
  static const MultiLoraKernels table{Isa::Avx2, &shrink_avx2, &expand_avx2};
  return table;
}

}  // namespace cpu
}  // namespace lowrank

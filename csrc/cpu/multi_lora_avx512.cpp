// AVX-512 (F/BW/VL/DQ) multi-adapter LoRA kernels. Compiled with those flags
// for this file only and reached only through multi_lora_kernels_for() after
// the dispatcher's runtime CPU check. Tails use masked loads and stores, so
// no element outside a row is ever read or written.
//
// Both steps are written for the few-rows-per-adapter case (64 rows over 32
// adapters is two rows each), where the work is a pass over the adapter's
// factors and the arithmetic must keep up with memory:
//   shrink: a block of input rows x a block of A rows in independent
//           accumulators, so the FMA latency is hidden and every load is
//           shared by a whole row or column of the block;
//   expand: each 16x16 tile of B is transposed once in registers and then
//           serves every row of the adapter.
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
// Hardware prefetchers follow the factor streams poorly (many short rows, a
// new stream at every adapter: a cold expand over 32 adapters ran at a fifth
// of the memory bandwidth), so both steps prefetch in software, spread evenly
// over the work that precedes the use: the shrink fetches the next block of A
// rows while it works on the current one, the expand stays a few tiles ahead
// in its slice of B.
constexpr std::int64_t kPrefetchTiles = 8;

// Prefetches the cache lines of elements [index, index + count) of `data`
// that lie below element `size`.
template <Dtype D>
inline void prefetch_lines(const void* data, std::int64_t index, std::int64_t count,
                           std::int64_t size) {
  constexpr std::int64_t bytes = D == Dtype::Float32 ? 4 : 2;
  count = std::min(count, size - index);
  if (count <= 0) return;
  const char* begin = static_cast<const char*>(data) + index * bytes;
  for (std::int64_t line = 0; line < count * bytes; line += 64) {
    _mm_prefetch(begin + line, _MM_HINT_T0);
  }
}

inline __mmask16 first_lanes(std::int64_t count) {
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

// sums[i * Ranks + r] = dot(input row at x_offsets[i], A row at a_offsets[r])
// over `length` elements: Rows * Ranks independent accumulators, each input
// load shared by Ranks FMAs and each A load by Rows FMAs. Meanwhile the
// Ranks rows of A from element `next` on (the next block) are prefetched.
template <Dtype D, int Rows, int Ranks>
void dot_block(const MultiLoraBatch& batch, const std::int64_t* x_offsets,
               const std::int64_t* a_offsets, std::int64_t next, float* sums) {
  const std::int64_t a_size = batch.num_adapters * batch.max_rank * batch.in_features;
  __m512 accumulators[Rows][Ranks];
  for (int i = 0; i < Rows; ++i) {
    for (int r = 0; r < Ranks; ++r) accumulators[i][r] = _mm512_setzero_ps();
  }
  const std::int64_t length = batch.in_features;
  for (std::int64_t j = 0; j < length; j += kLanes) {
    const __mmask16 mask = first_lanes(length - j);
    __m512 x[Rows];
    for (int i = 0; i < Rows; ++i) x[i] = load16<D>(batch.input, x_offsets[i] + j, mask);
    prefetch_lines<D>(batch.lora_A, next + j * Ranks, kLanes * Ranks, a_size);
    for (int r = 0; r < Ranks; ++r) {
      const __m512 a = load16<D>(batch.lora_A, a_offsets[r] + j, mask);
      for (int i = 0; i < Rows; ++i) {
        accumulators[i][r] = _mm512_fmadd_ps(x[i], a, accumulators[i][r]);
      }
    }
  }
  for (int i = 0; i < Rows; ++i) {
    for (int r = 0; r < Ranks; ++r) sums[i * Ranks + r] = _mm512_reduce_add_ps(accumulators[i][r]);
  }
}

// Rows [p, p + row_count) of the group against ranks [rank_begin, rank_end)
// in blocks of Rows x Ranks. A short block repeats its last row or rank (a
// cache hit) and drops the repeat's results, so three shapes cover all.
template <Dtype D, int Rows, int Ranks>
void shrink_rows(const MultiLoraBatch& batch, std::int64_t adapter, std::int64_t p,
                 std::int64_t row_count, std::int64_t rank_begin, std::int64_t rank_end,
                 float* hidden) {
  const float scaling = batch.scalings[adapter];
  std::int64_t x_offsets[Rows];
  for (int i = 0; i < Rows; ++i) {
    x_offsets[i] =
        batch.sorted_rows[p + std::min<std::int64_t>(i, row_count - 1)] * batch.in_features;
  }
  for (std::int64_t k = rank_begin; k < rank_end; k += Ranks) {
    const std::int64_t ranks = std::min<std::int64_t>(Ranks, rank_end - k);
    std::int64_t a_offsets[Ranks];
    for (int r = 0; r < Ranks; ++r) {
      a_offsets[r] =
          (adapter * batch.max_rank + k + std::min<std::int64_t>(r, ranks - 1)) * batch.in_features;
    }
    float sums[Rows * Ranks];
    dot_block<D, Rows, Ranks>(batch, x_offsets, a_offsets,
                              (adapter * batch.max_rank + k + Ranks) * batch.in_features, sums);
    for (std::int64_t i = 0; i < std::min<std::int64_t>(Rows, row_count); ++i) {
      for (std::int64_t r = 0; r < ranks; ++r) {
        hidden[(p + i) * batch.max_rank + k + r] = scaling * sums[i * Ranks + r];
      }
    }
  }
}

template <Dtype D>
void shrink_impl(const MultiLoraBatch& batch, std::int64_t adapter, std::int64_t rank_begin,
                 std::int64_t rank_end, float* hidden) {
  const std::int64_t group_end = batch.group_offsets[adapter + 1];
  for (std::int64_t p = batch.group_offsets[adapter]; p < group_end;) {
    const std::int64_t rows = group_end - p;
    if (rows >= 3) {
      shrink_rows<D, 4, 4>(batch, adapter, p, std::min<std::int64_t>(rows, 4), rank_begin, rank_end,
                           hidden);
      p += std::min<std::int64_t>(rows, 4);
    } else if (rows == 2) {
      shrink_rows<D, 2, 8>(batch, adapter, p, 2, rank_begin, rank_end, hidden);
      p += 2;
    } else {
      shrink_rows<D, 1, 8>(batch, adapter, p, 1, rank_begin, rank_end, hidden);
      p += 1;
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

// sum_k h[k] * columns[k] over 16 ranks; h is zero past the adapter's rank
// (as are those columns). Four accumulators keep the FMA chains short.
inline __m512 combine16(const __m512 columns[16], const float* h) {
  __m512 sums[4];
  for (int i = 0; i < 4; ++i) sums[i] = _mm512_mul_ps(_mm512_set1_ps(h[i]), columns[i]);
  for (int k = 4; k < 16; ++k) {
    sums[k % 4] = _mm512_fmadd_ps(_mm512_set1_ps(h[k]), columns[k], sums[k % 4]);
  }
  return _mm512_add_ps(_mm512_add_ps(sums[0], sums[1]), _mm512_add_ps(sums[2], sums[3]));
}

// B is [out, max_rank]: a rank's values for 16 consecutive outputs are
// strided. Per adapter, its rows' hidden values are first copied into a
// zero-padded buffer (so the tiles can always use all 16 lanes); then each
// 16x16 tile of B is loaded once, transposed in registers, and every row of
// the adapter costs 16 FMAs per tile. With more than 16 ranks the partial
// sums of each row wait in `partial` between rank tiles. Adapters are the
// outer loop: each adapter's slice of B is one sequential stream (rows of
// different adapters are disjoint, so no output is revisited).
template <Dtype D>
void expand_impl(const MultiLoraBatch& batch, const float* hidden, std::int64_t out_begin,
                 std::int64_t out_end, void* out) {
  const std::int64_t max_rank = batch.max_rank;
  const std::int64_t b_size = batch.num_adapters * batch.out_features * max_rank;
  std::vector<float> padded;
  std::vector<float> partial;
  for (std::int64_t adapter = 0; adapter < batch.num_adapters; ++adapter) {
    const std::int64_t rank = batch.ranks[adapter];
    const std::int64_t group_begin = batch.group_offsets[adapter];
    const std::int64_t rows = batch.group_offsets[adapter + 1] - group_begin;
    if (rank == 0 || rows == 0) continue;
    const std::int64_t tiles = (rank + kLanes - 1) / kLanes;
    padded.assign(static_cast<std::size_t>(rows * tiles * kLanes), 0.0f);
    for (std::int64_t i = 0; i < rows; ++i) {
      std::copy_n(hidden + (group_begin + i) * max_rank, rank, &padded[i * tiles * kLanes]);
    }
    if (tiles > 1) partial.resize(static_cast<std::size_t>(rows * kLanes));
    for (std::int64_t o = out_begin; o < out_end; o += kLanes) {
      const std::int64_t width = std::min(kLanes, out_end - o);
      const __mmask16 out_mask = first_lanes(width);
      const std::int64_t b_offset = (adapter * batch.out_features + o) * max_rank;
      if (o + kPrefetchTiles * kLanes < out_end) {
        prefetch_lines<D>(batch.lora_B, b_offset + kPrefetchTiles * kLanes * max_rank,
                          kLanes * max_rank, b_size);
      }
      for (std::int64_t t = 0; t < tiles; ++t) {
        const std::int64_t k = t * kLanes;
        const __mmask16 rank_mask = first_lanes(rank - k);
        __m512 columns[16];
        for (std::int64_t l = 0; l < kLanes; ++l) {
          columns[l] = load16<D>(batch.lora_B, b_offset + l * max_rank + k,
                                 l < width ? rank_mask : static_cast<__mmask16>(0));
        }
        transpose16(columns);
        for (std::int64_t i = 0; i < rows; ++i) {
          __m512 sum = combine16(columns, &padded[(i * tiles + t) * kLanes]);
          if (t > 0) sum = _mm512_add_ps(sum, _mm512_loadu_ps(&partial[i * kLanes]));
          if (t + 1 < tiles) {
            _mm512_storeu_ps(&partial[i * kLanes], sum);
            continue;
          }
          const std::int64_t y_offset = batch.sorted_rows[group_begin + i] * batch.out_features + o;
          store16<D>(out, y_offset,
                     _mm512_add_ps(load16<D>(batch.base_output, y_offset, out_mask), sum),
                     out_mask);
        }
      }
    }
  }
}

void shrink_avx512(const MultiLoraBatch& batch, std::int64_t adapter, std::int64_t rank_begin,
                   std::int64_t rank_end, float* hidden) {
  switch (batch.dtype) {
    case Dtype::Float32:
      return shrink_impl<Dtype::Float32>(batch, adapter, rank_begin, rank_end, hidden);
    case Dtype::BFloat16:
      return shrink_impl<Dtype::BFloat16>(batch, adapter, rank_begin, rank_end, hidden);
    case Dtype::Float16:
      return shrink_impl<Dtype::Float16>(batch, adapter, rank_begin, rank_end, hidden);
  }
}

void expand_avx512(const MultiLoraBatch& batch, const float* hidden, std::int64_t out_begin,
                   std::int64_t out_end, void* out) {
  switch (batch.dtype) {
    case Dtype::Float32:
      return expand_impl<Dtype::Float32>(batch, hidden, out_begin, out_end, out);
    case Dtype::BFloat16:
      return expand_impl<Dtype::BFloat16>(batch, hidden, out_begin, out_end, out);
    case Dtype::Float16:
      return expand_impl<Dtype::Float16>(batch, hidden, out_begin, out_end, out);
  }
}

}  // namespace

const MultiLoraKernels& multi_lora_avx512_kernels() {
  static const MultiLoraKernels table{Isa::Avx512, &shrink_avx512, &expand_avx512};
  return table;
}

}  // namespace cpu
}  // namespace lowrank

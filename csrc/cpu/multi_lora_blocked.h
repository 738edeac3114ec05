// Loop structure of the SIMD multi-adapter LoRA kernels, written once over an
// ISA's vector operations (`Simd`, see below) and used by multi_lora_avx2.cpp
// and multi_lora_avx512.cpp. Include only from those files: everything here
// is in an anonymous namespace, so each ISA's translation unit compiles its
// own copy with its own flags and no vector code is shared across ISAs (see
// kernels.h). Nothing here allocates: the glue hands expand its scratch.
//
// Both steps are written for the few-rows-per-adapter case (64 rows over 32
// adapters is two rows each), where the work is one pass over the adapter's
// factors and the arithmetic must keep up with memory:
//   shrink: a block of input rows x a block of A rows in independent
//           accumulators, so the FMA latency is hidden and every load is
//           shared by a whole row or column of the block;
//   expand: each kLanes x kLanes tile of B is transposed once in registers
//           and then serves every row of the adapter.
// Hardware prefetchers follow these streams poorly (many short rows, a new
// stream at every adapter: a cold expand over 32 adapters ran at a fifth of
// the memory bandwidth), so both steps prefetch in software, spread evenly
// over the work that precedes the use: the shrink fetches the next block of
// A rows while it works on the current one, the expand stays a few tiles
// ahead in its slice of B.
//
// Simd provides: `Vec`, `kLanes`; the shrink's block shapes `kRanksOf4Rows`,
// `kRanksOf2Rows`, `kRanksOf1Row` (ranks per block for 4, 2 and 1 rows, as
// many as the registers hold); `Lanes` and `first(count)`, a description of
// the first `count` lanes (none for count <= 0); `load<D>(data, index, lanes)`
// (those lanes from element `index` on, other lanes zero, no element past
// them read), `store<D>(data, index, v, lanes)`;
// `zero`, `set1`, `add`, `mul`, `fmadd`, `reduce_add`, `loadu`/`storeu` of
// fp32, and `transpose(Vec rows[kLanes])`.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "cpu/multi_lora_kernels.h"

namespace lowrank {
namespace cpu {
namespace {

// Tiles of B the expand prefetches ahead of the one it computes.
constexpr std::int64_t kPrefetchTiles = 8;

template <Dtype D>
constexpr std::int64_t element_bytes() {
  return D == Dtype::Float32 ? 4 : 2;
}

// Prefetches the cache lines of elements [index, index + count) of `data`
// that lie below element `size`.
template <Dtype D>
inline void prefetch_lines(const void* data, std::int64_t index, std::int64_t count,
                           std::int64_t size) {
  count = std::min(count, size - index);
  if (count <= 0) return;
  const char* begin = static_cast<const char*>(data) + index * element_bytes<D>();
  for (std::int64_t line = 0; line < count * element_bytes<D>(); line += 64) {
    _mm_prefetch(begin + line, _MM_HINT_T0);
  }
}

// sums[i * Ranks + r] = dot(input row at x_offsets[i], A row at a_offsets[r])
// over in_features elements: Rows * Ranks independent accumulators, each
// input load shared by Ranks FMAs and each A load by Rows FMAs. Meanwhile the
// Ranks rows of A from element `next` on (the next block) are prefetched.
template <class Simd, Dtype D, int Rows, int Ranks>
void dot_block(const MultiLoraBatch& batch, const std::int64_t* x_offsets,
               const std::int64_t* a_offsets, std::int64_t next, float* sums) {
  using Vec = typename Simd::Vec;
  const std::int64_t a_size = batch.num_adapters * batch.max_rank * batch.in_features;
  Vec accumulators[Rows][Ranks];
  for (int i = 0; i < Rows; ++i) {
    for (int r = 0; r < Ranks; ++r) accumulators[i][r] = Simd::zero();
  }
  const std::int64_t length = batch.in_features;
  for (std::int64_t j = 0; j < length; j += Simd::kLanes) {
    const typename Simd::Lanes lanes = Simd::first(length - j);
    Vec x[Rows];
    for (int i = 0; i < Rows; ++i)
      x[i] = Simd::template load<D>(batch.input, x_offsets[i] + j, lanes);
    prefetch_lines<D>(batch.lora_A, next + j * Ranks, Simd::kLanes * Ranks, a_size);
    for (int r = 0; r < Ranks; ++r) {
      const Vec a = Simd::template load<D>(batch.lora_A, a_offsets[r] + j, lanes);
      for (int i = 0; i < Rows; ++i) accumulators[i][r] = Simd::fmadd(x[i], a, accumulators[i][r]);
    }
  }
  for (int i = 0; i < Rows; ++i) {
    for (int r = 0; r < Ranks; ++r) sums[i * Ranks + r] = Simd::reduce_add(accumulators[i][r]);
  }
}

// Rows [p, p + row_count) of the group against ranks [rank_begin, rank_end)
// in blocks of Rows x Ranks. A short block repeats its last row or rank (a
// cache hit) and drops the repeat's results, so three shapes cover all.
template <class Simd, Dtype D, int Rows, int Ranks>
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
    dot_block<Simd, D, Rows, Ranks>(batch, x_offsets, a_offsets,
                                    (adapter * batch.max_rank + k + Ranks) * batch.in_features,
                                    sums);
    for (std::int64_t i = 0; i < std::min<std::int64_t>(Rows, row_count); ++i) {
      for (std::int64_t r = 0; r < ranks; ++r) {
        hidden[(p + i) * batch.max_rank + k + r] = scaling * sums[i * Ranks + r];
      }
    }
  }
}

// MultiLoraKernels::shrink for one dtype.
template <class Simd, Dtype D>
void shrink_blocked(const MultiLoraBatch& batch, std::int64_t adapter, std::int64_t rank_begin,
                    std::int64_t rank_end, float* hidden) {
  const std::int64_t group_end = batch.group_offsets[adapter + 1];
  for (std::int64_t p = batch.group_offsets[adapter]; p < group_end;) {
    const std::int64_t rows = std::min<std::int64_t>(group_end - p, 4);
    if (rows >= 3) {
      shrink_rows<Simd, D, 4, Simd::kRanksOf4Rows>(batch, adapter, p, rows, rank_begin, rank_end,
                                                   hidden);
    } else if (rows == 2) {
      shrink_rows<Simd, D, 2, Simd::kRanksOf2Rows>(batch, adapter, p, 2, rank_begin, rank_end,
                                                   hidden);
    } else {
      shrink_rows<Simd, D, 1, Simd::kRanksOf1Row>(batch, adapter, p, 1, rank_begin, rank_end,
                                                  hidden);
    }
    p += rows;
  }
}

// sum_k h[k] * columns[k] over kLanes ranks; h is zero past the adapter's
// rank (as are those columns). Four accumulators keep the FMA chains short.
template <class Simd>
inline typename Simd::Vec combine(const typename Simd::Vec columns[], const float* h) {
  typename Simd::Vec sums[4];
  for (int i = 0; i < 4; ++i) sums[i] = Simd::mul(Simd::set1(h[i]), columns[i]);
  for (int k = 4; k < Simd::kLanes; ++k) {
    sums[k % 4] = Simd::fmadd(Simd::set1(h[k]), columns[k], sums[k % 4]);
  }
  return Simd::add(Simd::add(sums[0], sums[1]), Simd::add(sums[2], sums[3]));
}

// MultiLoraKernels::expand for one dtype. B is [out, max_rank]: a rank's
// values for consecutive outputs are strided. Per adapter, its rows' hidden
// values are first copied into a zero-padded buffer at the start of
// `scratch` (so a tile can always use all lanes); then each tile of B is
// loaded once, transposed in registers, and every row of the adapter costs
// kLanes FMAs per tile. With more ranks than lanes the partial sums of each
// row wait in `partial`, the rest of `scratch`, between rank tiles. Adapters
// are the outer loop: each adapter's slice of B is one sequential stream
// (rows of different adapters are disjoint, so no output is revisited).
template <class Simd, Dtype D>
void expand_blocked(const MultiLoraBatch& batch, const float* hidden, std::int64_t adapter_begin,
                    std::int64_t adapter_end, std::int64_t out_begin, std::int64_t out_end,
                    void* out, float* scratch, std::int64_t scratch_floats) {
  using Vec = typename Simd::Vec;
  constexpr std::int64_t lanes = Simd::kLanes;
  // What multi_lora_adapter_scratch_floats counts on: rank padded to whole
  // vectors of this ISA is at most rank padded to kMultiLoraMaxLanes.
  static_assert(kMultiLoraMaxLanes % lanes == 0, "kMultiLoraMaxLanes must hold whole vectors");
  const std::int64_t max_rank = batch.max_rank;
  const std::int64_t b_size = batch.num_adapters * batch.out_features * max_rank;
  for (std::int64_t adapter = adapter_begin; adapter < adapter_end; ++adapter) {
    const std::int64_t rank = batch.ranks[adapter];
    const std::int64_t group_begin = batch.group_offsets[adapter];
    const std::int64_t rows = batch.group_offsets[adapter + 1] - group_begin;
    if (rank == 0 || rows == 0) continue;
    const std::int64_t tiles = (rank + lanes - 1) / lanes;
    // A caller's bug, not a data condition: never write past the scratch.
    if (rows * (tiles + 1) * lanes > scratch_floats) std::abort();
    float* const padded = scratch;
    float* const partial = scratch + rows * tiles * lanes;
    std::fill_n(padded, rows * tiles * lanes, 0.0f);
    for (std::int64_t i = 0; i < rows; ++i) {
      std::copy_n(hidden + (group_begin + i) * max_rank, rank, padded + i * tiles * lanes);
    }
    for (std::int64_t o = out_begin; o < out_end; o += lanes) {
      const typename Simd::Lanes out_lanes = Simd::first(out_end - o);
      const std::int64_t width = std::min(lanes, out_end - o);
      const std::int64_t b_offset = (adapter * batch.out_features + o) * max_rank;
      if (o + kPrefetchTiles * lanes < out_end) {
        prefetch_lines<D>(batch.lora_B, b_offset + kPrefetchTiles * lanes * max_rank,
                          lanes * max_rank, b_size);
      }
      for (std::int64_t t = 0; t < tiles; ++t) {
        const std::int64_t k = t * lanes;
        const typename Simd::Lanes rank_lanes = Simd::first(rank - k);
        const typename Simd::Lanes no_lanes = Simd::first(0);
        Vec columns[lanes];
        for (std::int64_t l = 0; l < lanes; ++l) {
          columns[l] = Simd::template load<D>(batch.lora_B, b_offset + l * max_rank + k,
                                              l < width ? rank_lanes : no_lanes);
        }
        Simd::transpose(columns);
        for (std::int64_t i = 0; i < rows; ++i) {
          Vec sum = combine<Simd>(columns, padded + (i * tiles + t) * lanes);
          if (t > 0) sum = Simd::add(sum, Simd::loadu(partial + i * lanes));
          if (t + 1 < tiles) {
            Simd::storeu(partial + i * lanes, sum);
            continue;
          }
          const std::int64_t y_offset = batch.sorted_rows[group_begin + i] * batch.out_features + o;
          Simd::template store<D>(
              out, y_offset,
              Simd::add(Simd::template load<D>(batch.base_output, y_offset, out_lanes), sum),
              out_lanes);
        }
      }
    }
  }
}

// The MultiLoraKernels of an ISA, dispatching on the batch's dtype.
template <class Simd>
MultiLoraKernels blocked_kernels() {
  constexpr auto shrink = [](const MultiLoraBatch& batch, std::int64_t adapter,
                             std::int64_t rank_begin, std::int64_t rank_end, float* hidden) {
    switch (batch.dtype) {
      case Dtype::Float32:
        return shrink_blocked<Simd, Dtype::Float32>(batch, adapter, rank_begin, rank_end, hidden);
      case Dtype::BFloat16:
        return shrink_blocked<Simd, Dtype::BFloat16>(batch, adapter, rank_begin, rank_end, hidden);
      case Dtype::Float16:
        return shrink_blocked<Simd, Dtype::Float16>(batch, adapter, rank_begin, rank_end, hidden);
    }
  };
  constexpr auto expand = [](const MultiLoraBatch& batch, const float* hidden,
                             std::int64_t adapter_begin, std::int64_t adapter_end,
                             std::int64_t out_begin, std::int64_t out_end, void* out,
                             float* scratch, std::int64_t scratch_floats) {
    switch (batch.dtype) {
      case Dtype::Float32:
        return expand_blocked<Simd, Dtype::Float32>(batch, hidden, adapter_begin, adapter_end,
                                                    out_begin, out_end, out, scratch,
                                                    scratch_floats);
      case Dtype::BFloat16:
        return expand_blocked<Simd, Dtype::BFloat16>(batch, hidden, adapter_begin, adapter_end,
                                                     out_begin, out_end, out, scratch,
                                                     scratch_floats);
      case Dtype::Float16:
        return expand_blocked<Simd, Dtype::Float16>(batch, hidden, adapter_begin, adapter_end,
                                                    out_begin, out_end, out, scratch,
                                                    scratch_floats);
    }
  };
  return MultiLoraKernels{+shrink, +expand};
}

}  // namespace
}  // namespace cpu
}  // namespace lowrank

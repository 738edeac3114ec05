// Torch-free kernels of multi_lora_linear: one batch whose rows use different
// LoRA adapters (Punica's SGMV shape, with S-LoRA's per-adapter ranks).
//
// The glue sorts the rows by adapter first, so every kernel walks one
// adapter's row group at a time and reads that adapter's factors once per
// call, whatever the number of rows or adapters. The adapter term is computed
// in two steps:
//   shrink: hidden[p, k] = scaling[a] * sum_j input[row(p), j] * A[a, k, j]
//   expand: out[row(p), o] += sum_k hidden[p, k] * B[a, o, k]     (k < ranks[a])
// Each ISA translation unit (multi_lora_scalar.cpp, _avx2.cpp, _avx512.cpp)
// fills the MultiLoraKernels part of its ISA's CPU kernel table (kernels.h).
#pragma once

#include <cstdint>

#include "core/types.h"

namespace lowrank {
namespace cpu {

// One mixed-adapter batch. All float buffers share `dtype`; all are row-major
// and contiguous.
struct MultiLoraBatch {
  Dtype dtype = Dtype::Float32;
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  std::int64_t max_rank = 0;
  const void* input = nullptr;   // [rows, in_features]
  const void* lora_A = nullptr;  // [num_adapters, max_rank, in_features]
  const void* lora_B = nullptr;  // [num_adapters, out_features, max_rank]
  // [rows, out_features]: the base output the expand adds to. It may be the
  // expand's `out` itself (in place) or a separate buffer.
  const void* base_output = nullptr;
  const std::int64_t* ranks = nullptr;  // [num_adapters], each in [0, max_rank]
  const float* scalings = nullptr;      // [num_adapters]
  // Rows of adapter a are sorted_rows[group_offsets[a] .. group_offsets[a + 1]);
  // a row's position p in sorted_rows indexes `hidden`.
  const std::int64_t* group_offsets = nullptr;  // [num_adapters + 1]
  const std::int64_t* sorted_rows = nullptr;    // [group_offsets[num_adapters]]
  std::int64_t num_adapters = 0;
};

struct MultiLoraKernels {
  // Fills hidden[p * max_rank + k] (fp32, already multiplied by the adapter's
  // scaling) for the rows p of `adapter` and k in [rank_begin, rank_end),
  // rank_end <= ranks[adapter]. Other entries of `hidden` are not touched.
  void (*shrink)(const MultiLoraBatch& batch, std::int64_t adapter, std::int64_t rank_begin,
                 std::int64_t rank_end, float* hidden);

  // For output features [out_begin, out_end) of every row whose adapter a is
  // in [adapter_begin, adapter_end) and has a nonzero rank,
  // out[row, o] = round(base_output[row, o] + sum_k hidden[p, k] * B[a, o, k]),
  // the sum in fp32 and one rounding to `batch.dtype`. `out` is
  // [rows, out_features]; other rows (other adapters, no adapter, rank 0) are
  // not written, so calls on disjoint output or adapter ranges may run in
  // parallel.
  //
  // `scratch` is working memory of `scratch_floats` floats, at least
  // multi_lora_expand_scratch_floats(batch, adapter_begin, adapter_end)
  // (the kernels allocate nothing); concurrent calls need separate scratch.
  void (*expand)(const MultiLoraBatch& batch, const float* hidden, std::int64_t adapter_begin,
                 std::int64_t adapter_end, std::int64_t out_begin, std::int64_t out_end,
                 void* out, float* scratch, std::int64_t scratch_floats);
};

// The widest vector of any table's expand, in floats (AVX-512's 16).
static constexpr std::int64_t kMultiLoraMaxLanes = 16;

// Scratch floats an expand needs for one adapter with `rows` rows and rank
// `rank`: the rows' hidden values zero-padded to whole vectors, then one
// vector of partial sums per row (used with ranks wider than a vector).
static inline std::int64_t multi_lora_adapter_scratch_floats(std::int64_t rows,
                                                             std::int64_t rank) {
  if (rows == 0 || rank == 0) return 0;
  const std::int64_t padded_rank =
      (rank + kMultiLoraMaxLanes - 1) / kMultiLoraMaxLanes * kMultiLoraMaxLanes;
  return rows * (padded_rank + kMultiLoraMaxLanes);
}

// Scratch floats one expand call over adapters [adapter_begin, adapter_end)
// needs with any table: the most any one of them needs (the call reuses the
// buffer adapter after adapter). Baseline code (multi_lora_scalar.cpp).
std::int64_t multi_lora_expand_scratch_floats(const MultiLoraBatch& batch,
                                              std::int64_t adapter_begin,
                                              std::int64_t adapter_end);

}  // namespace cpu
}  // namespace lowrank

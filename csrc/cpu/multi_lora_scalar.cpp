// Reference (scalar) multi-adapter LoRA kernels, and the size of the scratch
// every table's expand needs. Baseline-compiled.
#include "cpu/isa_tables.h"
#include "cpu/scalar_tail.h"

namespace lowrank {
namespace cpu {
namespace {

void shrink_scalar(const MultiLoraBatch& batch, std::int64_t adapter, std::int64_t rank_begin,
                   std::int64_t rank_end, float* hidden) {
  const std::int64_t in = batch.in_features;
  const std::int64_t a_offset = adapter * batch.max_rank * in;
  const float scaling = batch.scalings[adapter];
  for (std::int64_t p = batch.group_offsets[adapter]; p < batch.group_offsets[adapter + 1]; ++p) {
    const std::int64_t x_offset = batch.sorted_rows[p] * in;
    for (std::int64_t k = rank_begin; k < rank_end; ++k) {
      float sum = 0.0f;
      for (std::int64_t j = 0; j < in; ++j) {
        sum += tail::load_float(batch.input, batch.dtype, x_offset + j) *
               tail::load_float(batch.lora_A, batch.dtype, a_offset + k * in + j);
      }
      hidden[p * batch.max_rank + k] = scaling * sum;
    }
  }
}

void expand_scalar(const MultiLoraBatch& batch, const float* hidden, std::int64_t adapter_begin,
                   std::int64_t adapter_end, std::int64_t out_begin, std::int64_t out_end,
                   void* out, float* /*scratch*/, std::int64_t /*scratch_floats*/) {
  const std::int64_t out_features = batch.out_features;
  const std::int64_t max_rank = batch.max_rank;
  for (std::int64_t adapter = adapter_begin; adapter < adapter_end; ++adapter) {
    const std::int64_t rank = batch.ranks[adapter];
    if (rank == 0) continue;
    const std::int64_t b_offset = adapter * out_features * max_rank;
    for (std::int64_t p = batch.group_offsets[adapter]; p < batch.group_offsets[adapter + 1]; ++p) {
      const std::int64_t y_offset = batch.sorted_rows[p] * out_features;
      const float* h = hidden + p * max_rank;
      for (std::int64_t o = out_begin; o < out_end; ++o) {
        float sum = 0.0f;
        for (std::int64_t k = 0; k < rank; ++k) {
          sum += h[k] * tail::load_float(batch.lora_B, batch.dtype, b_offset + o * max_rank + k);
        }
        float base = tail::load_float(batch.base_output, batch.dtype, y_offset + o);
        tail::store_float(out, batch.dtype, y_offset + o, base + sum);
      }
    }
  }
}

}  // namespace

std::int64_t multi_lora_expand_scratch_floats(const MultiLoraBatch& batch,
                                              std::int64_t adapter_begin,
                                              std::int64_t adapter_end) {
  std::int64_t floats = 0;
  for (std::int64_t adapter = adapter_begin; adapter < adapter_end; ++adapter) {
    const std::int64_t rows = batch.group_offsets[adapter + 1] - batch.group_offsets[adapter];
    const std::int64_t need = multi_lora_adapter_scratch_floats(rows, batch.ranks[adapter]);
    floats = need > floats ? need : floats;
  }
  return floats;
}

MultiLoraKernels multi_lora_scalar_kernels() {
  return MultiLoraKernels{&shrink_scalar, &expand_scalar};
}

}  // namespace cpu
}  // namespace lowrank

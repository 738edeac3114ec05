// Argument validation of multi_lora_linear / multi_lora_linear_backward,
// shared by the CPU and CUDA glue so that both raise the same messages.
//
// check_multi_lora_args covers shapes, dtypes and devices (host metadata
// only, no device access). check_multi_lora_values reads the ranks and
// adapter indices themselves, which costs a device-to-host copy when they
// live on a GPU; the CUDA glue therefore calls it only on request
// (LOWRANK_CUDA_CHECK_VALUES=1), and otherwise its kernels turn rows with an
// out-of-range index or rank into NaN (see csrc/cuda/kernels.h).
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include "op_checks.h"

namespace lowrank {

// The validated sizes of one call. Each adapter index covers rows_per_index
// consecutive rows of input flattened to [rows, in_features].
struct MultiLoraShapes {
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t num_adapters = 0;
  int64_t max_rank = 0;
  int64_t rows_per_index = 1;
};

// `other` is the [..., out_features] tensor: base_output or grad_output.
inline MultiLoraShapes check_multi_lora_args(const char* op, const Tensor& input,
                                             const Tensor& other, const char* other_name,
                                             const Tensor& lora_A, const Tensor& lora_B,
                                             const Tensor& ranks, const Tensor& scalings,
                                             const Tensor& adapter_indices) {
  check_float_tensor(op, "input", input);
  LOWRANK_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  MultiLoraShapes shapes;
  shapes.in_features = input.size(input.dim() - 1);
  check_dtype(op, "lora_A", lora_A, input.scalar_type());
  check_dtype(op, "lora_B", lora_B, input.scalar_type());
  check_dtype(op, other_name, other, input.scalar_type());
  LOWRANK_CHECK(lora_A.dim() == 3 && lora_A.size(2) == shapes.in_features, op,
              ": lora_A must have shape [num_adapters, max_rank, ", shapes.in_features,
              "] (in_features from input), got ", shape_of(lora_A));
  shapes.num_adapters = lora_A.size(0);
  shapes.max_rank = lora_A.size(1);
  LOWRANK_CHECK(lora_B.dim() == 3 && lora_B.size(0) == shapes.num_adapters &&
                  lora_B.size(2) == shapes.max_rank,
              op, ": lora_B must have shape [", shapes.num_adapters, ", out_features, ",
              shapes.max_rank, "] (num_adapters and max_rank from lora_A), got ", shape_of(lora_B));
  shapes.out_features = lora_B.size(1);
  const std::vector<int64_t> expected = output_shape(input, shapes.out_features);
  LOWRANK_CHECK(same_sizes(other, expected), op, ": ", other_name, " must have shape ",
                Shape{expected}, " (input's leading dimensions, out_features from lora_B), got ",
                shape_of(other));
  check_dtype(op, "ranks", ranks, kLong);
  check_dtype(op, "scalings", scalings, kFloat);
  check_dtype(op, "adapter_indices", adapter_indices, kLong);
  LOWRANK_CHECK(ranks.dim() == 1 && ranks.size(0) == shapes.num_adapters, op,
              ": ranks must have shape [", shapes.num_adapters, "] (one per adapter), got ",
              shape_of(ranks));
  LOWRANK_CHECK(scalings.dim() == 1 && scalings.size(0) == shapes.num_adapters, op,
              ": scalings must have shape [", shapes.num_adapters, "] (one per adapter), got ",
              shape_of(scalings));
  std::vector<int64_t> leading = sizes_vector(input);
  leading.pop_back();
  const std::vector<int64_t> index_shape = sizes_vector(adapter_indices);
  LOWRANK_CHECK(index_shape.size() <= leading.size() &&
                    std::equal(index_shape.begin(), index_shape.end(), leading.begin()),
                op, ": adapter_indices' shape must be a prefix of input's leading dimensions ",
                Shape{leading}, ", got ", Shape{index_shape});
  for (const auto& [name, tensor] :
       {std::pair<const char*, const Tensor*>{other_name, &other}, {"lora_A", &lora_A},
        {"lora_B", &lora_B}, {"ranks", &ranks}, {"scalings", &scalings},
        {"adapter_indices", &adapter_indices}}) {
    check_same_device(op, name, *tensor, input, "input");
  }
  shapes.rows = 1;
  for (const int64_t size : leading) shapes.rows *= size;
  shapes.rows_per_index =
      adapter_indices.numel() == 0 ? 0 : shapes.rows / adapter_indices.numel();
  return shapes;
}

// Smallest and largest value of a non-empty int64 tensor: a host scan (a
// device tensor is copied to the host first, one device-to-host copy).
inline std::pair<int64_t, int64_t> int64_range(const Tensor& values) {
  const Tensor host =
      make_contiguous(values.is_cpu() ? values : torch::stable::to(values, torch::stable::Device(
                                                                          torch::headeronly::DeviceType::CPU)));
  const int64_t* data = host.const_data_ptr<int64_t>();
  const auto [smallest, largest] = std::minmax_element(data, data + host.numel());
  return {*smallest, *largest};
}

// Ranks in [0, max_rank] and indices in [-1, num_adapters). Reads the values:
// a host synchronization for device tensors.
inline void check_multi_lora_values(const char* op, const MultiLoraShapes& shapes,
                                    const Tensor& ranks, const Tensor& adapter_indices) {
  if (ranks.numel() > 0) {
    const auto [smallest, largest] = int64_range(ranks);
    LOWRANK_CHECK(smallest >= 0 && largest <= shapes.max_rank, op,
                ": ranks must lie in [0, max_rank=", shapes.max_rank,
                "] (max_rank is lora_A.size(1)), got values in [", smallest, ", ", largest, "]");
  }
  if (adapter_indices.numel() > 0) {
    const auto [smallest, largest] = int64_range(adapter_indices);
    LOWRANK_CHECK(smallest >= -1 && largest < shapes.num_adapters, op,
                ": adapter_indices must lie in [-1, num_adapters=", shapes.num_adapters,
                ") (-1 = base model only), got values in [", smallest, ", ", largest, "]");
  }
}

}  // namespace lowrank

// Shape helpers shared by the ATen glue of every backend.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace lowrank {

// [..., features] -> [rows, features] (a view when possible). Symbolic sizes
// stay symbolic: the autograd kernels run under torch.compile's tracing, where
// size() would specialize the batch size (a recompile per batch size).
inline at::Tensor flatten_rows(const at::Tensor& input) {
  return input.reshape_symint({-1, input.sym_size(-1)});
}

// input's shape with the last dimension replaced by `features`.
inline std::vector<int64_t> output_shape(const at::Tensor& input, int64_t features) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = features;
  return shape;
}

// The kernels' element-type enum (cpu::Dtype or cuda::Dtype: same members) for
// a float tensor dtype the op already validated.
template <class KernelDtype>
inline KernelDtype kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return KernelDtype::Float32;
    case at::kBFloat16:
      return KernelDtype::BFloat16;
    case at::kHalf:
      return KernelDtype::Float16;
    default:
      TORCH_CHECK(false, "unsupported dtype ", type);
  }
}

}  // namespace lowrank

// ATen glue of multi_lora_linear / multi_lora_linear_backward on CUDA.
//
// Forward: the shrink kernel computes every row's scaling * x A_a^T into an
// fp32 [rows, max_rank] buffer, the expand kernel adds hidden B_a^T to
// base_output; two launches whatever the number of adapters, each row finding
// its adapter on the device. Backward: the same two kernels give
// hidden = s x A^T, grad_hidden = s dY B and grad_input = grad_hidden A (on
// transposed copies of the factors), and the factor gradients are two dense
// fp32 GEMMs over a [rows, num_adapters * max_rank] matrix that holds each
// row's hidden vector in its adapter's block of columns and zeros elsewhere.
//
// Shapes, dtypes and devices are checked with the CPU backend's messages
// (multi_lora_checks.h). The values of ranks and adapter_indices are not read
// by default: that takes a device-to-host copy, which blocks the host until
// the stream has drained, on every eager call (forward and backward). The
// kernels instead turn a row with an out-of-range index or rank into NaN (see
// csrc/cuda/kernels.h), in eager mode and inside CUDA graphs alike.
// LOWRANK_CUDA_CHECK_VALUES=1 asks for the CPU backend's value check (and its
// RuntimeError) on every eager call, for debugging; it is still skipped while
// the stream is being captured, where the copy is impossible.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <tuple>

#include "cuda/kernels.h"
#include "glue_helpers.h"
#include "multi_lora_checks.h"

namespace lowrank {
namespace cuda {
namespace {

// Reads the values only on request (see the file comment). Call after the
// device guard: the capture status is that of the current device's stream.
void check_values_on_request(const char* op, const MultiLoraShapes& shapes,
                             const at::Tensor& ranks, const at::Tensor& adapter_indices) {
  const char* requested = std::getenv("LOWRANK_CUDA_CHECK_VALUES");
  if (requested == nullptr || std::strcmp(requested, "1") != 0) return;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    check_multi_lora_values(op, shapes, ranks, adapter_indices);
  }
}

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
}

// The kernels' view of the row -> adapter map; the tensors must stay alive
// (and contiguous) while the kernels run.
MultiLoraRows kernel_rows(const MultiLoraShapes& shapes, const at::Tensor& adapter_indices,
                          const at::Tensor& ranks, const at::Tensor& scalings) {
  MultiLoraRows rows;
  rows.adapter_indices = adapter_indices.const_data_ptr<int64_t>();
  rows.rows_per_index = shapes.rows_per_index;
  rows.ranks = ranks.const_data_ptr<int64_t>();
  rows.scalings = scalings.const_data_ptr<float>();
  rows.num_adapters = shapes.num_adapters;
  rows.max_rank = shapes.max_rank;
  rows.rows = shapes.rows;
  return rows;
}

at::Tensor multi_lora_linear_cuda(const at::Tensor& input, const at::Tensor& base_output,
                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                  const at::Tensor& ranks, const at::Tensor& scalings,
                                  const at::Tensor& adapter_indices) {
  constexpr const char* op = "multi_lora_linear";
  const MultiLoraShapes shapes = check_multi_lora_args(
      op, input, base_output, "base_output", lora_A, lora_B, ranks, scalings, adapter_indices);
  c10::cuda::CUDAGuard guard(input.device());
  check_values_on_request(op, shapes, ranks, adapter_indices);
  if (shapes.rows == 0 || shapes.out_features == 0) {
    return base_output.clone(at::MemoryFormat::Contiguous);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const Dtype dtype = kernel_dtype<Dtype>(input.scalar_type());
  at::Tensor input_c = input.contiguous();
  at::Tensor base_c = base_output.contiguous();
  at::Tensor lora_A_c = lora_A.contiguous();
  at::Tensor lora_B_c = lora_B.contiguous();
  at::Tensor ranks_c = ranks.contiguous();
  at::Tensor scalings_c = scalings.contiguous();
  at::Tensor indices_c = adapter_indices.contiguous();
  const MultiLoraRows rows = kernel_rows(shapes, indices_c, ranks_c, scalings_c);

  at::Tensor hidden = at::empty({shapes.rows, shapes.max_rank}, input.options().dtype(at::kFloat));
  at::Tensor out = at::empty(base_output.sizes(), base_output.options());
  check_launch(op, multi_lora_shrink(rows, input_c.const_data_ptr(), lora_A_c.const_data_ptr(),
                                     shapes.in_features, dtype, hidden.mutable_data_ptr<float>(),
                                     stream));
  check_launch(op, multi_lora_expand(rows, hidden.const_data_ptr<float>(),
                                     lora_B_c.const_data_ptr(), shapes.out_features,
                                     base_c.const_data_ptr(), dtype, out.mutable_data_ptr(),
                                     stream));
  return out;
}

// hidden [rows, max_rank] spread into [rows, num_adapters * max_rank]: row i
// keeps its values in the columns of its adapter and zeros elsewhere (all
// zeros for index -1), so (spread^T @ X) sums each adapter's rows only.
at::Tensor spread_by_adapter(const at::Tensor& hidden, const at::Tensor& row_adapters,
                             int64_t num_adapters) {
  at::Tensor adapters = at::arange(num_adapters, row_adapters.options());
  at::Tensor one_hot = row_adapters.unsqueeze(1).eq(adapters).to(at::kFloat);  // [rows, n]
  return (one_hot.unsqueeze(2) * hidden.unsqueeze(1)).reshape({hidden.size(0), -1});
}

// See the file comment. Every product and sum is fp32; the results are
// rounded once to input's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_lora_linear_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& ranks, const at::Tensor& scalings,
    const at::Tensor& adapter_indices) {
  constexpr const char* op = "multi_lora_linear_backward";
  const MultiLoraShapes shapes = check_multi_lora_args(
      op, input, grad_output, "grad_output", lora_A, lora_B, ranks, scalings, adapter_indices);
  c10::cuda::CUDAGuard guard(input.device());
  check_values_on_request(op, shapes, ranks, adapter_indices);
  const at::ScalarType dtype = input.scalar_type();
  if (shapes.rows == 0) {
    return {at::zeros(input.sizes(), input.options()), at::zeros(lora_A.sizes(), lora_A.options()),
            at::zeros(lora_B.sizes(), lora_B.options())};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const Dtype kernel_type = kernel_dtype<Dtype>(dtype);
  const at::TensorOptions fp32 = input.options().dtype(at::kFloat);
  at::Tensor x = input.reshape({shapes.rows, shapes.in_features}).contiguous();
  at::Tensor dy = grad_output.reshape({shapes.rows, shapes.out_features}).contiguous();
  at::Tensor lora_A_c = lora_A.contiguous();
  // Shrink takes factors as [n, max_rank, features] and expand as
  // [n, features, max_rank]: B^T feeds the shrink of dY, A^T the expand.
  at::Tensor lora_B_t = lora_B.transpose(1, 2).contiguous();
  at::Tensor lora_A_t = lora_A.transpose(1, 2).contiguous();
  at::Tensor ranks_c = ranks.contiguous();
  at::Tensor scalings_c = scalings.contiguous();
  at::Tensor indices_c = adapter_indices.contiguous();
  const MultiLoraRows rows = kernel_rows(shapes, indices_c, ranks_c, scalings_c);

  at::Tensor hidden = at::empty({shapes.rows, shapes.max_rank}, fp32);
  at::Tensor grad_hidden = at::empty({shapes.rows, shapes.max_rank}, fp32);
  at::Tensor grad_input = at::empty({shapes.rows, shapes.in_features}, input.options());
  check_launch(op, multi_lora_shrink(rows, x.const_data_ptr(), lora_A_c.const_data_ptr(),
                                     shapes.in_features, kernel_type,
                                     hidden.mutable_data_ptr<float>(), stream));
  check_launch(op, multi_lora_shrink(rows, dy.const_data_ptr(), lora_B_t.const_data_ptr(),
                                     shapes.out_features, kernel_type,
                                     grad_hidden.mutable_data_ptr<float>(), stream));
  // grad_hidden already carries the scaling; grad_input has no base term.
  check_launch(op, multi_lora_expand(rows, grad_hidden.const_data_ptr<float>(),
                                     lora_A_t.const_data_ptr(), shapes.in_features, nullptr,
                                     kernel_type, grad_input.mutable_data_ptr(), stream));

  at::Tensor row_adapters = indices_c.reshape({-1, 1})
                                .expand({-1, shapes.rows_per_index})
                                .reshape({shapes.rows});
  at::Tensor spread_grad_hidden = spread_by_adapter(grad_hidden, row_adapters, shapes.num_adapters);
  at::Tensor spread_hidden = spread_by_adapter(hidden, row_adapters, shapes.num_adapters);
  // grad_A[a] = sum_i grad_hidden_i^T x_i; grad_B[a] = sum_i dy_i^T hidden_i.
  at::Tensor grad_A = at::mm(spread_grad_hidden.t(), x.to(at::kFloat))
                          .view({shapes.num_adapters, shapes.max_rank, shapes.in_features});
  at::Tensor grad_B = at::mm(dy.to(at::kFloat).t(), spread_hidden)
                          .view({shapes.out_features, shapes.num_adapters, shapes.max_rank})
                          .permute({1, 0, 2});
  return {grad_input.view(input.sizes()), grad_A.to(dtype).contiguous(),
          grad_B.to(dtype).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("multi_lora_linear", &multi_lora_linear_cuda);
  m.impl("multi_lora_linear_backward", &multi_lora_linear_backward_cuda);
}

}  // namespace cuda
}  // namespace lowrank

// Glue of multi_lora_linear / multi_lora_linear_backward on CUDA.
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
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "cuda/cuda_glue.h"
#include "cuda/kernels.h"
#include "glue_helpers.h"
#include "multi_lora_checks.h"
#include "op_calls.h"

namespace lowrank {
namespace cuda {
namespace {

// Reads the values only on request (see the file comment). Call after the
// device guard: the capture status is that of the current stream.
void check_values_on_request(const char* op, const MultiLoraShapes& shapes, const Tensor& ranks,
                             const Tensor& adapter_indices) {
  const char* requested = std::getenv("LOWRANK_CUDA_CHECK_VALUES");
  if (requested == nullptr || std::strcmp(requested, "1") != 0) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check_launch(op, cudaStreamIsCapturing(current_stream(ranks), &capture));
  if (capture == cudaStreamCaptureStatusNone) {
    check_multi_lora_values(op, shapes, ranks, adapter_indices);
  }
}

// The kernels' view of the row -> adapter map; the tensors must stay alive
// (and contiguous) while the kernels run.
MultiLoraRows kernel_rows(const MultiLoraShapes& shapes, const Tensor& adapter_indices,
                          const Tensor& ranks, const Tensor& scalings) {
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

Tensor multi_lora_linear_cuda(const Tensor& input, const Tensor& base_output,
                              const Tensor& lora_A, const Tensor& lora_B, const Tensor& ranks,
                              const Tensor& scalings, const Tensor& adapter_indices) {
  constexpr const char* op = "multi_lora_linear";
  const MultiLoraShapes shapes = check_multi_lora_args(
      op, input, base_output, "base_output", lora_A, lora_B, ranks, scalings, adapter_indices);
  DeviceGuard guard(input);
  check_values_on_request(op, shapes, ranks, adapter_indices);
  if (shapes.rows == 0 || shapes.out_features == 0) {
    return make_contiguous(torch::stable::clone(base_output));
  }
  const cudaStream_t stream = current_stream(input);
  const Dtype dtype = kernel_dtype<Dtype>(input.scalar_type());
  Tensor input_c = make_contiguous(input);
  Tensor base_c = make_contiguous(base_output);
  Tensor lora_A_c = make_contiguous(lora_A);
  Tensor lora_B_c = make_contiguous(lora_B);
  Tensor ranks_c = make_contiguous(ranks);
  Tensor scalings_c = make_contiguous(scalings);
  Tensor indices_c = make_contiguous(adapter_indices);
  const MultiLoraRows rows = kernel_rows(shapes, indices_c, ranks_c, scalings_c);

  Tensor hidden = empty_tensor({shapes.rows, shapes.max_rank}, kFloat, input.device());
  Tensor out = empty_tensor(sizes_vector(base_output), base_output.scalar_type(),
                            base_output.device());
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
// zeros for index -1), so (spread^T @ X) sums each adapter's rows only. The
// one-hot rows compare (index + 1) with 1..num_adapters (a cumsum of ones):
// no host copy, so CUDA graphs can capture it.
Tensor spread_by_adapter(const Tensor& hidden, const Tensor& row_adapters, int64_t num_adapters) {
  const std::vector<int64_t> size = {num_adapters};
  Tensor ones = as_tensor(call_op("aten::ones", "", IntArray(size), std::optional<ScalarType>(kLong),
                                  std::optional<torch::headeronly::Layout>(),
                                  std::optional<torch::stable::Device>(row_adapters.device()),
                                  std::optional<bool>())[0]);
  Tensor positions = as_tensor(call_op("aten::cumsum", "", ones, int64_t{0},
                                       std::optional<ScalarType>())[0]);  // 1..n
  Tensor shifted = torch::stable::unsqueeze(aten_add(row_adapters, 1.0), 1);   // [rows, 1]
  Tensor one_hot =
      to_dtype(as_tensor(call_op("aten::eq", "Tensor", shifted, positions)[0]), kFloat);
  Tensor product = as_tensor(call_op("aten::mul", "Tensor", torch::stable::unsqueeze(one_hot, 2),
                                     torch::stable::unsqueeze(hidden, 1))[0]);
  return reshape_to(product, {hidden.size(0), -1});
}

// See the file comment. Every product and sum is fp32; the results are
// rounded once to input's dtype.
Tensors3 multi_lora_linear_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                         const Tensor& lora_A, const Tensor& lora_B,
                                         const Tensor& ranks, const Tensor& scalings,
                                         const Tensor& adapter_indices) {
  constexpr const char* op = "multi_lora_linear_backward";
  const MultiLoraShapes shapes = check_multi_lora_args(
      op, input, grad_output, "grad_output", lora_A, lora_B, ranks, scalings, adapter_indices);
  DeviceGuard guard(input);
  check_values_on_request(op, shapes, ranks, adapter_indices);
  const ScalarType dtype = input.scalar_type();
  if (shapes.rows == 0) {
    return {zeros_tensor(sizes_vector(input), dtype, input.device()),
            zeros_tensor(sizes_vector(lora_A), lora_A.scalar_type(), lora_A.device()),
            zeros_tensor(sizes_vector(lora_B), lora_B.scalar_type(), lora_B.device())};
  }
  const cudaStream_t stream = current_stream(input);
  const Dtype kernel_type = kernel_dtype<Dtype>(dtype);
  Tensor x = make_contiguous(reshape_to(input, {shapes.rows, shapes.in_features}));
  Tensor dy = make_contiguous(reshape_to(grad_output, {shapes.rows, shapes.out_features}));
  Tensor lora_A_c = make_contiguous(lora_A);
  // Shrink takes factors as [n, max_rank, features] and expand as
  // [n, features, max_rank]: B^T feeds the shrink of dY, A^T the expand.
  Tensor lora_B_t = torch::stable::contiguous(torch::stable::transpose(lora_B, 1, 2));
  Tensor lora_A_t = torch::stable::contiguous(torch::stable::transpose(lora_A, 1, 2));
  Tensor ranks_c = make_contiguous(ranks);
  Tensor scalings_c = make_contiguous(scalings);
  Tensor indices_c = make_contiguous(adapter_indices);
  const MultiLoraRows rows = kernel_rows(shapes, indices_c, ranks_c, scalings_c);

  Tensor hidden = empty_tensor({shapes.rows, shapes.max_rank}, kFloat, input.device());
  Tensor grad_hidden = empty_tensor({shapes.rows, shapes.max_rank}, kFloat, input.device());
  Tensor grad_input = empty_tensor({shapes.rows, shapes.in_features}, dtype, input.device());
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

  const std::vector<int64_t> expanded = {-1, shapes.rows_per_index};
  Tensor row_adapters = reshape_to(
      as_tensor(call_op("aten::expand", "", reshape_to(indices_c, {-1, 1}), IntArray(expanded),
                        false)[0]),
      {shapes.rows});
  Tensor spread_grad_hidden = spread_by_adapter(grad_hidden, row_adapters, shapes.num_adapters);
  Tensor spread_hidden = spread_by_adapter(hidden, row_adapters, shapes.num_adapters);
  // grad_A[a] = sum_i grad_hidden_i^T x_i; grad_B[a] = sum_i dy_i^T hidden_i.
  Tensor grad_A = view_shape(aten_mm(transposed(spread_grad_hidden), to_dtype(x, kFloat)),
                             {shapes.num_adapters, shapes.max_rank, shapes.in_features});
  const std::vector<int64_t> order = {1, 0, 2};
  Tensor grad_B = as_tensor(
      call_op("aten::permute", "",
              view_shape(aten_mm(transposed(to_dtype(dy, kFloat)), spread_hidden),
                         {shapes.out_features, shapes.num_adapters, shapes.max_rank}),
              IntArray(order))[0]);
  return {view_shape(grad_input, sizes_vector(input)), make_contiguous(to_dtype(grad_A, dtype)),
          make_contiguous(to_dtype(grad_B, dtype))};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  LOWRANK_IMPL(m, multi_lora_linear, multi_lora_linear_cuda);
  LOWRANK_IMPL(m, multi_lora_linear_backward, multi_lora_linear_backward_cuda);
}

}  // namespace cuda
}  // namespace lowrank

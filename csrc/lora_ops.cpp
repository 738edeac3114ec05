// Fused LoRA / QLoRA ops for every backend. They are compositions of ATen
// GEMMs (the low-rank term is added in place into the base GEMM's output)
// and of this library's own nf4_linear / nf4_linear_grad_input, called
// directly on the input's backend (op_calls.h) so each backend's 4-bit
// kernels serve; so one definition is registered for CPU and, when built,
// CUDA.
#include "glue_helpers.h"
#include "op_calls.h"
#include "op_checks.h"

namespace lowrank {
namespace {

// nf4_linear / nf4_linear_grad_input of the tensor's backend.
#ifdef LOWRANK_WITH_CUDA
#define LOWRANK_BACKEND_CALL(tensor, name, ...) \
  ((tensor).is_cuda() ? cuda::name(__VA_ARGS__) : cpu::name(__VA_ARGS__))
#else
#define LOWRANK_BACKEND_CALL(tensor, name, ...) cpu::name(__VA_ARGS__)
#endif

// Adds scaling * (lora_rows @ A.T) @ B.T to `out_rows` in place. With
// float32 factors and a bfloat16/float16 input the term is computed in
// float32 and rounded once when added (at a few rows ATen's float32 GEMMs
// take about 3 us where its bfloat16 ones take 20 us).
void add_lora_term(Tensor& out_rows, const Tensor& lora_rows, const Tensor& lora_A,
                   const Tensor& lora_B, double scaling) {
  if (lora_A.scalar_type() != lora_rows.scalar_type()) {
    Tensor down = aten_mm(to_dtype(lora_rows, lora_A.scalar_type()), transposed(lora_A));
    Tensor sum = aten_add(out_rows, aten_mm(down, transposed(lora_B)), scaling);
    copy_into(out_rows, sum);
    return;
  }
  Tensor down = aten_mm(lora_rows, transposed(lora_A));
  aten_addmm_out(out_rows, out_rows, down, transposed(lora_B), 1.0, scaling);
}

Tensor lora_linear(const Tensor& input, const OptionalTensor& lora_input, const Tensor& weight,
                   const OptionalTensor& bias, const Tensor& lora_A, const Tensor& lora_B,
                   double scaling) {
  constexpr const char* op = "lora_linear";
  check_linear_float(op, "input", input);
  check_dtype(op, "weight", weight, input.scalar_type());
  LOWRANK_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", shape_of(weight));
  check_same_device(op, "weight", weight, input, "input");
  const int64_t out_features = weight.size(0);
  check_linear_input(op, input, weight.size(1));
  check_bias(op, bias, input, out_features);
  check_lora_input(op, lora_input, input);
  check_lora_factors(op, input, lora_A, lora_B, out_features, weight.size(1));
  Tensor rows = flatten_rows(input);
  Tensor out = aten_linear(rows, weight, bias);
  add_lora_term(out, lora_input.has_value() ? flatten_rows(*lora_input) : rows, lora_A, lora_B,
                scaling);
  return input.dim() == 2 ? out : view_shape(out, output_shape(input, out_features));
}

// Shared by the dense and NF4 backward: everything but grad_output @ W.
Tensors4 lora_backward_common(const Tensor& grad_output, Tensor grad_input_rows,
                              const Tensor& input, const OptionalTensor& lora_input,
                              const Tensor& lora_A, const Tensor& lora_B, double scaling) {
  // Float32 factors with a reduced-precision input: the low-rank products run
  // in float32 (the factors' gradients are float32, as the factors).
  const ScalarType factors = lora_A.scalar_type();
  Tensor grad_rows = to_dtype(flatten_rows(grad_output), factors);
  Tensor lora_rows = to_dtype(flatten_rows(lora_input.has_value() ? *lora_input : input), factors);
  // The rank-r intermediates are kept as [r, rows]: every product below then
  // has r as its row count and a long contiguous inner or output dimension.
  // Computing them as [rows, r] asks the BLAS for r-column outputs, which it
  // runs several times slower (e.g. grad_rows.T @ down at 1056 rows, out
  // 1536, r 8).
  Tensor down_t = aten_mm(lora_A, transposed(lora_rows));                          // [r, rows]
  Tensor grad_B = make_contiguous(transposed(aten_mul(aten_mm(down_t, grad_rows), scaling)));  // [out, r]
  Tensor grad_down_t = aten_mul(aten_mm(transposed(lora_B), transposed(grad_rows)), scaling);  // [r, rows]
  Tensor grad_A = aten_mm(grad_down_t, lora_rows);                                 // [r, in]
  Tensor grad_down = transposed(grad_down_t);                                      // [rows, r]
  Tensor grad_lora_input;
  const std::vector<int64_t> input_shape = sizes_vector(input);
  if (lora_input.has_value()) {
    grad_lora_input = view_shape(to_dtype(aten_mm(grad_down, lora_A), input.scalar_type()), input_shape);
  } else if (factors == input.scalar_type()) {
    aten_addmm_out(grad_input_rows, grad_input_rows, grad_down, lora_A);
    grad_lora_input = empty_tensor({0}, input.scalar_type(), input.device());
  } else {
    Tensor sum = aten_add(grad_input_rows, aten_mm(grad_down, lora_A));
    copy_into(grad_input_rows, sum);
    grad_lora_input = empty_tensor({0}, input.scalar_type(), input.device());
  }
  return {view_shape(grad_input_rows, input_shape), grad_lora_input, grad_A, grad_B};
}

// grad_output must have input's shape with out_features as its last size.
void check_grad_output_shape(const char* op, const Tensor& grad_output, const Tensor& input,
                             int64_t out_features) {
  const std::vector<int64_t> expected = output_shape(input, out_features);
  LOWRANK_CHECK(same_sizes(grad_output, expected), op, ": grad_output must have shape ",
                Shape{expected}, ", got ", shape_of(grad_output));
}

Tensors4 lora_linear_backward(const Tensor& grad_output, const Tensor& input,
                              const OptionalTensor& lora_input, const Tensor& weight,
                              const Tensor& lora_A, const Tensor& lora_B, double scaling) {
  constexpr const char* op = "lora_linear_backward";
  check_linear_float(op, "input", input);
  check_dtype(op, "grad_output", grad_output, input.scalar_type());
  check_dtype(op, "weight", weight, input.scalar_type());
  LOWRANK_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", shape_of(weight));
  check_linear_input(op, input, weight.size(1));
  check_grad_output_shape(op, grad_output, input, weight.size(0));
  check_lora_input(op, lora_input, input);
  check_lora_factors(op, input, lora_A, lora_B, weight.size(0), weight.size(1));
  Tensor grad_input_rows = aten_mm(flatten_rows(grad_output), weight);
  return lora_backward_common(grad_output, grad_input_rows, input, lora_input, lora_A, lora_B,
                              scaling);
}

Tensor qlora_linear(const Tensor& input, const OptionalTensor& lora_input, const Tensor& packed,
                    const Tensor& absmax, const OptionalTensor& nested_absmax,
                    const OptionalTensor& nested_code, double offset, int64_t out_features,
                    int64_t in_features, int64_t blocksize, const OptionalTensor& bias,
                    const Tensor& lora_A, const Tensor& lora_B, double scaling) {
  constexpr const char* op = "qlora_linear";
  Nf4WeightArgs weight = checked_linear_weight(op, input, packed, absmax, nested_absmax,
                                               nested_code, offset, out_features, in_features,
                                               blocksize, bias);
  check_lora_input(op, lora_input, input);
  check_lora_factors(op, input, lora_A, lora_B, weight.out_features, weight.in_features);
  Tensor out = LOWRANK_BACKEND_CALL(input, nf4_linear, input, weight.packed, weight.absmax,
                                    weight.nested_absmax, weight.nested_code, weight.offset,
                                    weight.out_features, weight.in_features, weight.blocksize,
                                    bias);
  Tensor out_rows = out.dim() == 2 ? out : view_shape(out, {-1, weight.out_features});
  add_lora_term(out_rows, flatten_rows(lora_input.has_value() ? *lora_input : input), lora_A,
                lora_B, scaling);
  return out;
}

Tensors4 qlora_linear_backward(const Tensor& grad_output, const Tensor& input,
                               const OptionalTensor& lora_input, const Tensor& packed,
                               const Tensor& absmax, const OptionalTensor& nested_absmax,
                               const OptionalTensor& nested_code, double offset,
                               int64_t out_features, int64_t in_features, int64_t blocksize,
                               const Tensor& lora_A, const Tensor& lora_B, double scaling) {
  constexpr const char* op = "qlora_linear_backward";
  check_linear_input(op, input, in_features);
  check_dtype(op, "grad_output", grad_output, input.scalar_type());
  check_grad_output_shape(op, grad_output, input, out_features);
  check_lora_input(op, lora_input, input);
  check_lora_factors(op, input, lora_A, lora_B, out_features, in_features);
  Tensor grad_input =
      LOWRANK_BACKEND_CALL(grad_output, nf4_linear_grad_input, grad_output, packed, absmax,
                           nested_absmax, nested_code, offset, out_features, in_features,
                           blocksize);
  return lora_backward_common(grad_output, flatten_rows(grad_input), input, lora_input, lora_A,
                              lora_B, scaling);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  LOWRANK_IMPL(m, lora_linear, lora_linear);
  LOWRANK_IMPL(m, lora_linear_backward, lora_linear_backward);
  LOWRANK_IMPL(m, qlora_linear, qlora_linear);
  LOWRANK_IMPL(m, qlora_linear_backward, qlora_linear_backward);
}

#ifdef LOWRANK_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  LOWRANK_IMPL(m, lora_linear, lora_linear);
  LOWRANK_IMPL(m, lora_linear_backward, lora_linear_backward);
  LOWRANK_IMPL(m, qlora_linear, qlora_linear);
  LOWRANK_IMPL(m, qlora_linear_backward, qlora_linear_backward);
}
#endif

}  // namespace lowrank

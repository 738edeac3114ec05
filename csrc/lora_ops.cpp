// Fused LoRA / QLoRA ops for every backend. They are compositions of ATen
// GEMMs (the low-rank term is added in place into the base GEMM's output)
// and of this library's own nf4_linear / nf4_linear_grad_input, called
// through the dispatcher so each backend's 4-bit kernels serve; so one
// definition is registered for CPU and, when built, CUDA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "glue_helpers.h"
#include "op_calls.h"
#include "op_checks.h"

namespace lowrank {
namespace {

// Adds scaling * (lora_rows @ A.T) @ B.T to `out_rows` in place. With
// float32 factors and a bfloat16/float16 input the term is computed in
// float32 and rounded once when added (at a few rows ATen's float32 GEMMs
// take about 3 us where its bfloat16 ones take 20 us).
void add_lora_term(at::Tensor& out_rows, const at::Tensor& lora_rows, const at::Tensor& lora_A,
                   const at::Tensor& lora_B, double scaling) {
  if (lora_A.scalar_type() != lora_rows.scalar_type()) {
    at::Tensor down = at::mm(lora_rows.to(lora_A.scalar_type()), lora_A.t());
    out_rows.add_(at::mm(down, lora_B.t()), scaling);
    return;
  }
  at::Tensor down = at::mm(lora_rows, lora_A.t());
  out_rows.addmm_(down, lora_B.t(), 1.0, scaling);
}

at::Tensor lora_linear(const at::Tensor& input, const std::optional<at::Tensor>& lora_input,
                       const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  constexpr const char* op = "lora_linear";
  check_linear_float(op, "input", input);
  check_dtype(op, "weight", weight, input.scalar_type());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.sizes());
  check_same_device(op, "weight", weight, input, "input");
  const int64_t out_features = weight.size(0);
  check_linear_input(op, input, weight.size(1));
  check_bias(op, bias, input, out_features);
  check_lora_input(op, lora_input, input);
  check_lora_factors(op, input, lora_A, lora_B, out_features, weight.size(1));
  at::Tensor rows = flatten_rows(input);
  at::Tensor out = bias.has_value() ? at::addmm(*bias, rows, weight.t()) : at::mm(rows, weight.t());
  add_lora_term(out, lora_input.has_value() ? flatten_rows(*lora_input) : rows, lora_A, lora_B,
                scaling);
  return out.view(output_shape(input, out_features));
}

// Shared by the dense and NF4 backward: everything but grad_output @ W.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward_common(
    const at::Tensor& grad_output, at::Tensor grad_input_rows, const at::Tensor& input,
    const std::optional<at::Tensor>& lora_input, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling) {
  // Float32 factors with a reduced-precision input: the low-rank products run
  // in float32 (the factors' gradients are float32, as the factors).
  const at::ScalarType factors = lora_A.scalar_type();
  at::Tensor grad_rows = flatten_rows(grad_output).to(factors);
  at::Tensor lora_rows = flatten_rows(lora_input.has_value() ? *lora_input : input).to(factors);
  at::Tensor down = at::mm(lora_rows, lora_A.t());                // [rows, r]
  at::Tensor grad_B = at::mm(grad_rows.t(), down).mul_(scaling);   // [out, r]
  at::Tensor grad_down = at::mm(grad_rows, lora_B).mul_(scaling);  // [rows, r]
  at::Tensor grad_A = at::mm(grad_down.t(), lora_rows);            // [r, in]
  at::Tensor grad_lora_input;
  if (lora_input.has_value()) {
    grad_lora_input = at::mm(grad_down, lora_A).to(input.scalar_type()).view(input.sizes());
  } else if (factors == input.scalar_type()) {
    grad_input_rows.addmm_(grad_down, lora_A);
    grad_lora_input = at::empty({0}, input.options());
  } else {
    grad_input_rows.add_(at::mm(grad_down, lora_A));
    grad_lora_input = at::empty({0}, input.options());
  }
  return {grad_input_rows.view(input.sizes()), grad_lora_input, grad_A, grad_B};
}

// grad_output must have input's shape with out_features as its last size.
void check_grad_output_shape(const char* op, const at::Tensor& grad_output,
                             const at::Tensor& input, int64_t out_features) {
  const std::vector<int64_t> expected = output_shape(input, out_features);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), op,
              ": grad_output must have shape ", at::IntArrayRef(expected), ", got ",
              grad_output.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input,
    const std::optional<at::Tensor>& lora_input, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  constexpr const char* op = "lora_linear_backward";
  check_linear_float(op, "input", input);
  check_dtype(op, "grad_output", grad_output, input.scalar_type());
  check_dtype(op, "weight", weight, input.scalar_type());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.sizes());
  check_linear_input(op, input, weight.size(1));
  check_grad_output_shape(op, grad_output, input, weight.size(0));
  check_lora_input(op, lora_input, input);
  check_lora_factors(op, input, lora_A, lora_B, weight.size(0), weight.size(1));
  at::Tensor grad_input_rows = at::mm(flatten_rows(grad_output), weight);
  return lora_backward_common(grad_output, grad_input_rows, input, lora_input, lora_A, lora_B,
                              scaling);
}

at::Tensor qlora_linear(const at::Tensor& input, const std::optional<at::Tensor>& lora_input,
                        const at::Tensor& packed, const at::Tensor& absmax,
                        const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& nested_code, double offset,
                        c10::SymInt out_features, c10::SymInt in_features, int64_t blocksize,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                        const at::Tensor& lora_B, double scaling) {
  constexpr const char* op = "qlora_linear";
  Nf4WeightArgs weight = checked_linear_weight(op, input, packed, absmax, nested_absmax,
                                               nested_code, offset, out_features, in_features,
                                               blocksize, bias);
  check_lora_input(op, lora_input, input);
  check_lora_factors(op, input, lora_A, lora_B, weight.out_features, weight.in_features);
  at::Tensor out = call_nf4_linear(input, weight.packed, weight.absmax, weight.nested_absmax,
                                   weight.nested_code, weight.offset,
                                   c10::SymInt(weight.out_features),
                                   c10::SymInt(weight.in_features), weight.blocksize, bias);
  at::Tensor out_rows = out.view({-1, weight.out_features});
  add_lora_term(out_rows, flatten_rows(lora_input.has_value() ? *lora_input : input), lora_A,
                lora_B, scaling);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qlora_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input,
    const std::optional<at::Tensor>& lora_input, const at::Tensor& packed,
    const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, double offset, c10::SymInt out_features,
    c10::SymInt in_features, int64_t blocksize, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling) {
  constexpr const char* op = "qlora_linear_backward";
  Nf4WeightArgs weight{packed, absmax, nested_absmax, nested_code, offset,
                       out_features.expect_int(), in_features.expect_int(), blocksize};
  check_linear_input(op, input, weight.in_features);
  check_dtype(op, "grad_output", grad_output, input.scalar_type());
  check_grad_output_shape(op, grad_output, input, weight.out_features);
  check_lora_input(op, lora_input, input);
  check_lora_factors(op, input, lora_A, lora_B, weight.out_features, weight.in_features);
  at::Tensor grad_input = call_nf4_linear_grad_input(
      grad_output, packed, absmax, nested_absmax, nested_code, offset, out_features, in_features,
      blocksize);
  return lora_backward_common(grad_output, flatten_rows(grad_input), input, lora_input, lora_A,
                              lora_B, scaling);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
  m.impl("qlora_linear", &qlora_linear);
  m.impl("qlora_linear_backward", &qlora_linear_backward);
}

#ifdef LOWRANK_WITH_CUDA
TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
  m.impl("qlora_linear", &qlora_linear);
  m.impl("qlora_linear_backward", &qlora_linear_backward);
}
#endif

}  // namespace lowrank

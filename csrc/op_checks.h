// Argument validation shared by the CPU and CUDA glue. Every message names the
// op, the argument, what was expected and what came.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

#include "core/nf4.h"

namespace lowrank {

inline bool is_supported_float(at::ScalarType type) {
  return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
}

inline void check_float_tensor(const char* op, const char* name, const at::Tensor& tensor) {
  TORCH_CHECK(is_supported_float(tensor.scalar_type()), op, ": ", name,
              " must be float32, bfloat16 or float16, got ", tensor.scalar_type());
}

// The linear ops (nf4_linear, lora_linear, qlora_linear and their backward)
// also take float64: a reference path multiplies in ATen with the NF4 weight
// decoded exactly, so float64 models run and torch.autograd.gradcheck works.
inline void check_linear_float(const char* op, const char* name, const at::Tensor& tensor) {
  TORCH_CHECK(is_supported_float(tensor.scalar_type()) || tensor.scalar_type() == at::kDouble,
              op, ": ", name, " must be float32, bfloat16, float16 or float64, got ",
              tensor.scalar_type());
}

inline void check_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK(nf4::valid_blocksize(blocksize), op,
              ": blocksize must be a power of two in [32, 4096], got ", blocksize);
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& tensor,
                              const at::Tensor& reference, const char* reference_name) {
  TORCH_CHECK(tensor.device() == reference.device(), op, ": ", name, " is on ", tensor.device(),
              " but ", reference_name, " is on ", reference.device());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& tensor,
                        at::ScalarType expected) {
  TORCH_CHECK(tensor.scalar_type() == expected, op, ": ", name, " must be ", expected, ", got ",
              tensor.scalar_type());
}

inline void check_numel(const char* op, const char* name, const at::Tensor& tensor,
                        int64_t expected, const char* why) {
  TORCH_CHECK(tensor.numel() == expected, op, ": ", name, " must have ", expected,
              " elements (", why, "), got ", tensor.numel());
}

// The NF4 weight argument group of nf4_linear / qlora_linear (see
// registration.cpp), validated against the input's device.
struct Nf4WeightArgs {
  at::Tensor packed;
  at::Tensor absmax;
  std::optional<at::Tensor> nested_absmax;
  std::optional<at::Tensor> nested_code;
  double offset;
  int64_t out_features;
  int64_t in_features;
  int64_t blocksize;

  int64_t numel() const { return out_features * in_features; }
  int64_t num_blocks() const { return nf4::num_blocks(numel(), blocksize); }
  bool nested() const { return nested_absmax.has_value(); }

  void validate(const char* op, const at::Tensor& device_reference) const {
    TORCH_CHECK(out_features > 0 && in_features > 0, op,
                ": out_features and in_features must be positive, got ", out_features, " and ",
                in_features);
    check_blocksize(op, blocksize);
    check_dtype(op, "packed", packed, at::kByte);
    check_numel(op, "packed", packed, nf4::packed_bytes(numel()),
                "two 4-bit codes per byte of out_features * in_features");
    check_same_device(op, "packed", packed, device_reference, "input");
    check_same_device(op, "absmax", absmax, device_reference, "input");
    check_numel(op, "absmax", absmax, num_blocks(), "one scale per block");
    TORCH_CHECK(nested_absmax.has_value() == nested_code.has_value(), op,
                ": nested_absmax and nested_code must both be given (double quantization) or "
                "both be None");
    if (nested()) {
      check_dtype(op, "absmax (double-quantized codes)", absmax, at::kByte);
      check_dtype(op, "nested_absmax", *nested_absmax, at::kFloat);
      check_dtype(op, "nested_code", *nested_code, at::kFloat);
      check_numel(op, "nested_absmax", *nested_absmax,
                  nf4::num_blocks(num_blocks(), nf4::kNestedBlocksize),
                  "one scale per 256 blocks");
      check_numel(op, "nested_code", *nested_code, 256, "the 8-bit code map");
      check_same_device(op, "nested_absmax", *nested_absmax, device_reference, "input");
      check_same_device(op, "nested_code", *nested_code, device_reference, "input");
    } else {
      check_dtype(op, "absmax", absmax, at::kFloat);
    }
  }
};

// input [..., in_features] of a float dtype the linear ops take.
inline void check_linear_input(const char* op, const at::Tensor& input, int64_t in_features) {
  check_linear_float(op, "input", input);
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  TORCH_CHECK(input.size(-1) == in_features, op, ": input's last dimension must be in_features=",
              in_features, ", got input of shape ", input.sizes());
}

inline void check_bias(const char* op, const std::optional<at::Tensor>& bias,
                       const at::Tensor& input, int64_t out_features) {
  if (!bias.has_value()) return;
  check_dtype(op, "bias", *bias, input.scalar_type());
  check_numel(op, "bias", *bias, out_features, "one value per output feature");
  TORCH_CHECK(bias->dim() == 1, op, ": bias must be 1-D, got shape ", bias->sizes());
  check_same_device(op, "bias", *bias, input, "input");
}

// lora_A [r, in], lora_B [out, r], both of input's dtype and device.
// lora_A / lora_B share input's dtype, or are both float32 with a bfloat16
// or float16 input: the low-rank term is then computed in float32 (the
// factors as trained, no per-call cast; see add_lora_term).
inline void check_lora_factors(const char* op, const at::Tensor& input, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, int64_t out_features,
                               int64_t in_features) {
  const bool reduced = input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf;
  const at::ScalarType factors =
      reduced && lora_A.scalar_type() == at::kFloat ? at::kFloat : input.scalar_type();
  TORCH_CHECK(lora_A.scalar_type() == factors, op, ": lora_A must be ", input.scalar_type(),
              reduced ? " (input's dtype) or float32" : " (input's dtype)", ", got ",
              lora_A.scalar_type());
  check_dtype(op, "lora_B", lora_B, factors);
  check_same_device(op, "lora_A", lora_A, input, "input");
  check_same_device(op, "lora_B", lora_B, input, "input");
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == in_features, op,
              ": lora_A must have shape [r, ", in_features, "], got ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == out_features &&
                  lora_B.size(1) == lora_A.size(0),
              op, ": lora_B must have shape [", out_features, ", ", lora_A.size(0), "], got ",
              lora_B.sizes());
}

inline void check_lora_input(const char* op, const std::optional<at::Tensor>& lora_input,
                             const at::Tensor& input) {
  if (!lora_input.has_value()) return;
  check_dtype(op, "lora_input", *lora_input, input.scalar_type());
  TORCH_CHECK(lora_input->sizes() == input.sizes(), op,
              ": lora_input must have input's shape ", input.sizes(), ", got ",
              lora_input->sizes());
  check_same_device(op, "lora_input", *lora_input, input, "input");
}

// nf4_linear's arguments, validated: input [..., in_features] and bias against
// the NF4 weight group.
inline Nf4WeightArgs checked_linear_weight(
    const char* op, const at::Tensor& input, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    double offset, const c10::SymInt& out_features, const c10::SymInt& in_features,
    int64_t blocksize, const std::optional<at::Tensor>& bias) {
  Nf4WeightArgs weight{packed, absmax, nested_absmax, nested_code, offset,
                       out_features.expect_int(), in_features.expect_int(), blocksize};
  check_linear_input(op, input, weight.in_features);
  weight.validate(op, input);
  check_bias(op, bias, input, weight.out_features);
  return weight;
}

// nf4_linear_grad_input's arguments, validated: grad_output [..., out_features].
inline Nf4WeightArgs checked_grad_input_weight(
    const char* op, const at::Tensor& grad_output, const at::Tensor& packed,
    const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, double offset,
    const c10::SymInt& out_features, const c10::SymInt& in_features, int64_t blocksize) {
  Nf4WeightArgs weight{packed, absmax, nested_absmax, nested_code, offset,
                       out_features.expect_int(), in_features.expect_int(), blocksize};
  check_linear_float(op, "grad_output", grad_output);
  TORCH_CHECK(grad_output.dim() >= 1 && grad_output.size(-1) == weight.out_features, op,
              ": grad_output's last dimension must be out_features=", weight.out_features,
              ", got shape ", grad_output.sizes());
  weight.validate(op, grad_output);
  return weight;
}

}  // namespace lowrank

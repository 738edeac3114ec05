// Argument validation shared by the CPU and CUDA glue. Every message names the
// op, the argument, what was expected and what came.
#pragma once

#include <optional>

#include "core/nf4.h"
#include "glue_helpers.h"

namespace lowrank {

inline bool is_supported_float(ScalarType type) {
  return type == kFloat || type == kBFloat16 || type == kHalf;
}

inline void check_float_tensor(const char* op, const char* name, const Tensor& tensor) {
  LOWRANK_CHECK(is_supported_float(tensor.scalar_type()), op, ": ", name,
              " must be float32, bfloat16 or float16, got ", tensor.scalar_type());
}

// The linear ops (nf4_linear, lora_linear, qlora_linear and their backward)
// also take float64: a reference path multiplies in ATen with the NF4 weight
// decoded exactly, so float64 models run and torch.autograd.gradcheck works.
inline void check_linear_float(const char* op, const char* name, const Tensor& tensor) {
  LOWRANK_CHECK(is_supported_float(tensor.scalar_type()) || tensor.scalar_type() == kDouble,
              op, ": ", name, " must be float32, bfloat16, float16 or float64, got ",
              tensor.scalar_type());
}

inline void check_blocksize(const char* op, int64_t blocksize) {
  LOWRANK_CHECK(nf4::valid_blocksize(blocksize), op,
              ": blocksize must be a power of two in [32, 4096], got ", blocksize);
}

inline void check_same_device(const char* op, const char* name, const Tensor& tensor,
                              const Tensor& reference, const char* reference_name) {
  const torch::stable::Device device = tensor.device();
  const torch::stable::Device expected = reference.device();
  LOWRANK_CHECK(device == expected, op, ": ", name, " is on ", DeviceName{device}, " but ",
                reference_name, " is on ", DeviceName{expected});
}

inline void check_dtype(const char* op, const char* name, const Tensor& tensor,
                        ScalarType expected) {
  LOWRANK_CHECK(tensor.scalar_type() == expected, op, ": ", name, " must be ", expected, ", got ",
              tensor.scalar_type());
}

inline void check_numel(const char* op, const char* name, const Tensor& tensor,
                        int64_t expected, const char* why) {
  LOWRANK_CHECK(tensor.numel() == expected, op, ": ", name, " must have ", expected,
              " elements (", why, "), got ", tensor.numel());
}

// A shape argument's element count: every size non-negative, the total
// positive.
inline int64_t checked_numel(const char* op, IntArray shape) {
  const Shape printed{std::vector<int64_t>(shape.begin(), shape.end())};
  int64_t numel = 1;
  for (const int64_t size : shape) {
    LOWRANK_CHECK(size >= 0, op, ": shape must not have negative sizes, got ", printed);
    numel *= size;
  }
  LOWRANK_CHECK(numel > 0, op, ": shape must describe a non-empty tensor, got ", printed);
  return numel;
}

// nf4_dequantize's arguments, validated; returns the element count of shape.
inline int64_t check_nf4_dequantize_args(const Tensor& packed, const Tensor& absmax,
                                         IntArray shape, int64_t blocksize, ScalarType dtype) {
  constexpr const char* op = "nf4_dequantize";
  check_blocksize(op, blocksize);
  LOWRANK_CHECK(is_supported_float(dtype), op,
                ": dtype must be float32, bfloat16 or float16, got ", dtype);
  check_dtype(op, "packed", packed, kByte);
  check_dtype(op, "absmax", absmax, kFloat);
  check_same_device(op, "absmax", absmax, packed, "packed");
  const int64_t numel = checked_numel(op, shape);
  check_numel(op, "packed", packed, nf4::packed_bytes(numel), "two 4-bit codes per byte of shape");
  check_numel(op, "absmax", absmax, nf4::num_blocks(numel, blocksize),
              "one scale per block of shape");
  return numel;
}

// quantize_blockwise_8bit's arguments, validated (all but the values: NaN or
// Inf input and an unsorted code map, which each backend checks its way).
inline void check_quantize_8bit_args(const char* op, const Tensor& input, const Tensor& code,
                                     int64_t blocksize) {
  check_dtype(op, "input", input, kFloat);
  check_dtype(op, "code", code, kFloat);
  check_numel(op, "code", code, 256, "an 8-bit code map");
  check_same_device(op, "code", code, input, "input");
  LOWRANK_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  LOWRANK_CHECK(input.numel() > 0, op, ": input must not be empty");
}

inline void check_dequantize_8bit_args(const char* op, const Tensor& codes, const Tensor& absmax,
                                       const Tensor& code, int64_t blocksize) {
  check_dtype(op, "codes", codes, kByte);
  check_dtype(op, "absmax", absmax, kFloat);
  check_dtype(op, "code", code, kFloat);
  check_numel(op, "code", code, 256, "an 8-bit code map");
  check_same_device(op, "absmax", absmax, codes, "codes");
  check_same_device(op, "code", code, codes, "codes");
  LOWRANK_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  check_numel(op, "absmax", absmax, nf4::num_blocks(codes.numel(), blocksize),
              "one scale per block of codes");
}

// The NF4 weight argument group of nf4_linear / qlora_linear (see
// registration.cpp), validated against the input's device.
struct Nf4WeightArgs {
  Tensor packed;
  Tensor absmax;
  OptionalTensor nested_absmax;
  OptionalTensor nested_code;
  double offset;
  int64_t out_features;
  int64_t in_features;
  int64_t blocksize;

  int64_t numel() const { return out_features * in_features; }
  int64_t num_blocks() const { return nf4::num_blocks(numel(), blocksize); }
  bool nested() const { return nested_absmax.has_value(); }

  void validate(const char* op, const Tensor& device_reference) const {
    LOWRANK_CHECK(out_features > 0 && in_features > 0, op,
                ": out_features and in_features must be positive, got ", out_features, " and ",
                in_features);
    check_blocksize(op, blocksize);
    check_dtype(op, "packed", packed, kByte);
    check_numel(op, "packed", packed, nf4::packed_bytes(numel()),
                "two 4-bit codes per byte of out_features * in_features");
    check_same_device(op, "packed", packed, device_reference, "input");
    check_same_device(op, "absmax", absmax, device_reference, "input");
    check_numel(op, "absmax", absmax, num_blocks(), "one scale per block");
    LOWRANK_CHECK(nested_absmax.has_value() == nested_code.has_value(), op,
                ": nested_absmax and nested_code must both be given (double quantization) or "
                "both be None");
    if (nested()) {
      check_dtype(op, "absmax (double-quantized codes)", absmax, kByte);
      check_dtype(op, "nested_absmax", *nested_absmax, kFloat);
      check_dtype(op, "nested_code", *nested_code, kFloat);
      check_numel(op, "nested_absmax", *nested_absmax,
                  nf4::num_blocks(num_blocks(), nf4::kNestedBlocksize),
                  "one scale per 256 blocks");
      check_numel(op, "nested_code", *nested_code, 256, "the 8-bit code map");
      check_same_device(op, "nested_absmax", *nested_absmax, device_reference, "input");
      check_same_device(op, "nested_code", *nested_code, device_reference, "input");
    } else {
      check_dtype(op, "absmax", absmax, kFloat);
    }
  }
};

// input [..., in_features] of a float dtype the linear ops take.
inline void check_linear_input(const char* op, const Tensor& input, int64_t in_features) {
  check_linear_float(op, "input", input);
  LOWRANK_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  LOWRANK_CHECK(input.size(input.dim() - 1) == in_features, op,
                ": input's last dimension must be in_features=", in_features,
                ", got input of shape ", shape_of(input));
}

inline void check_bias(const char* op, const OptionalTensor& bias,
                       const Tensor& input, int64_t out_features) {
  if (!bias.has_value()) return;
  check_dtype(op, "bias", *bias, input.scalar_type());
  check_numel(op, "bias", *bias, out_features, "one value per output feature");
  LOWRANK_CHECK(bias->dim() == 1, op, ": bias must be 1-D, got shape ", shape_of(*bias));
  check_same_device(op, "bias", *bias, input, "input");
}

// lora_A [r, in], lora_B [out, r], both of input's dtype and device.
// lora_A / lora_B share input's dtype, or are both float32 with a bfloat16
// or float16 input: the low-rank term is then computed in float32 (the
// factors as trained, no per-call cast; see add_lora_term).
inline void check_lora_factors(const char* op, const Tensor& input, const Tensor& lora_A,
                               const Tensor& lora_B, int64_t out_features,
                               int64_t in_features) {
  const bool reduced = input.scalar_type() == kBFloat16 || input.scalar_type() == kHalf;
  const ScalarType factors =
      reduced && lora_A.scalar_type() == kFloat ? kFloat : input.scalar_type();
  LOWRANK_CHECK(lora_A.scalar_type() == factors, op, ": lora_A must be ", input.scalar_type(),
              reduced ? " (input's dtype) or float32" : " (input's dtype)", ", got ",
              lora_A.scalar_type());
  check_dtype(op, "lora_B", lora_B, factors);
  check_same_device(op, "lora_A", lora_A, input, "input");
  check_same_device(op, "lora_B", lora_B, input, "input");
  LOWRANK_CHECK(lora_A.dim() == 2 && lora_A.size(1) == in_features, op,
              ": lora_A must have shape [r, ", in_features, "], got ", shape_of(lora_A));
  LOWRANK_CHECK(lora_B.dim() == 2 && lora_B.size(0) == out_features &&
                  lora_B.size(1) == lora_A.size(0),
              op, ": lora_B must have shape [", out_features, ", ", lora_A.size(0), "], got ",
              shape_of(lora_B));
}

inline void check_lora_input(const char* op, const OptionalTensor& lora_input,
                             const Tensor& input) {
  if (!lora_input.has_value()) return;
  check_dtype(op, "lora_input", *lora_input, input.scalar_type());
  LOWRANK_CHECK(same_sizes(*lora_input, sizes_vector(input)), op,
                ": lora_input must have input's shape ", shape_of(input), ", got ",
                shape_of(*lora_input));
  check_same_device(op, "lora_input", *lora_input, input, "input");
}

// nf4_linear's arguments, validated: input [..., in_features] and bias against
// the NF4 weight group.
inline Nf4WeightArgs checked_linear_weight(
    const char* op, const Tensor& input, const Tensor& packed, const Tensor& absmax,
    const OptionalTensor& nested_absmax, const OptionalTensor& nested_code,
    double offset, int64_t out_features, int64_t in_features, int64_t blocksize,
    const OptionalTensor& bias) {
  Nf4WeightArgs weight{packed, absmax, nested_absmax, nested_code, offset,
                       out_features, in_features, blocksize};
  check_linear_input(op, input, weight.in_features);
  weight.validate(op, input);
  check_bias(op, bias, input, weight.out_features);
  return weight;
}

// nf4_linear_grad_input's arguments, validated: grad_output [..., out_features].
inline Nf4WeightArgs checked_grad_input_weight(
    const char* op, const Tensor& grad_output, const Tensor& packed,
    const Tensor& absmax, const OptionalTensor& nested_absmax,
    const OptionalTensor& nested_code, double offset, int64_t out_features,
    int64_t in_features, int64_t blocksize) {
  Nf4WeightArgs weight{packed, absmax, nested_absmax, nested_code, offset,
                       out_features, in_features, blocksize};
  check_linear_float(op, "grad_output", grad_output);
  LOWRANK_CHECK(grad_output.dim() >= 1 &&
                    grad_output.size(grad_output.dim() - 1) == weight.out_features,
                op, ": grad_output's last dimension must be out_features=", weight.out_features,
                ", got shape ", shape_of(grad_output));
  weight.validate(op, grad_output);
  return weight;
}

}  // namespace lowrank

// Calls of this library's own ops through the dispatcher, for glue that
// builds on them: the fused LoRA ops call nf4_linear / nf4_linear_grad_input
// (so each backend's 4-bit kernels serve), the autograd kernels call every
// forward and backward op below the autograd key.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

#include "core/nf4.h"

namespace lowrank {

using OptionalTensor = std::optional<at::Tensor>;

// The typed handle of op `name` ("lowrank_ext::..."), looked up once per
// call site (callers keep it in a function-local static).
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline at::Tensor call_nf4_linear(const at::Tensor& input, const at::Tensor& packed,
                                  const at::Tensor& absmax, const OptionalTensor& nested_absmax,
                                  const OptionalTensor& nested_code, double offset,
                                  const c10::SymInt& out_features, const c10::SymInt& in_features,
                                  int64_t blocksize, const OptionalTensor& bias) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const OptionalTensor&, const OptionalTensor&, double, c10::SymInt,
                         c10::SymInt, int64_t, const OptionalTensor&)>("lowrank_ext::nf4_linear");
  return op.call(input, packed, absmax, nested_absmax, nested_code, offset, out_features,
                 in_features, blocksize, bias);
}

inline at::Tensor call_nf4_linear_grad_input(const at::Tensor& grad_output,
                                             const at::Tensor& packed, const at::Tensor& absmax,
                                             const OptionalTensor& nested_absmax,
                                             const OptionalTensor& nested_code, double offset,
                                             const c10::SymInt& out_features,
                                             const c10::SymInt& in_features, int64_t blocksize) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const OptionalTensor&, const OptionalTensor&, double, c10::SymInt,
                         c10::SymInt, int64_t)>("lowrank_ext::nf4_linear_grad_input");
  return op.call(grad_output, packed, absmax, nested_absmax, nested_code, offset, out_features,
                 in_features, blocksize);
}

inline at::Tensor call_nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax,
                                      c10::SymIntArrayRef shape, int64_t blocksize,
                                      at::ScalarType dtype) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, int64_t,
                         at::ScalarType)>("lowrank_ext::nf4_dequantize");
  return op.call(packed, absmax, shape, blocksize, dtype);
}

inline at::Tensor call_dequantize_blockwise_8bit(const at::Tensor& codes, const at::Tensor& absmax,
                                                 const at::Tensor& code, int64_t blocksize) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>(
          "lowrank_ext::dequantize_blockwise_8bit");
  return op.call(codes, absmax, code, blocksize);
}

// The dense [out_features, in_features] NF4 weight, decoded exactly (codebook
// value times fp32 block scale, in fp32) and then cast to `dtype`; float64
// holds every decoded value exactly. For the paths that need the weight as a
// tensor: float64 inputs and forward-mode AD (their products run in ATen).
inline at::Tensor nf4_dense_weight(const at::Tensor& packed, const at::Tensor& absmax,
                                   const OptionalTensor& nested_absmax,
                                   const OptionalTensor& nested_code, double offset,
                                   const c10::SymInt& out_features,
                                   const c10::SymInt& in_features, int64_t blocksize,
                                   at::ScalarType dtype) {
  at::Tensor scales = absmax;
  if (nested_absmax.has_value() && nested_absmax->defined()) {
    scales = call_dequantize_blockwise_8bit(absmax, *nested_absmax, *nested_code,
                                            nf4::kNestedBlocksize)
                 .add(offset);
  }
  const c10::SymInt shape[] = {out_features, in_features};
  return call_nf4_dequantize(packed, scales, shape, blocksize, at::kFloat).to(dtype);
}

}  // namespace lowrank

// Calls of this library's own ops through the dispatcher, for glue that
// builds on them: the fused LoRA ops call nf4_linear / nf4_linear_grad_input
// (so each backend's 4-bit kernels serve), the autograd kernels call every
// forward and backward op below the autograd key.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

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

}  // namespace lowrank

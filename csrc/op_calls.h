// Each op's C++ signature, declared once (the schemas are in
// registration.cpp): every backend kernel is a function of its op's type here
// (LOWRANK_IMPL checks it where the kernel registers), and the typed calls of
// this library's own ops through the dispatcher take the same arguments.
// Glue that builds on the ops uses those calls: the fused LoRA ops call
// nf4_linear / nf4_linear_grad_input, so each backend's 4-bit kernels serve.
#pragma once

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "core/nf4.h"
#include "glue_helpers.h"

namespace lowrank {

using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

namespace signature {

using dropout = Tensor(const Tensor& input, double p, const Tensor& seed);
using nf4_quantize = Tensors2(const Tensor& input, int64_t blocksize);
using nf4_dequantize = Tensor(const Tensor& packed, const Tensor& absmax, IntArray shape,
                              int64_t blocksize, ScalarType dtype);
using quantize_blockwise_8bit = Tensors2(const Tensor& input, const Tensor& code,
                                         int64_t blocksize);
using dequantize_blockwise_8bit = Tensor(const Tensor& codes, const Tensor& absmax,
                                         const Tensor& code, int64_t blocksize);
using nf4_linear = Tensor(const Tensor& input, const Tensor& packed, const Tensor& absmax,
                          const OptionalTensor& nested_absmax, const OptionalTensor& nested_code,
                          double offset, int64_t out_features, int64_t in_features,
                          int64_t blocksize, const OptionalTensor& bias);
using nf4_linear_grad_input = Tensor(const Tensor& grad_output, const Tensor& packed,
                                     const Tensor& absmax, const OptionalTensor& nested_absmax,
                                     const OptionalTensor& nested_code, double offset,
                                     int64_t out_features, int64_t in_features,
                                     int64_t blocksize);
using lora_linear = Tensor(const Tensor& input, const OptionalTensor& lora_input,
                           const Tensor& weight, const OptionalTensor& bias, const Tensor& lora_A,
                           const Tensor& lora_B, double scaling);
using lora_linear_backward = Tensors4(const Tensor& grad_output, const Tensor& input,
                                      const OptionalTensor& lora_input, const Tensor& weight,
                                      const Tensor& lora_A, const Tensor& lora_B,
                                      double scaling);
using qlora_linear = Tensor(const Tensor& input, const OptionalTensor& lora_input,
                            const Tensor& packed, const Tensor& absmax,
                            const OptionalTensor& nested_absmax,
                            const OptionalTensor& nested_code, double offset,
                            int64_t out_features, int64_t in_features, int64_t blocksize,
                            const OptionalTensor& bias, const Tensor& lora_A,
                            const Tensor& lora_B, double scaling);
using qlora_linear_backward = Tensors4(const Tensor& grad_output, const Tensor& input,
                                       const OptionalTensor& lora_input, const Tensor& packed,
                                       const Tensor& absmax, const OptionalTensor& nested_absmax,
                                       const OptionalTensor& nested_code, double offset,
                                       int64_t out_features, int64_t in_features,
                                       int64_t blocksize, const Tensor& lora_A,
                                       const Tensor& lora_B, double scaling);
using multi_lora_linear = Tensor(const Tensor& input, const Tensor& base_output,
                                 const Tensor& lora_A, const Tensor& lora_B, const Tensor& ranks,
                                 const Tensor& scalings, const Tensor& adapter_indices);
using multi_lora_linear_backward = Tensors3(const Tensor& grad_output, const Tensor& input,
                                            const Tensor& lora_A, const Tensor& lora_B,
                                            const Tensor& ranks, const Tensor& scalings,
                                            const Tensor& adapter_indices);

}  // namespace signature

// Backend kernels that other glue calls directly, without a dispatcher hop
// (a lookup by name and a boxed call, several microseconds): the fused QLoRA
// ops run each backend's 4-bit GEMM this way.
namespace cpu {
signature::nf4_linear nf4_linear;
signature::nf4_linear_grad_input nf4_linear_grad_input;
}  // namespace cpu
#ifdef LOWRANK_WITH_CUDA
namespace cuda {
signature::nf4_linear nf4_linear;
signature::nf4_linear_grad_input nf4_linear_grad_input;
}  // namespace cuda
#endif

// m.impl("name", kernel) for a kernel of exactly op `name`'s signature.
#define LOWRANK_IMPL(m, name, kernel)                                                    \
  do {                                                                                   \
    static_assert(std::is_same_v<decltype(kernel), ::lowrank::signature::name>,          \
                  #kernel " must have " #name "'s signature (op_calls.h)");              \
    (m).impl(#name, TORCH_BOX(&kernel));                                                 \
  } while (false)

namespace detail {

template <typename Result>
struct Returns {
  static constexpr size_t count = 1;
  template <size_t N>
  static Result unpack(const std::array<StableIValue, N>& stack) {
    return torch::stable::detail::to<Result>(stack[0]);
  }
};

template <typename... Results>
struct Returns<std::tuple<Results...>> {
  static constexpr size_t count = sizeof...(Results);
  template <size_t N>
  static std::tuple<Results...> unpack(const std::array<StableIValue, N>& stack) {
    return unpack(stack, std::index_sequence_for<Results...>{});
  }
  template <size_t N, size_t... I>
  static std::tuple<Results...> unpack(const std::array<StableIValue, N>& stack,
                                       std::index_sequence<I...>) {
    return {torch::stable::detail::to<Results>(stack[I])...};
  }
};

template <typename Signature>
struct OwnOp;

template <typename Result, typename... Arguments>
struct OwnOp<Result(Arguments...)> {
  static Result call(const char* name, Arguments... arguments) {
    constexpr size_t size = std::max(sizeof...(Arguments), Returns<Result>::count);
    std::array<StableIValue, size> stack{to_stack(arguments)...};
    STABLE_TORCH_ERROR_CODE_CHECK(
        torch_call_dispatcher(name, "", stack.data(), TORCH_ABI_VERSION));
    return Returns<Result>::unpack(stack);
  }
};

}  // namespace detail

// LOWRANK_CALL(nf4_linear, input, ...): op lowrank_ext::nf4_linear through
// the dispatcher, its arguments checked against the op's signature.
#define LOWRANK_CALL(name, ...) \
  ::lowrank::detail::OwnOp<::lowrank::signature::name>::call("lowrank_ext::" #name, __VA_ARGS__)

// The dense [out_features, in_features] NF4 weight, decoded exactly (codebook
// value times fp32 block scale, in fp32) and then cast to `dtype`; float64
// holds every decoded value exactly. For the float64 reference path (its
// products run in ATen).
inline Tensor nf4_dense_weight(const Tensor& packed, const Tensor& absmax,
                               const OptionalTensor& nested_absmax,
                               const OptionalTensor& nested_code, double offset,
                               int64_t out_features, int64_t in_features, int64_t blocksize,
                               ScalarType dtype) {
  Tensor scales = absmax;
  if (nested_absmax.has_value()) {
    Tensor decoded = LOWRANK_CALL(dequantize_blockwise_8bit, absmax, *nested_absmax,
                                  *nested_code, nf4::kNestedBlocksize);
    scales = aten_add(decoded, offset);
  }
  const std::vector<int64_t> shape = {out_features, in_features};
  return to_dtype(
      LOWRANK_CALL(nf4_dequantize, packed, scales, IntArray(shape), blocksize, kFloat), dtype);
}

}  // namespace lowrank

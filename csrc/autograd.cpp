// Autograd of every differentiable op, registered in C++ for every backend.
//
// A Python autograd kernel (torch.library.register_autograd) runs on every
// call, under no_grad too: about 7 us per call hot and 35 us right after a
// large GEMM (its interpreter path is out of the caches by then). That is a
// tenth of a mixed-adapter batch's adapter term and of a 4-bit GEMV at batch
// one, so the kernels here are C++, and with nothing needing a gradient they
// call the op directly (no node, nothing saved).
//
//   dropout:           d input = dropout(grad_output, p, seed) (same mask)
//   nf4_linear:        d input = nf4_linear_grad_input(...), d bias = sum of rows
//   lora_linear:       d input, d lora_input, d lora_A, d lora_B from
//                      lora_linear_backward; d weight = grad_output^T input;
//                      d bias = sum of rows
//   qlora_linear:      as lora_linear, from qlora_linear_backward; the NF4
//                      weight gets no gradient
//   multi_lora_linear: d input, d lora_A, d lora_B from
//                      multi_lora_linear_backward; d base_output = grad_output
// Codes, scales, seeds, ranks, scalings and indices get no gradient.
//
// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd): the
// Function nodes are backward-only, so when any argument carries a tangent the
// op is computed instead by the same math in differentiable ATen ops (the NF4
// weight decoded exactly into a dense tensor), whose forward formulas carry
// the tangents and whose backward still works. multi_lora_linear refuses
// tangents with an error instead of dropping them.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "glue_helpers.h"
#include "op_calls.h"

namespace lowrank {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Grads4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

bool present(const OptionalTensor& tensor) { return tensor.has_value() && tensor->defined(); }

bool requires_grad(const OptionalTensor& tensor) {
  return present(tensor) && tensor->requires_grad();
}

// needs_input_grad counts only the tensor arguments that are present (an absent
// optional tensor has no edge), while backward returns one slot per argument.
// forward records each argument's edge, or -1, under "edges".
void record_edges(AutogradContext* ctx, const std::vector<bool>& is_tensor) {
  std::vector<int64_t> edges;
  int64_t next = 0;
  for (const bool tensor : is_tensor) edges.push_back(tensor ? next++ : -1);
  ctx->saved_data["edges"] = edges;
}

bool needs(AutogradContext* ctx, size_t argument) {
  const int64_t edge = ctx->saved_data["edges"].toIntList().get(argument);
  return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge));
}

OptionalTensor optional(const at::Tensor& saved) {
  return saved.defined() ? OptionalTensor(saved) : std::nullopt;
}

at::Tensor bias_grad(AutogradContext* ctx, size_t argument, const at::Tensor& grad_output) {
  return needs(ctx, argument) ? flatten_rows(grad_output).sum(0) : at::Tensor();
}

// A tangent at forward-AD level 0 (torch.func's jvp reaches the op with its
// tangents at that level too).
bool has_tangent(const at::Tensor& tensor) {
  return tensor.defined() && tensor._fw_grad(/*level=*/0).defined();
}

bool has_tangent(const OptionalTensor& tensor) { return present(tensor) && has_tangent(*tensor); }

// scaling * (rows @ A.T) @ B.T in differentiable ATen ops, in the factors'
// dtype and rounded once to input's (the fused ops' precision).
at::Tensor lora_term(const at::Tensor& input, const OptionalTensor& lora_input,
                     const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  const at::Tensor& rows = present(lora_input) ? *lora_input : input;
  return at::linear(at::linear(rows.to(lora_A.scalar_type()), lora_A), lora_B)
      .mul(scaling)
      .to(input.scalar_type());
}

// input @ dequant(W).T + bias in differentiable ATen ops.
at::Tensor nf4_linear_reference(const at::Tensor& input, const at::Tensor& packed,
                                const at::Tensor& absmax, const OptionalTensor& nested_absmax,
                                const OptionalTensor& nested_code, double offset,
                                const c10::SymInt& out_features, const c10::SymInt& in_features,
                                int64_t blocksize, const OptionalTensor& bias) {
  at::Tensor weight;
  {
    // The weight is a constant: decoded without autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    weight = nf4_dense_weight(packed, absmax, nested_absmax, nested_code, offset, out_features,
                              in_features, blocksize, input.scalar_type());
  }
  return at::linear(input, weight, bias);
}

// ------------------------------------------------------------------ dropout --

at::Tensor call_dropout(const at::Tensor& input, double p, const at::Tensor& seed) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, double, const at::Tensor&)>("lowrank_ext::dropout");
  return op.call(input, p, seed);
}

class Dropout : public torch::autograd::Function<Dropout> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, double p,
                            const at::Tensor& seed) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({seed});
    ctx->saved_data["p"] = p;
    return call_dropout(input, p, seed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The mask is a function of (seed, index): the op applied to the gradient
    // multiplies it by exactly the forward's keep / (1 - p).
    const at::Tensor seed = ctx->get_saved_variables()[0];
    return {call_dropout(grad_outputs[0].contiguous(), ctx->saved_data["p"].toDouble(), seed),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor dropout_autograd(const at::Tensor& input, double p, const at::Tensor& seed) {
  if (has_tangent(input)) {
    // The op multiplies by a fixed keep / (1 - p) per element in fp32 and
    // rounds once: that factor, as an fp32 tensor, times input, the same way.
    at::Tensor factor;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      factor = call_dropout(at::ones_like(input, at::kFloat), p, seed);
    }
    const at::ScalarType compute = at::promote_types(input.scalar_type(), at::kFloat);
    return (input.to(compute) * factor.to(compute)).to(input.scalar_type());
  }
  if (!(at::GradMode::is_enabled() && input.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_dropout(input, p, seed);
  }
  return Dropout::apply(input, p, seed);
}

// --------------------------------------------------------------- nf4_linear --

// The NF4 weight's non-tensor arguments, kept for the backward.
void save_nf4_arguments(AutogradContext* ctx, double offset, const c10::SymInt& out_features,
                        const c10::SymInt& in_features, int64_t blocksize) {
  ctx->saved_data["offset"] = offset;
  ctx->saved_data["out_features"] = out_features;
  ctx->saved_data["in_features"] = in_features;
  ctx->saved_data["blocksize"] = blocksize;
}

class Nf4Linear : public torch::autograd::Function<Nf4Linear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& packed,
                            const at::Tensor& absmax, const OptionalTensor& nested_absmax,
                            const OptionalTensor& nested_code, double offset,
                            c10::SymInt out_features, c10::SymInt in_features, int64_t blocksize,
                            const OptionalTensor& bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    record_edges(ctx, {true, true, true, present(nested_absmax), present(nested_code), false, false,
                       false, false, present(bias)});
    ctx->save_for_backward(
        {packed, absmax, nested_absmax.value_or(at::Tensor()), nested_code.value_or(at::Tensor())});
    save_nf4_arguments(ctx, offset, out_features, in_features, blocksize);
    return call_nf4_linear(input, packed, absmax, nested_absmax, nested_code, offset, out_features,
                           in_features, blocksize, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_output = grad_outputs[0];
    auto& data = ctx->saved_data;
    at::Tensor grad_input;
    if (needs(ctx, 0)) {
      grad_input = call_nf4_linear_grad_input(
          grad_output, saved[0], saved[1], optional(saved[2]), optional(saved[3]),
          data["offset"].toDouble(), data["out_features"].toSymInt(),
          data["in_features"].toSymInt(), data["blocksize"].toInt());
    }
    const at::Tensor none;
    return {grad_input, none, none, none, none,
            none,       none, none, none, bias_grad(ctx, 9, grad_output)};
  }
};

at::Tensor nf4_linear_autograd(const at::Tensor& input, const at::Tensor& packed,
                               const at::Tensor& absmax, const OptionalTensor& nested_absmax,
                               const OptionalTensor& nested_code, double offset,
                               c10::SymInt out_features, c10::SymInt in_features, int64_t blocksize,
                               const OptionalTensor& bias) {
  if (has_tangent(input) || has_tangent(bias)) {
    return nf4_linear_reference(input, packed, absmax, nested_absmax, nested_code, offset,
                                out_features, in_features, blocksize, bias);
  }
  if (!(at::GradMode::is_enabled() && (input.requires_grad() || requires_grad(bias)))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_nf4_linear(input, packed, absmax, nested_absmax, nested_code, offset, out_features,
                           in_features, blocksize, bias);
  }
  return Nf4Linear::apply(input, packed, absmax, nested_absmax, nested_code, offset,
                          std::move(out_features), std::move(in_features), blocksize, bias);
}

// -------------------------------------------------------------- lora_linear --

at::Tensor call_lora_linear(const at::Tensor& input, const OptionalTensor& lora_input,
                            const at::Tensor& weight, const OptionalTensor& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const OptionalTensor&, const at::Tensor&,
                         const OptionalTensor&, const at::Tensor&, const at::Tensor&, double)>(
          "lowrank_ext::lora_linear");
  return op.call(input, lora_input, weight, bias, lora_A, lora_B, scaling);
}

Grads4 call_lora_linear_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                 const OptionalTensor& lora_input, const at::Tensor& weight,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B,
                                 double scaling) {
  static const auto op =
      find_op<Grads4(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, double)>(
          "lowrank_ext::lora_linear_backward");
  return op.call(grad_output, input, lora_input, weight, lora_A, lora_B, scaling);
}

// Gradients of (input, lora_input, lora_A, lora_B) from a lora/qlora backward
// op, kept only where needed. With lora_input absent, the op's grad_input
// already holds both paths.
variable_list adapter_grads(AutogradContext* ctx, const Grads4& grads,
                            std::initializer_list<size_t> arguments) {
  const at::Tensor* values[] = {&std::get<0>(grads), &std::get<1>(grads), &std::get<2>(grads),
                                &std::get<3>(grads)};
  variable_list kept;
  size_t slot = 0;
  for (const size_t argument : arguments) {
    kept.push_back(needs(ctx, argument) ? *values[slot] : at::Tensor());
    ++slot;
  }
  return kept;
}

class LoraLinear : public torch::autograd::Function<LoraLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const OptionalTensor& lora_input, const at::Tensor& weight,
                            const OptionalTensor& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    record_edges(ctx, {true, present(lora_input), true, present(bias), true, true, false});
    ctx->save_for_backward({input, lora_input.value_or(at::Tensor()), weight, lora_A, lora_B});
    ctx->saved_data["scaling"] = scaling;
    return call_lora_linear(input, lora_input, weight, bias, lora_A, lora_B, scaling);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_output = grad_outputs[0];
    const at::Tensor &input = saved[0], &weight = saved[2];
    Grads4 grads;
    if (needs(ctx, 0) || needs(ctx, 1) || needs(ctx, 4) || needs(ctx, 5)) {
      grads = call_lora_linear_backward(grad_output, input, optional(saved[1]), weight, saved[3],
                                        saved[4], ctx->saved_data["scaling"].toDouble());
    }
    const variable_list adapter = adapter_grads(ctx, grads, {0, 1, 4, 5});
    const at::Tensor grad_weight =
        needs(ctx, 2) ? flatten_rows(grad_output).t().mm(flatten_rows(input)) : at::Tensor();
    return {adapter[0], adapter[1], grad_weight, bias_grad(ctx, 3, grad_output),
            adapter[2], adapter[3], at::Tensor()};
  }
};

at::Tensor lora_linear_autograd(const at::Tensor& input, const OptionalTensor& lora_input,
                                const at::Tensor& weight, const OptionalTensor& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B,
                                double scaling) {
  if (has_tangent(input) || has_tangent(lora_input) || has_tangent(weight) ||
      has_tangent(bias) || has_tangent(lora_A) || has_tangent(lora_B)) {
    return at::linear(input, weight, bias) + lora_term(input, lora_input, lora_A, lora_B, scaling);
  }
  const bool needs_graph =
      at::GradMode::is_enabled() &&
      (input.requires_grad() || requires_grad(lora_input) || weight.requires_grad() ||
       requires_grad(bias) || lora_A.requires_grad() || lora_B.requires_grad());
  if (!needs_graph) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_lora_linear(input, lora_input, weight, bias, lora_A, lora_B, scaling);
  }
  return LoraLinear::apply(input, lora_input, weight, bias, lora_A, lora_B, scaling);
}

// ------------------------------------------------------------- qlora_linear --

at::Tensor call_qlora_linear(const at::Tensor& input, const OptionalTensor& lora_input,
                             const at::Tensor& packed, const at::Tensor& absmax,
                             const OptionalTensor& nested_absmax, const OptionalTensor& nested_code,
                             double offset, const c10::SymInt& out_features,
                             const c10::SymInt& in_features, int64_t blocksize,
                             const OptionalTensor& bias, const at::Tensor& lora_A,
                             const at::Tensor& lora_B, double scaling) {
  static const auto op = find_op<at::Tensor(
      const at::Tensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&,
      const OptionalTensor&, const OptionalTensor&, double, c10::SymInt, c10::SymInt, int64_t,
      const OptionalTensor&, const at::Tensor&, const at::Tensor&, double)>(
      "lowrank_ext::qlora_linear");
  return op.call(input, lora_input, packed, absmax, nested_absmax, nested_code, offset,
                 out_features, in_features, blocksize, bias, lora_A, lora_B, scaling);
}

Grads4 call_qlora_linear_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  const OptionalTensor& lora_input, const at::Tensor& packed,
                                  const at::Tensor& absmax, const OptionalTensor& nested_absmax,
                                  const OptionalTensor& nested_code, double offset,
                                  const c10::SymInt& out_features, const c10::SymInt& in_features,
                                  int64_t blocksize, const at::Tensor& lora_A,
                                  const at::Tensor& lora_B, double scaling) {
  static const auto op =
      find_op<Grads4(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&,
                     const at::Tensor&, const OptionalTensor&, const OptionalTensor&, double,
                     c10::SymInt, c10::SymInt, int64_t, const at::Tensor&, const at::Tensor&,
                     double)>("lowrank_ext::qlora_linear_backward");
  return op.call(grad_output, input, lora_input, packed, absmax, nested_absmax, nested_code, offset,
                 out_features, in_features, blocksize, lora_A, lora_B, scaling);
}

class QloraLinear : public torch::autograd::Function<QloraLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const OptionalTensor& lora_input, const at::Tensor& packed,
                            const at::Tensor& absmax, const OptionalTensor& nested_absmax,
                            const OptionalTensor& nested_code, double offset,
                            c10::SymInt out_features, c10::SymInt in_features, int64_t blocksize,
                            const OptionalTensor& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    record_edges(
        ctx, {true, present(lora_input), true, true, present(nested_absmax), present(nested_code),
              false, false, false, false, present(bias), true, true, false});
    ctx->save_for_backward({input, lora_input.value_or(at::Tensor()), packed, absmax,
                            nested_absmax.value_or(at::Tensor()),
                            nested_code.value_or(at::Tensor()), lora_A, lora_B});
    save_nf4_arguments(ctx, offset, out_features, in_features, blocksize);
    ctx->saved_data["scaling"] = scaling;
    return call_qlora_linear(input, lora_input, packed, absmax, nested_absmax, nested_code, offset,
                             out_features, in_features, blocksize, bias, lora_A, lora_B, scaling);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_output = grad_outputs[0];
    auto& data = ctx->saved_data;
    Grads4 grads;
    if (needs(ctx, 0) || needs(ctx, 1) || needs(ctx, 11) || needs(ctx, 12)) {
      grads = call_qlora_linear_backward(grad_output, saved[0], optional(saved[1]), saved[2],
                                         saved[3], optional(saved[4]), optional(saved[5]),
                                         data["offset"].toDouble(), data["out_features"].toSymInt(),
                                         data["in_features"].toSymInt(), data["blocksize"].toInt(),
                                         saved[6], saved[7], data["scaling"].toDouble());
    }
    const variable_list adapter = adapter_grads(ctx, grads, {0, 1, 11, 12});
    const at::Tensor none;
    return {adapter[0],
            adapter[1],
            none,
            none,
            none,
            none,
            none,
            none,
            none,
            none,
            bias_grad(ctx, 10, grad_output),
            adapter[2],
            adapter[3],
            none};
  }
};

at::Tensor qlora_linear_autograd(const at::Tensor& input, const OptionalTensor& lora_input,
                                 const at::Tensor& packed, const at::Tensor& absmax,
                                 const OptionalTensor& nested_absmax,
                                 const OptionalTensor& nested_code, double offset,
                                 c10::SymInt out_features, c10::SymInt in_features,
                                 int64_t blocksize, const OptionalTensor& bias,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B,
                                 double scaling) {
  if (has_tangent(input) || has_tangent(lora_input) || has_tangent(bias) ||
      has_tangent(lora_A) || has_tangent(lora_B)) {
    return nf4_linear_reference(input, packed, absmax, nested_absmax, nested_code, offset,
                                out_features, in_features, blocksize, bias) +
           lora_term(input, lora_input, lora_A, lora_B, scaling);
  }
  const bool needs_graph =
      at::GradMode::is_enabled() &&
      (input.requires_grad() || requires_grad(lora_input) || requires_grad(bias) ||
       lora_A.requires_grad() || lora_B.requires_grad());
  if (!needs_graph) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_qlora_linear(input, lora_input, packed, absmax, nested_absmax, nested_code, offset,
                             out_features, in_features, blocksize, bias, lora_A, lora_B, scaling);
  }
  return QloraLinear::apply(input, lora_input, packed, absmax, nested_absmax, nested_code, offset,
                            std::move(out_features), std::move(in_features), blocksize, bias,
                            lora_A, lora_B, scaling);
}

// -------------------------------------------------------- multi_lora_linear --

at::Tensor call_multi_lora_linear(const at::Tensor& input, const at::Tensor& base_output,
                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                  const at::Tensor& ranks, const at::Tensor& scalings,
                                  const at::Tensor& adapter_indices) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "lowrank_ext::multi_lora_linear");
  return op.call(input, base_output, lora_A, lora_B, ranks, scalings, adapter_indices);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_multi_lora_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& ranks, const at::Tensor& scalings,
    const at::Tensor& adapter_indices) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&)>("lowrank_ext::multi_lora_linear_backward");
  return op.call(grad_output, input, lora_A, lora_B, ranks, scalings, adapter_indices);
}

class MultiLoraLinear : public torch::autograd::Function<MultiLoraLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& base_output, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, const at::Tensor& ranks,
                            const at::Tensor& scalings, const at::Tensor& adapter_indices) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({input, lora_A, lora_B, ranks, scalings, adapter_indices});
    return call_multi_lora_linear(input, base_output, lora_A, lora_B, ranks, scalings,
                                  adapter_indices);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // Every argument is a tensor, so argument i is edge i.
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_output = grad_outputs[0];
    at::Tensor grad_input, grad_A, grad_B;
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(2) || ctx->needs_input_grad(3)) {
      std::tie(grad_input, grad_A, grad_B) = call_multi_lora_linear_backward(
          grad_output, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5]);
    }
    const at::Tensor none;
    return {ctx->needs_input_grad(0) ? grad_input : none,
            ctx->needs_input_grad(1) ? grad_output : none,
            ctx->needs_input_grad(2) ? grad_A : none,
            ctx->needs_input_grad(3) ? grad_B : none,
            none,
            none,
            none};
  }
};

at::Tensor multi_lora_linear_autograd(const at::Tensor& input, const at::Tensor& base_output,
                                      const at::Tensor& lora_A, const at::Tensor& lora_B,
                                      const at::Tensor& ranks, const at::Tensor& scalings,
                                      const at::Tensor& adapter_indices) {
  TORCH_CHECK(!(has_tangent(input) || has_tangent(base_output) || has_tangent(lora_A) ||
                has_tangent(lora_B)),
              "multi_lora_linear (mixed-adapter batches, adapter_names=...) does not support "
              "forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad); "
              "run one adapter at a time (set_adapter) to get tangents");
  const bool needs_graph =
      at::GradMode::is_enabled() && (input.requires_grad() || base_output.requires_grad() ||
                                     lora_A.requires_grad() || lora_B.requires_grad());
  if (!needs_graph) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_multi_lora_linear(input, base_output, lora_A, lora_B, ranks, scalings,
                                  adapter_indices);
  }
  return MultiLoraLinear::apply(input, base_output, lora_A, lora_B, ranks, scalings,
                                adapter_indices);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, Autograd, m) {
  m.impl("dropout", &dropout_autograd);
  m.impl("nf4_linear", &nf4_linear_autograd);
  m.impl("lora_linear", &lora_linear_autograd);
  m.impl("qlora_linear", &qlora_linear_autograd);
  m.impl("multi_lora_linear", &multi_lora_linear_autograd);
}

}  // namespace lowrank

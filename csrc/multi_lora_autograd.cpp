// Autograd of multi_lora_linear, registered in C++ for every backend.
//
// The other ops register theirs from Python (torch.library.register_autograd).
// This one serves mixed-adapter batches, where the op runs once per layer per
// request and its adapter term is a fraction of a millisecond: the Python
// autograd kernel, which runs on every call even under no_grad, cost about
// 35 us per call right after a large GEMM (its interpreter path is out of the
// caches by then), a tenth of the adapter term with 32 bf16 adapters.
//
//   d input   = multi_lora_linear_backward(...)[0]
//   d base    = grad_output
//   d lora_A, d lora_B = multi_lora_linear_backward(...)[1], [2]
// ranks, scalings and adapter_indices get no gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace lowrank {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& input, const at::Tensor& base_output,
                        const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& ranks,
                        const at::Tensor& scalings, const at::Tensor& adapter_indices) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lowrank_ext::multi_lora_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&)>();
  return op.call(input, base_output, lora_A, lora_B, ranks, scalings, adapter_indices);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& ranks, const at::Tensor& scalings,
    const at::Tensor& adapter_indices) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lowrank_ext::multi_lora_linear_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
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
    return call_forward(input, base_output, lora_A, lora_B, ranks, scalings, adapter_indices);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_output = grad_outputs[0];
    at::Tensor grad_input, grad_A, grad_B;
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(2) || ctx->needs_input_grad(3)) {
      std::tie(grad_input, grad_A, grad_B) =
          call_backward(grad_output, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5]);
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
  const bool needs_graph =
      at::GradMode::is_enabled() && (input.requires_grad() || base_output.requires_grad() ||
                                     lora_A.requires_grad() || lora_B.requires_grad());
  if (!needs_graph) {  // inference: no autograd node, no saved tensors
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(input, base_output, lora_A, lora_B, ranks, scalings, adapter_indices);
  }
  return MultiLoraLinear::apply(input, base_output, lora_A, lora_B, ranks, scalings,
                                adapter_indices);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, Autograd, m) {
  m.impl("multi_lora_linear", &multi_lora_linear_autograd);
}

}  // namespace lowrank

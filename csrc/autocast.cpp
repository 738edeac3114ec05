// Autocast (torch.autocast / AMP) kernels of every op, for CPU and CUDA.
//
// Without them the dispatcher falls through the Autocast key to the backend
// kernel with autocast still on, so the ATen GEMMs inside the fused ops cast
// some operands and not others ("self and mat2 must have the same dtype").
//
// Forward ops (nf4_linear, lora_linear, qlora_linear, multi_lora_linear)
// follow torch's policy for linear: every floating activation and weight
// argument (named in kCastArguments) is cast to the autocast dtype with
// at::autocast::cached_cast (float64 is left alone, as torch leaves it), and
// the op runs below autocast. The casts sit above autograd, so a float32
// trainable factor is cast differentiably: its gradient comes back float32
// through the cast, and the parameter itself stays float32. NF4 scales
// (absmax, nested_absmax, nested_code) and multi_lora's scalings are part of
// the quantized format or float32 by contract, never cast; the NF4 weight is
// decoded into the (cast) input's dtype by the op itself.
//
// The other ops (dropout, the backward ops) cast nothing (dropout runs in its
// input's dtype, as torch's does) and run below autocast, so their own GEMMs
// see the dtypes they were given (a backward called inside an autocast region).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <string_view>

namespace lowrank {
namespace {

constexpr std::array<std::string_view, 7> kCastArguments = {
    "input", "lora_input", "weight", "bias", "lora_A", "lora_B", "base_output"};

bool is_cast_argument(std::string_view name) {
  for (const std::string_view cast : kCastArguments) {
    if (name == cast) return true;
  }
  return false;
}

template <c10::DeviceType device, bool cast>
void autocast_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  if constexpr (cast) {
    const at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
    const size_t first = stack->size() - arguments.size();
    for (size_t index = 0; index < arguments.size(); ++index) {
      c10::IValue& value = (*stack)[first + index];
      if (value.isTensor() && is_cast_argument(arguments[index].name())) {
        value = at::autocast::cached_cast(dtype, value.toTensor(), device);
      }
    }
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  op.callBoxed(stack);
}

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  for (const char* name : {"nf4_linear", "lora_linear", "qlora_linear", "multi_lora_linear"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<device, true>>());
  }
  for (const char* name : {"dropout", "nf4_linear_grad_input", "lora_linear_backward",
                           "qlora_linear_backward", "multi_lora_linear_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<device, false>>());
  }
}

}  // namespace

// Registered for CUDA in every build: the key exists without a GPU, and a CUDA
// build's kernels then need nothing more.
TORCH_LIBRARY_IMPL(lowrank_ext, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(lowrank_ext, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace lowrank

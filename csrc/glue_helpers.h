// The glue's view of torch: tensors, checks and the few ATen ops the glue
// runs, all through torch's stable ABI (torch/csrc/stable, the C shims), so
// the library loads into every torch from the stable ABI's minimum on.
//
// ATen ops the stable headers wrap are called through them; the rest go
// through torch_call_dispatcher by name, except ops with Scalar arguments
// (addmm's alpha, add's alpha), which the dispatcher call cannot take: those
// use the AOTInductor C shims of the tensor's device, which take doubles.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#ifdef LOWRANK_WITH_CUDA
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace lowrank {

using Tensor = torch::stable::Tensor;
using OptionalTensor = std::optional<Tensor>;
using ScalarType = torch::headeronly::ScalarType;
using IntArray = torch::headeronly::IntHeaderOnlyArrayRef;

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kByte = ScalarType::Byte;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kBool = ScalarType::Bool;

// ------------------------------------------------------------- messages --

// A shape printed as c10 prints sizes: [2, 3].
struct Shape {
  std::vector<int64_t> sizes;
};

inline std::ostream& operator<<(std::ostream& out, const Shape& shape) {
  out << '[';
  for (size_t i = 0; i < shape.sizes.size(); ++i) out << (i ? ", " : "") << shape.sizes[i];
  return out << ']';
}

inline Shape shape_of(const Tensor& tensor) {
  const IntArray sizes = tensor.sizes();
  return Shape{std::vector<int64_t>(sizes.begin(), sizes.end())};
}

// A device printed as c10 prints it: cpu, cuda:0.
struct DeviceName {
  torch::stable::Device device;
};

inline std::ostream& operator<<(std::ostream& out, const DeviceName& name) {
  using torch::headeronly::DeviceType;
  switch (name.device.type()) {
    case DeviceType::CPU:
      out << "cpu";
      break;
    case DeviceType::CUDA:
      out << "cuda";
      break;
    case DeviceType::Meta:
      out << "meta";
      break;
    default:
      out << "device type " << static_cast<int>(name.device.type());
  }
  if (name.device.has_index()) out << ':' << static_cast<int>(name.device.index());
  return out;
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

// TORCH_CHECK's contract with the message alone (the stable ABI's
// STD_TORCH_CHECK prefixes function, file and line): torch raises it as a
// RuntimeError with exactly this text.
#define LOWRANK_CHECK(condition, ...)                                \
  do {                                                               \
    if (!(condition)) {                                              \
      throw std::runtime_error(::lowrank::message(__VA_ARGS__));     \
    }                                                                \
  } while (false)

// --------------------------------------------------------------- shapes --

inline std::vector<int64_t> sizes_vector(const Tensor& tensor) {
  const IntArray sizes = tensor.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end());
}

inline bool same_sizes(const Tensor& tensor, const std::vector<int64_t>& expected) {
  const IntArray sizes = tensor.sizes();
  return sizes.size() == expected.size() &&
         std::equal(sizes.begin(), sizes.end(), expected.begin());
}

// input's shape with the last dimension replaced by `features`.
inline std::vector<int64_t> output_shape(const Tensor& input, int64_t features) {
  std::vector<int64_t> shape = sizes_vector(input);
  shape.back() = features;
  return shape;
}

// The kernels' element-type enum (cpu::Dtype or cuda::Dtype: same members) for
// a float tensor dtype the op already validated.
template <class KernelDtype>
inline KernelDtype kernel_dtype(ScalarType type) {
  switch (type) {
    case kFloat:
      return KernelDtype::Float32;
    case kBFloat16:
      return KernelDtype::BFloat16;
    case kHalf:
      return KernelDtype::Float16;
    default:
      LOWRANK_CHECK(false, "unsupported dtype ", type);
  }
  return KernelDtype::Float32;
}

// ---------------------------------------------------------- ATen calls --

template <typename T>
StableIValue to_stack(const T& value) {
  return torch::stable::detail::from(value);
}

// op(arguments...) through the dispatcher; the stack's first slot holds the
// first return afterwards.
template <typename... Arguments>
std::array<StableIValue, sizeof...(Arguments)> call_op(const char* name, const char* overload,
                                                       const Arguments&... arguments) {
  std::array<StableIValue, sizeof...(Arguments)> stack{to_stack(arguments)...};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return stack;
}

inline Tensor as_tensor(StableIValue value) {
  return torch::stable::detail::to<Tensor>(value);
}

// The C shim of the tensor's device, for ops with Scalar arguments (which
// torch_call_dispatcher cannot pass) and for the hot GEMMs (a direct call,
// no lookup of the op by name).
#ifdef LOWRANK_WITH_CUDA
#define LOWRANK_DEVICE_SHIM(tensor, name, ...)                              \
  STABLE_TORCH_ERROR_CODE_CHECK((tensor).is_cuda()                           \
                                    ? aoti_torch_cuda_##name(__VA_ARGS__)    \
                                    : aoti_torch_cpu_##name(__VA_ARGS__))
#else
#define LOWRANK_DEVICE_SHIM(tensor, name, ...) \
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_##name(__VA_ARGS__))
#endif

inline std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t stride = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= std::max<int64_t>(shape[i], 1);
  }
  return strides;
}

inline int32_t shim_dtype(ScalarType dtype) {
  switch (dtype) {
    case kFloat:
      return aoti_torch_dtype_float32();
    case kBFloat16:
      return aoti_torch_dtype_bfloat16();
    case kHalf:
      return aoti_torch_dtype_float16();
    case kDouble:
      return aoti_torch_dtype_float64();
    case kByte:
      return aoti_torch_dtype_uint8();
    case kLong:
      return aoti_torch_dtype_int64();
    case ScalarType::Int:
      return aoti_torch_dtype_int32();
    case kBool:
      return aoti_torch_dtype_bool();
    default:
      LOWRANK_CHECK(false, "lowrank_ext: no tensor allocation for dtype ", dtype);
  }
  return 0;
}

// A new uninitialized contiguous tensor: one C shim call (the stable
// empty() looks the op up by name and goes through the boxed dispatcher,
// several microseconds, a visible share of a one-row GEMV).
inline Tensor empty_tensor(const std::vector<int64_t>& shape, ScalarType dtype,
                           const torch::stable::Device& device) {
  const std::vector<int64_t> strides = contiguous_strides(shape);
  const bool cuda = device.type() == torch::headeronly::DeviceType::CUDA;
  AtenTensorHandle result;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      static_cast<int64_t>(shape.size()), shape.data(), strides.data(), shim_dtype(dtype),
      cuda ? aoti_torch_device_type_cuda() : aoti_torch_device_type_cpu(),
      cuda ? device.index() : 0, &result));
  return Tensor(result);
}

inline Tensor zeros_tensor(const std::vector<int64_t>& shape, ScalarType dtype,
                           const torch::stable::Device& device) {
  Tensor out = empty_tensor(shape, dtype, device);
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_zero_(out.get()));
  return out;
}

inline Tensor make_contiguous(const Tensor& tensor) {
  return tensor.is_contiguous() ? tensor : torch::stable::contiguous(tensor);
}

inline Tensor to_dtype(const Tensor& tensor, ScalarType dtype) {
  return tensor.scalar_type() == dtype ? tensor : torch::stable::to(tensor, dtype);
}

// A view of `tensor`'s storage with these sizes and strides, starting
// `offset` elements past its own start: one C shim call, no dispatcher. For
// the glue's own temporaries only (it records no view relation for autograd).
inline Tensor restrided(const Tensor& tensor, const std::vector<int64_t>& sizes,
                        const std::vector<int64_t>& strides, int64_t offset = 0) {
  AtenTensorHandle result;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch__reinterpret_tensor(
      tensor.get(), static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), offset,
      &result));
  return Tensor(result);
}

// `shape` with a -1 entry resolved against numel.
inline std::vector<int64_t> resolved_shape(std::vector<int64_t> shape, int64_t numel) {
  int64_t known = 1;
  int64_t* unknown = nullptr;
  for (int64_t& size : shape) {
    if (size == -1) {
      unknown = &size;
    } else {
      known *= size;
    }
  }
  if (unknown != nullptr) *unknown = known == 0 ? 0 : numel / known;
  return shape;
}

inline Tensor view_shape(const Tensor& tensor, const std::vector<int64_t>& shape) {
  if (!tensor.is_contiguous()) return torch::stable::view(tensor, IntArray(shape));
  const std::vector<int64_t> sizes = resolved_shape(shape, tensor.numel());
  return restrided(tensor, sizes, contiguous_strides(sizes));
}

inline Tensor reshape_to(const Tensor& tensor, const std::vector<int64_t>& shape) {
  if (!tensor.is_contiguous()) return torch::stable::reshape(tensor, IntArray(shape));
  return view_shape(tensor, shape);
}

// [..., features] -> [rows, features] (a view when possible).
inline Tensor flatten_rows(const Tensor& input) {
  if (input.dim() == 2) return input;
  return reshape_to(input, {-1, input.size(input.dim() - 1)});
}

inline Tensor narrow_view(const Tensor& tensor, int64_t dim, int64_t start, int64_t length) {
  std::vector<int64_t> sizes = sizes_vector(tensor);
  const IntArray strides_ref = tensor.strides();
  const std::vector<int64_t> strides(strides_ref.begin(), strides_ref.end());
  sizes[dim] = length;
  return restrided(tensor, sizes, strides, start * strides[dim]);
}

// The transpose of a matrix (a view).
inline Tensor transposed(const Tensor& matrix) {
  return restrided(matrix, {matrix.size(1), matrix.size(0)}, {matrix.stride(1), matrix.stride(0)});
}

inline void aten_mm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  LOWRANK_DEVICE_SHIM(out, mm_out, out.get(), a.get(), b.get());
}

inline Tensor aten_mm(const Tensor& a, const Tensor& b) {
  Tensor out = empty_tensor({a.size(0), b.size(1)}, a.scalar_type(), a.device());
  aten_mm_out(out, a, b);
  return out;
}

// out = beta * self + alpha * (a @ b), written into out (self may be out).
inline void aten_addmm_out(const Tensor& out, const Tensor& self, const Tensor& a, const Tensor& b,
                           double beta = 1.0, double alpha = 1.0) {
  LOWRANK_DEVICE_SHIM(out, addmm_out, out.get(), self.get(), a.get(), b.get(), beta, alpha);
}

// input @ weight.T + bias, as aten::linear computes it (addmm for a matrix
// with a bias, mm without).
inline Tensor aten_linear(const Tensor& input, const Tensor& weight, const OptionalTensor& bias) {
  if (input.dim() != 2) {
    return as_tensor(call_op("aten::linear", "", input, weight, bias)[0]);
  }
  Tensor out = empty_tensor({input.size(0), weight.size(0)}, input.scalar_type(), input.device());
  if (bias.has_value()) {
    aten_addmm_out(out, *bias, input, transposed(weight));
  } else {
    aten_mm_out(out, input, transposed(weight));
  }
  return out;
}

inline void copy_into(Tensor& destination, const Tensor& source) {
  torch::stable::copy_(destination, source);
}

inline Tensor aten_index_select(const Tensor& tensor, int64_t dim, const Tensor& index) {
  return as_tensor(call_op("aten::index_select", "", tensor, dim, index)[0]);
}

inline void aten_index_copy_(const Tensor& tensor, int64_t dim, const Tensor& index,
                        const Tensor& source) {
  call_op("aten::index_copy_", "", tensor, dim, index, source);
}


// self + alpha * other (a new tensor).
inline Tensor aten_add(const Tensor& self, const Tensor& other, double alpha = 1.0) {
  AtenTensorHandle result;
  LOWRANK_DEVICE_SHIM(self, add_Tensor, self.get(), other.get(), alpha, &result);
  return Tensor(result);
}

// self + value (a new tensor).
inline Tensor aten_add(const Tensor& self, double value) {
  AtenTensorHandle result;
  LOWRANK_DEVICE_SHIM(self, add_Scalar, self.get(), value, 1.0, &result);
  return Tensor(result);
}

// self * value (a new tensor).
inline Tensor aten_mul(const Tensor& self, double value) {
  AtenTensorHandle result;
  LOWRANK_DEVICE_SHIM(self, mul_Scalar, self.get(), value, &result);
  return Tensor(result);
}

}  // namespace lowrank

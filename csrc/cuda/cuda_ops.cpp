// ATen glue for the CUDA backend: validates arguments (op_checks.h, the same
// messages as the CPU backend), sets the device guard, and launches the
// torch-free kernels of csrc/cuda on the current stream.
//
// Which kernel serves nf4_linear (rows = input rows after flattening):
//   rows <= 16                        NF4 GEMV (nf4_gemv.cu), any dtype;
//   bf16/fp16, rows <= N, sm80+       fused tensor-core GEMM (nf4_gemm.cu);
//   otherwise                         NF4 -> dense dequantize (nested scales
//                                     decoded in the same kernel) + cuBLAS
//                                     through at::mm.
// N is LOWRANK_CUDA_FUSED_MAX_ROWS (default kFusedGemmMaxRows), so a device
// run can set the crossover it measures (bench/bench_cuda.py prints both
// paths at 32..256 rows). LOWRANK_CUDA_GEMM=fused|dequantize overrides the
// choice for rows > 16, so tests and benchmarks can hold each path to the
// same reference.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "core/nf4.h"
#include "cuda/kernels.h"
#include "glue_helpers.h"
#include "op_calls.h"
#include "op_checks.h"

namespace lowrank {
namespace cuda {
namespace {

// Largest row count the fused tensor-core GEMM takes by default. Unmeasured:
// the reasoning is that up to here the fused kernel saves the dense weight's
// write and re-read, while above it dequantize + cuBLAS amortizes that write
// over enough rows and cuBLAS' Hopper kernels outrun a WMMA kernel. At 17-256
// rows a 4096- to 8192-wide layer gives the fused kernel only 32-128 tiles of
// 128x128 for an H200's 132 SMs, so the crossover may well lie lower.
// LOWRANK_CUDA_FUSED_MAX_ROWS overrides it.
constexpr int64_t kFusedGemmMaxRows = 256;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
}

int64_t checked_numel(const char* op, c10::SymIntArrayRef shape) {
  int64_t numel = 1;
  for (const c10::SymInt& size : shape) {
    int64_t value = size.expect_int();
    TORCH_CHECK(value >= 0, op, ": shape must not have negative sizes, got ", shape);
    numel *= value;
  }
  TORCH_CHECK(numel > 0, op, ": shape must describe a non-empty tensor, got ", shape);
  return numel;
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& input, int64_t blocksize) {
  constexpr const char* op = "nf4_quantize";
  check_float_tensor(op, "input", input);
  check_blocksize(op, blocksize);
  TORCH_CHECK(input.numel() > 0, op, ": input must not be empty, got shape ", input.sizes());
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor contiguous = input.contiguous();
  const int64_t numel = contiguous.numel();
  at::Tensor packed = at::empty({nf4::packed_bytes(numel)}, input.options().dtype(at::kByte));
  at::Tensor absmax =
      at::empty({nf4::num_blocks(numel, blocksize)}, input.options().dtype(at::kFloat));
  at::Tensor nonfinite = at::zeros({1}, input.options().dtype(at::kInt));
  check_launch(op, nf4_quantize(contiguous.const_data_ptr(),
                                kernel_dtype<Dtype>(input.scalar_type()), numel, blocksize, packed.mutable_data_ptr<uint8_t>(),
                                absmax.mutable_data_ptr<float>(),
                                nonfinite.mutable_data_ptr<int>(), current_stream()));
  // The CPU op raises on non-finite input too; this costs one sync.
  TORCH_CHECK_VALUE(nonfinite.item<int>() == 0, op,
                    ": input contains NaN or Inf; NF4 cannot represent non-finite weights "
                    "(clean or clamp them before quantizing)");
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               c10::SymIntArrayRef shape, int64_t blocksize,
                               at::ScalarType dtype) {
  constexpr const char* op = "nf4_dequantize";
  check_blocksize(op, blocksize);
  TORCH_CHECK(is_supported_float(dtype), op,
              ": dtype must be float32, bfloat16 or float16, got ", dtype);
  check_dtype(op, "packed", packed, at::kByte);
  check_dtype(op, "absmax", absmax, at::kFloat);
  check_same_device(op, "absmax", absmax, packed, "packed");
  const int64_t numel = checked_numel(op, shape);
  check_numel(op, "packed", packed, nf4::packed_bytes(numel), "two 4-bit codes per byte of shape");
  check_numel(op, "absmax", absmax, nf4::num_blocks(numel, blocksize),
              "one scale per block of shape");
  c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor packed_c = packed.contiguous();
  at::Tensor absmax_c = absmax.contiguous();
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(shape), packed.options().dtype(dtype));
  BlockScales scales;
  scales.absmax = absmax_c.const_data_ptr<float>();
  check_launch(op, nf4_dequantize(packed_c.const_data_ptr<uint8_t>(), scales, numel, blocksize,
                                  out.mutable_data_ptr(), kernel_dtype<Dtype>(dtype),
                                  current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cuda(const at::Tensor& input,
                                                                const at::Tensor& code,
                                                                int64_t blocksize) {
  constexpr const char* op = "quantize_blockwise_8bit";
  check_dtype(op, "input", input, at::kFloat);
  check_dtype(op, "code", code, at::kFloat);
  check_numel(op, "code", code, 256, "an 8-bit code map");
  check_same_device(op, "code", code, input, "input");
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  TORCH_CHECK(input.numel() > 0, op, ": input must not be empty");
  c10::cuda::CUDAGuard guard(input.device());
  TORCH_CHECK(at::isfinite(input).all().item<bool>(), op, ": input contains NaN or Inf");
  at::Tensor input_c = input.contiguous();
  at::Tensor code_c = code.contiguous();
  TORCH_CHECK((code_c.slice(0, 1) >= code_c.slice(0, 0, 255)).all().item<bool>(), op,
              ": code must be sorted ascending");
  const int64_t numel = input_c.numel();
  at::Tensor codes = at::empty(input.sizes(), input.options().dtype(at::kByte));
  at::Tensor absmax =
      at::empty({nf4::num_blocks(numel, blocksize)}, input.options().dtype(at::kFloat));
  check_launch(op, quantize_blockwise_8bit(input_c.const_data_ptr<float>(),
                                           code_c.const_data_ptr<float>(), numel, blocksize,
                                           codes.mutable_data_ptr<uint8_t>(),
                                           absmax.mutable_data_ptr<float>(), current_stream()));
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_8bit_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                                          const at::Tensor& code, int64_t blocksize) {
  constexpr const char* op = "dequantize_blockwise_8bit";
  check_dtype(op, "codes", codes, at::kByte);
  check_dtype(op, "absmax", absmax, at::kFloat);
  check_dtype(op, "code", code, at::kFloat);
  check_numel(op, "code", code, 256, "an 8-bit code map");
  check_same_device(op, "absmax", absmax, codes, "codes");
  check_same_device(op, "code", code, codes, "codes");
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  check_numel(op, "absmax", absmax, nf4::num_blocks(codes.numel(), blocksize),
              "one scale per block of codes");
  c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor codes_c = codes.contiguous();
  at::Tensor absmax_c = absmax.contiguous();
  at::Tensor code_c = code.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  check_launch(op, dequantize_blockwise_8bit(
                       codes_c.const_data_ptr<uint8_t>(), absmax_c.const_data_ptr<float>(),
                       code_c.const_data_ptr<float>(), codes_c.numel(), blocksize,
                       out.mutable_data_ptr<float>(), current_stream()));
  return out;
}

// A validated NF4 weight with contiguous device buffers; `matrix` points into
// them, so it stays valid while this object lives.
struct DeviceWeight {
  at::Tensor packed;
  at::Tensor absmax;
  at::Tensor nested_absmax;
  at::Tensor nested_code;
  Nf4Matrix matrix;

  explicit DeviceWeight(const Nf4WeightArgs& args)
      : packed(args.packed.contiguous()), absmax(args.absmax.contiguous()) {
    matrix.packed = packed.const_data_ptr<uint8_t>();
    matrix.out_features = args.out_features;
    matrix.in_features = args.in_features;
    matrix.blocksize = args.blocksize;
    if (args.nested()) {
      nested_absmax = args.nested_absmax->contiguous();
      nested_code = args.nested_code->contiguous();
      matrix.scales.nested_codes = absmax.const_data_ptr<uint8_t>();
      matrix.scales.nested_absmax = nested_absmax.const_data_ptr<float>();
      matrix.scales.nested_code = nested_code.const_data_ptr<float>();
      matrix.scales.offset = static_cast<float>(args.offset);
    } else {
      matrix.scales.absmax = absmax.const_data_ptr<float>();
    }
  }

  // The dense [out_features, in_features] weight in `dtype`, one kernel.
  at::Tensor dequantize(const char* op, at::ScalarType dtype) const {
    at::Tensor dense =
        at::empty({matrix.out_features, matrix.in_features}, packed.options().dtype(dtype));
    check_launch(op, nf4_dequantize(matrix.packed, matrix.scales, dense.numel(), matrix.blocksize,
                                    dense.mutable_data_ptr(), kernel_dtype<Dtype>(dtype),
                                    current_stream()));
    return dense;
  }
};

enum class GemmPath { Auto, Fused, Dequantize };

GemmPath requested_gemm_path() {
  const char* value = std::getenv("LOWRANK_CUDA_GEMM");
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "auto") == 0) {
    return GemmPath::Auto;
  }
  if (std::strcmp(value, "fused") == 0) return GemmPath::Fused;
  if (std::strcmp(value, "dequantize") == 0) return GemmPath::Dequantize;
  TORCH_CHECK(false, "LOWRANK_CUDA_GEMM must be auto, fused or dequantize, got '", value, "'");
}

// LOWRANK_CUDA_FUSED_MAX_ROWS as a row count >= 0, else kFusedGemmMaxRows.
int64_t fused_gemm_max_rows() {
  const char* value = std::getenv("LOWRANK_CUDA_FUSED_MAX_ROWS");
  if (value == nullptr || value[0] == '\0') return kFusedGemmMaxRows;
  char* end = nullptr;
  errno = 0;
  const long long rows = std::strtoll(value, &end, 10);
  TORCH_CHECK(errno == 0 && *end == '\0' && rows >= 0,
              "LOWRANK_CUDA_FUSED_MAX_ROWS must be a row count >= 0, got '", value, "'");
  return static_cast<int64_t>(rows);
}

bool use_fused_gemm(const at::Tensor& input, int64_t rows) {
  if (input.scalar_type() == at::kFloat) return false;
  if (!tensor_core_gemm_supported(input.get_device())) return false;
  switch (requested_gemm_path()) {
    case GemmPath::Fused:
      return true;
    case GemmPath::Dequantize:
      return false;
    case GemmPath::Auto:
      break;
  }
  return rows <= fused_gemm_max_rows();
}

at::Tensor nf4_linear_cuda(const at::Tensor& input, const at::Tensor& packed,
                           const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code, double offset,
                           c10::SymInt out_features, c10::SymInt in_features, int64_t blocksize,
                           const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "nf4_linear";
  Nf4WeightArgs args = checked_linear_weight(op, input, packed, absmax, nested_absmax,
                                             nested_code, offset, out_features, in_features,
                                             blocksize, bias);
  if (input.scalar_type() == at::kDouble) {
    // The float64 reference path (see check_linear_float).
    return at::linear(input,
                      nf4_dense_weight(packed, absmax, nested_absmax, nested_code, offset,
                                       out_features, in_features, blocksize, at::kDouble),
                      bias);
  }
  c10::cuda::CUDAGuard guard(input.device());
  DeviceWeight weight(args);
  at::Tensor rows = flatten_rows(input).contiguous();
  const int64_t row_count = rows.size(0);
  at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const void* bias_pointer = bias.has_value() ? bias_c.const_data_ptr() : nullptr;
  at::Tensor out;
  if (row_count == 0) {
    out = at::empty({0, args.out_features}, input.options());
  } else if (row_count <= kGemvMaxRows) {
    out = at::empty({row_count, args.out_features}, input.options());
    check_launch(op, nf4_gemv(rows.const_data_ptr(), row_count, weight.matrix, bias_pointer,
                              out.mutable_data_ptr(), kernel_dtype<Dtype>(input.scalar_type()),
                              current_stream()));
  } else if (use_fused_gemm(input, row_count)) {
    out = at::empty({row_count, args.out_features}, input.options());
    check_launch(op, nf4_gemm_tensor_core(rows.const_data_ptr(), row_count, weight.matrix,
                                          bias_pointer, out.mutable_data_ptr(),
                                          kernel_dtype<Dtype>(input.scalar_type()),
                                          current_stream()));
  } else {
    at::Tensor dense = weight.dequantize(op, input.scalar_type());
    out = bias.has_value() ? at::addmm(bias_c, rows, dense.t()) : at::mm(rows, dense.t());
  }
  return out.view(output_shape(input, args.out_features));
}

// grad_output @ dequant(W): one dequantize kernel (nested scales decoded in
// it) and cuBLAS. Backward runs at training batch sizes, where this is what
// the dense-weight GEMM costs plus one weight write.
at::Tensor nf4_linear_grad_input_cuda(const at::Tensor& grad_output, const at::Tensor& packed,
                                      const at::Tensor& absmax,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code, double offset,
                                      c10::SymInt out_features, c10::SymInt in_features,
                                      int64_t blocksize) {
  constexpr const char* op = "nf4_linear_grad_input";
  Nf4WeightArgs args = checked_grad_input_weight(op, grad_output, packed, absmax, nested_absmax,
                                                 nested_code, offset, out_features, in_features,
                                                 blocksize);
  if (grad_output.scalar_type() == at::kDouble) {
    return at::matmul(grad_output,
                      nf4_dense_weight(packed, absmax, nested_absmax, nested_code, offset,
                                       out_features, in_features, blocksize, at::kDouble));
  }
  c10::cuda::CUDAGuard guard(grad_output.device());
  DeviceWeight weight(args);
  at::Tensor dense = weight.dequantize(op, grad_output.scalar_type());
  at::Tensor grad_input = at::mm(flatten_rows(grad_output), dense);
  return grad_input.view(output_shape(grad_output, args.in_features));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("nf4_quantize", &nf4_quantize_cuda);
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cuda);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit_cuda);
  m.impl("nf4_linear", &nf4_linear_cuda);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cuda);
}

}  // namespace cuda
}  // namespace lowrank

// Glue of the CUDA backend on torch's stable ABI: validates arguments
// (op_checks.h, the same messages as the CPU backend), sets the device guard,
// and launches the torch-free kernels of csrc/cuda on the current stream.
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
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "core/nf4.h"
#include "cuda/cuda_glue.h"
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

Tensors2 nf4_quantize_cuda(const Tensor& input, int64_t blocksize) {
  constexpr const char* op = "nf4_quantize";
  check_float_tensor(op, "input", input);
  check_blocksize(op, blocksize);
  LOWRANK_CHECK(input.numel() > 0, op, ": input must not be empty, got shape ",
                shape_of(input));
  DeviceGuard guard(input);
  Tensor input_c = make_contiguous(input);
  const int64_t numel = input_c.numel();
  Tensor packed = empty_tensor({nf4::packed_bytes(numel)}, kByte, input.device());
  Tensor absmax = empty_tensor({nf4::num_blocks(numel, blocksize)}, kFloat, input.device());
  Tensor nonfinite = zeros_tensor({1}, ScalarType::Int, input.device());
  check_launch(op, nf4_quantize(input_c.const_data_ptr(), kernel_dtype<Dtype>(input.scalar_type()),
                                numel, blocksize, packed.mutable_data_ptr<uint8_t>(),
                                absmax.mutable_data_ptr<float>(),
                                nonfinite.mutable_data_ptr<int32_t>(), current_stream(input)));
  // The CPU op raises on non-finite input too; this costs one sync. (A
  // ValueError in Python: ops.nf4_quantize re-raises this message as one.)
  LOWRANK_CHECK(*to_host(nonfinite).const_data_ptr<int32_t>() == 0, op,
                ": input contains NaN or Inf; NF4 cannot represent non-finite weights "
                "(clean or clamp them before quantizing)");
  return {packed, absmax};
}

Tensor nf4_dequantize_cuda(const Tensor& packed, const Tensor& absmax, IntArray shape,
                           int64_t blocksize, ScalarType dtype) {
  constexpr const char* op = "nf4_dequantize";
  const int64_t numel = check_nf4_dequantize_args(packed, absmax, shape, blocksize, dtype);
  DeviceGuard guard(packed);
  Tensor packed_c = make_contiguous(packed);
  Tensor absmax_c = make_contiguous(absmax);
  Tensor out =
      empty_tensor(std::vector<int64_t>(shape.begin(), shape.end()), dtype, packed.device());
  BlockScales scales;
  scales.absmax = absmax_c.const_data_ptr<float>();
  check_launch(op, nf4_dequantize(packed_c.const_data_ptr<uint8_t>(), scales, numel, blocksize,
                                  out.mutable_data_ptr(), kernel_dtype<Dtype>(dtype),
                                  current_stream(packed)));
  return out;
}

Tensors2 quantize_blockwise_8bit_cuda(const Tensor& input, const Tensor& code,
                                      int64_t blocksize) {
  constexpr const char* op = "quantize_blockwise_8bit";
  check_quantize_8bit_args(op, input, code, blocksize);
  DeviceGuard guard(input);
  Tensor all_finite = as_tensor(call_op("aten::all", "", as_tensor(call_op("aten::isfinite", "", input)[0]))[0]);
  LOWRANK_CHECK(*to_host(all_finite).const_data_ptr<bool>(), op, ": input contains NaN or Inf");
  Tensor input_c = make_contiguous(input);
  Tensor code_c = make_contiguous(code);
  const Tensor code_host = to_host(code_c);
  const float* code_values = code_host.const_data_ptr<float>();
  LOWRANK_CHECK(std::is_sorted(code_values, code_values + 256), op,
                ": code must be sorted ascending");
  const int64_t numel = input_c.numel();
  Tensor codes = empty_tensor(sizes_vector(input), kByte, input.device());
  Tensor absmax = empty_tensor({nf4::num_blocks(numel, blocksize)}, kFloat, input.device());
  check_launch(op, quantize_blockwise_8bit(input_c.const_data_ptr<float>(),
                                           code_c.const_data_ptr<float>(), numel, blocksize,
                                           codes.mutable_data_ptr<uint8_t>(),
                                           absmax.mutable_data_ptr<float>(),
                                           current_stream(input)));
  return {codes, absmax};
}

Tensor dequantize_blockwise_8bit_cuda(const Tensor& codes, const Tensor& absmax,
                                      const Tensor& code, int64_t blocksize) {
  constexpr const char* op = "dequantize_blockwise_8bit";
  check_dequantize_8bit_args(op, codes, absmax, code, blocksize);
  DeviceGuard guard(codes);
  Tensor codes_c = make_contiguous(codes);
  Tensor absmax_c = make_contiguous(absmax);
  Tensor code_c = make_contiguous(code);
  Tensor out = empty_tensor(sizes_vector(codes), kFloat, codes.device());
  check_launch(op, dequantize_blockwise_8bit(
                       codes_c.const_data_ptr<uint8_t>(), absmax_c.const_data_ptr<float>(),
                       code_c.const_data_ptr<float>(), codes_c.numel(), blocksize,
                       out.mutable_data_ptr<float>(), current_stream(codes)));
  return out;
}

// A validated NF4 weight with contiguous device buffers; `matrix` points into
// them, so it stays valid while this object lives.
struct DeviceWeight {
  Tensor packed;
  Tensor absmax;
  Tensor nested_absmax;
  Tensor nested_code;
  Nf4Matrix matrix;

  explicit DeviceWeight(const Nf4WeightArgs& args)
      : packed(make_contiguous(args.packed)), absmax(make_contiguous(args.absmax)) {
    matrix.packed = packed.const_data_ptr<uint8_t>();
    matrix.out_features = args.out_features;
    matrix.in_features = args.in_features;
    matrix.blocksize = args.blocksize;
    if (args.nested()) {
      nested_absmax = make_contiguous(*args.nested_absmax);
      nested_code = make_contiguous(*args.nested_code);
      matrix.scales.nested_codes = absmax.const_data_ptr<uint8_t>();
      matrix.scales.nested_absmax = nested_absmax.const_data_ptr<float>();
      matrix.scales.nested_code = nested_code.const_data_ptr<float>();
      matrix.scales.offset = static_cast<float>(args.offset);
    } else {
      matrix.scales.absmax = absmax.const_data_ptr<float>();
    }
  }

  // The dense [out_features, in_features] weight in `dtype`, one kernel.
  Tensor dequantize(const char* op, ScalarType dtype) const {
    Tensor dense = empty_tensor({matrix.out_features, matrix.in_features}, dtype, packed.device());
    check_launch(op, nf4_dequantize(matrix.packed, matrix.scales, dense.numel(), matrix.blocksize,
                                    dense.mutable_data_ptr(), kernel_dtype<Dtype>(dtype),
                                    current_stream(packed)));
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
  LOWRANK_CHECK(false, "LOWRANK_CUDA_GEMM must be auto, fused or dequantize, got '", value, "'");
  return GemmPath::Auto;
}

// LOWRANK_CUDA_FUSED_MAX_ROWS as a row count >= 0, else kFusedGemmMaxRows.
int64_t fused_gemm_max_rows() {
  const char* value = std::getenv("LOWRANK_CUDA_FUSED_MAX_ROWS");
  if (value == nullptr || value[0] == '\0') return kFusedGemmMaxRows;
  char* end = nullptr;
  errno = 0;
  const long long rows = std::strtoll(value, &end, 10);
  LOWRANK_CHECK(errno == 0 && *end == '\0' && rows >= 0,
                "LOWRANK_CUDA_FUSED_MAX_ROWS must be a row count >= 0, got '", value, "'");
  return static_cast<int64_t>(rows);
}

bool use_fused_gemm(const Tensor& input, int64_t rows) {
  if (input.scalar_type() == kFloat) return false;
  if (!tensor_core_gemm_supported(input.get_device_index())) return false;
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

}  // namespace

Tensor nf4_linear(const Tensor& input, const Tensor& packed, const Tensor& absmax,
                       const OptionalTensor& nested_absmax, const OptionalTensor& nested_code,
                       double offset, int64_t out_features, int64_t in_features,
                       int64_t blocksize, const OptionalTensor& bias) {
  constexpr const char* op = "nf4_linear";
  Nf4WeightArgs args = checked_linear_weight(op, input, packed, absmax, nested_absmax,
                                             nested_code, offset, out_features, in_features,
                                             blocksize, bias);
  if (input.scalar_type() == kDouble) {
    // The float64 reference path (see check_linear_float).
    return aten_linear(input,
                  nf4_dense_weight(packed, absmax, nested_absmax, nested_code, offset,
                                   out_features, in_features, blocksize, kDouble),
                  bias);
  }
  DeviceGuard guard(input);
  DeviceWeight weight(args);
  Tensor rows = make_contiguous(flatten_rows(input));
  const int64_t row_count = rows.size(0);
  Tensor bias_c = bias.has_value() ? make_contiguous(*bias) : Tensor();
  const void* bias_pointer = bias.has_value() ? bias_c.const_data_ptr() : nullptr;
  const ScalarType dtype = input.scalar_type();
  Tensor out;
  if (row_count == 0) {
    out = empty_tensor({0, args.out_features}, dtype, input.device());
  } else if (row_count <= kGemvMaxRows) {
    out = empty_tensor({row_count, args.out_features}, dtype, input.device());
    check_launch(op, nf4_gemv(rows.const_data_ptr(), row_count, weight.matrix, bias_pointer,
                              out.mutable_data_ptr(), kernel_dtype<Dtype>(dtype),
                              current_stream(input)));
  } else if (use_fused_gemm(input, row_count)) {
    out = empty_tensor({row_count, args.out_features}, dtype, input.device());
    check_launch(op, nf4_gemm_tensor_core(rows.const_data_ptr(), row_count, weight.matrix,
                                          bias_pointer, out.mutable_data_ptr(),
                                          kernel_dtype<Dtype>(dtype), current_stream(input)));
  } else {
    Tensor dense = weight.dequantize(op, dtype);
    out = aten_linear(rows, dense, bias.has_value() ? OptionalTensor(bias_c) : std::nullopt);
  }
  return view_shape(out, output_shape(input, args.out_features));
}

// grad_output @ dequant(W): one dequantize kernel (nested scales decoded in
// it) and cuBLAS. Backward runs at training batch sizes, where this is what
// the dense-weight GEMM costs plus one weight write.
Tensor nf4_linear_grad_input(const Tensor& grad_output, const Tensor& packed,
                                  const Tensor& absmax, const OptionalTensor& nested_absmax,
                                  const OptionalTensor& nested_code, double offset,
                                  int64_t out_features, int64_t in_features, int64_t blocksize) {
  constexpr const char* op = "nf4_linear_grad_input";
  Nf4WeightArgs args = checked_grad_input_weight(op, grad_output, packed, absmax, nested_absmax,
                                                 nested_code, offset, out_features, in_features,
                                                 blocksize);
  if (grad_output.scalar_type() == kDouble) {
    return torch::stable::matmul(
        grad_output, nf4_dense_weight(packed, absmax, nested_absmax, nested_code, offset,
                                      out_features, in_features, blocksize, kDouble));
  }
  DeviceGuard guard(grad_output);
  DeviceWeight weight(args);
  Tensor dense = weight.dequantize(op, grad_output.scalar_type());
  Tensor grad_input = aten_mm(flatten_rows(grad_output), dense);
  return view_shape(grad_input, output_shape(grad_output, args.in_features));
}

STABLE_TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  LOWRANK_IMPL(m, nf4_quantize, nf4_quantize_cuda);
  LOWRANK_IMPL(m, nf4_dequantize, nf4_dequantize_cuda);
  LOWRANK_IMPL(m, quantize_blockwise_8bit, quantize_blockwise_8bit_cuda);
  LOWRANK_IMPL(m, dequantize_blockwise_8bit, dequantize_blockwise_8bit_cuda);
  LOWRANK_IMPL(m, nf4_linear, nf4_linear);
  LOWRANK_IMPL(m, nf4_linear_grad_input, nf4_linear_grad_input);
}

}  // namespace cuda
}  // namespace lowrank

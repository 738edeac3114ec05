// Glue of the 8-bit blockwise quantizer ops on the CPU (see
// cpu/blockwise_8bit_kernels.h): validates arguments and splits the blocks
// with torch's parallel_for.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/nf4.h"
#include "cpu/blockwise_8bit_kernels.h"
#include "glue_helpers.h"
#include "op_calls.h"
#include "op_checks.h"

namespace lowrank {
namespace cpu {
namespace {

Tensors2 quantize_blockwise_8bit_cpu(const Tensor& input, const Tensor& code,
                                     int64_t blocksize) {
  constexpr const char* op = "quantize_blockwise_8bit";
  check_quantize_8bit_args(op, input, code, blocksize);
  Tensor input_c = make_contiguous(input);
  Tensor code_c = make_contiguous(code);
  const int64_t numel = input_c.numel();
  const float* values = input_c.const_data_ptr<float>();
  LOWRANK_CHECK(std::all_of(values, values + numel, [](float v) { return std::isfinite(v); }), op,
                ": input contains NaN or Inf");
  const float* code_values = code_c.const_data_ptr<float>();
  LOWRANK_CHECK(std::is_sorted(code_values, code_values + 256), op,
                ": code must be sorted ascending");
  const int64_t blocks = nf4::num_blocks(numel, blocksize);
  Tensor codes = empty_tensor(sizes_vector(input), kByte, input.device());
  Tensor absmax = empty_tensor({blocks}, kFloat, input.device());
  std::vector<uint8_t> lookup(k8bitLookupSize);
  build_8bit_lookup(code_c.const_data_ptr<float>(), lookup.data());
  torch::stable::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / blocksize), [&](int64_t b, int64_t e) {
    quantize_blockwise_8bit(input_c.const_data_ptr<float>(), lookup.data(), numel,
                            blocksize, b, e, codes.mutable_data_ptr<uint8_t>(),
                            absmax.mutable_data_ptr<float>());
  });
  return {codes, absmax};
}

Tensor dequantize_blockwise_8bit_cpu(const Tensor& codes, const Tensor& absmax,
                                     const Tensor& code, int64_t blocksize) {
  check_dequantize_8bit_args("dequantize_blockwise_8bit", codes, absmax, code, blocksize);
  Tensor codes_c = make_contiguous(codes);
  Tensor absmax_c = make_contiguous(absmax);
  Tensor code_c = make_contiguous(code);
  Tensor out = empty_tensor(sizes_vector(codes), kFloat, codes.device());
  torch::stable::parallel_for(0, codes.numel(), 65536, [&](int64_t begin, int64_t end) {
    dequantize_blockwise_8bit(codes_c.const_data_ptr<uint8_t>(), absmax_c.const_data_ptr<float>(),
                              code_c.const_data_ptr<float>(), codes.numel(), blocksize, begin, end,
                              out.mutable_data_ptr<float>());
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  LOWRANK_IMPL(m, quantize_blockwise_8bit, quantize_blockwise_8bit_cpu);
  LOWRANK_IMPL(m, dequantize_blockwise_8bit, dequantize_blockwise_8bit_cpu);
}

}  // namespace cpu
}  // namespace lowrank

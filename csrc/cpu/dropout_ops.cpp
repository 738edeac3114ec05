// Glue of the counter-based dropout op (see cpu/dropout_kernels.h).
#include <algorithm>
#include <cmath>

#include "cpu/dispatch.h"
#include "glue_helpers.h"
#include "op_calls.h"
#include "op_checks.h"

namespace lowrank {
namespace cpu {
namespace {

Tensor dropout_cpu(const Tensor& input, double p, const Tensor& seed) {
  constexpr const char* op = "dropout";
  check_float_tensor(op, "input", input);
  LOWRANK_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  LOWRANK_CHECK(seed.scalar_type() == kLong && seed.numel() == 1 && seed.is_cpu(), op,
                ": seed must be a CPU int64 tensor with one element, got ", seed.scalar_type(),
                " with ", seed.numel(), " elements on ", DeviceName{seed.device()});
  Tensor input_c = make_contiguous(input);
  Tensor out = empty_tensor(sizes_vector(input_c), input_c.scalar_type(), input_c.device());
  const auto seed_bits = static_cast<std::uint64_t>(*seed.const_data_ptr<int64_t>());
  const auto threshold =
      static_cast<std::uint32_t>(std::min(std::ldexp(p, 32), 4294967295.0));
  const auto scale = static_cast<float>(1.0 / (1.0 - p));
  const DropoutKernels& kernels = active_kernels().dropout;
  const Dtype dtype = kernel_dtype<Dtype>(input_c.scalar_type());
  constexpr int64_t kIndexWindow = int64_t{1} << 32;  // kernels keep index >> 32 fixed
  torch::stable::parallel_for(0, input_c.numel(), 32768, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t window_end = std::min(end, (begin / kIndexWindow + 1) * kIndexWindow);
      kernels.apply(input_c.const_data_ptr(), out.mutable_data_ptr(), dtype, begin, window_end,
                    seed_bits, threshold, scale);
      begin = window_end;
    }
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) { LOWRANK_IMPL(m, dropout, dropout_cpu); }

}  // namespace cpu
}  // namespace lowrank

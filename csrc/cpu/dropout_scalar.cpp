// Scalar reference dropout kernel (baseline flags) and the table chooser.
#include "cpu/dispatch.h"
#include "cpu/dropout_kernels.h"
#include "cpu/scalar_tail.h"

namespace lowrank {
namespace cpu {
namespace {

void dropout_scalar(const void* input, void* out, Dtype dtype, std::int64_t begin,
                    std::int64_t end, std::uint64_t seed, std::uint32_t threshold, float scale) {
  const auto index_high = static_cast<std::uint32_t>(begin >> 32);
  for (std::int64_t i = begin; i < end; ++i) {
    bool keep = dropout_hash(static_cast<std::uint32_t>(i), index_high, seed) >= threshold;
    tail::store_float(out, dtype, i, keep ? tail::load_float(input, dtype, i) * scale : 0.0f);
  }
}

}  // namespace

const DropoutKernels& dropout_scalar_kernels() {
  static const DropoutKernels table{dropout_scalar};
  return table;
}

const DropoutKernels& dropout_kernels_for(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::Avx512) return dropout_avx512_kernels();
  if (isa == Isa::Avx2) return dropout_avx2_kernels();
#else
  (void)isa;
#endif
  return dropout_scalar_kernels();
}

}  // namespace cpu
}  // namespace lowrank

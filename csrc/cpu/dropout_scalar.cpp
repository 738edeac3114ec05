// Scalar dropout kernel (baseline flags): dropout_body.h on one lane; and the
// table chooser.
#include "cpu/dispatch.h"
#include "cpu/dropout_body.h"
#include "cpu/dropout_kernels.h"
#include "cpu/scalar_tail.h"

namespace lowrank {
namespace cpu {
namespace {

// One-lane operations for dropout_body.h's loop: the reference is the same
// loop on uint32 and float scalars.
struct DropoutSimd {
  using Vec = float;
  using Ints = std::uint32_t;
  static constexpr std::int64_t kLanes = 1;
  static std::uint32_t ints(std::uint32_t value) { return value; }
  static std::uint32_t lane_indices(std::uint32_t first) { return first; }
  static std::uint32_t add(std::uint32_t a, std::uint32_t b) { return a + b; }
  static std::uint32_t mullo(std::uint32_t a, std::uint32_t b) { return a * b; }
  static std::uint32_t xor_bits(std::uint32_t a, std::uint32_t b) { return a ^ b; }
  template <int N>
  static std::uint32_t shift_right(std::uint32_t a) { return a >> N; }
  static float set1(float value) { return value; }
  static float load(const void* data, Dtype dtype, std::int64_t index) {
    return tail::load_float(data, dtype, index);
  }
  static void store(void* data, Dtype dtype, std::int64_t index, float value) {
    tail::store_float(data, dtype, index, value);
  }
  static float keep_scaled(std::uint32_t hash, std::uint32_t threshold, float value, float scale) {
    return hash >= threshold ? value * scale : 0.0f;
  }
};

}  // namespace

const DropoutKernels& dropout_scalar_kernels() {
  static const DropoutKernels table{dropout_apply<DropoutSimd>};
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

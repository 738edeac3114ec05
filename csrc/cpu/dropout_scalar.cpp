// Scalar dropout kernel (baseline flags): dropout_body.h on one lane.
#include "cpu/dropout_body.h"
#include "cpu/isa_tables.h"
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

DropoutKernels dropout_scalar_kernels() { return DropoutKernels{dropout_apply<DropoutSimd>}; }

}  // namespace cpu
}  // namespace lowrank

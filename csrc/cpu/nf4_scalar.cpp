// Scalar reference NF4 kernels and the GEMVs' activation layouts. Compiled
// with baseline flags only; every SIMD kernel is tested against these.
#include "core/float_convert.h"
#include "core/nf4.h"
#include "cpu/isa_tables.h"
#include "cpu/nf4_dequantize.h"
#include "cpu/nf4_gemv.h"
#include "cpu/nf4_quantize.h"
#include "cpu/scalar_tail.h"

namespace lowrank {
namespace cpu {
namespace {

// Quantization's operations on 16 elements (see nf4_quantize.h), one at a time.
struct QuantizeSimd {
  using MaxState = std::uint32_t;
  static std::uint32_t max_start() { return 0; }
  static void magnitude_max(std::uint32_t& state, const void* input, Dtype dtype,
                            std::int64_t index) {
    for (std::int64_t i = index; i < index + kQuantizeStep; ++i) {
      const std::uint32_t bits = float_bits(tail::load_float(input, dtype, i)) & 0x7fffffffu;
      state = bits > state ? bits : state;
    }
  }
  static std::uint32_t max_finish(std::uint32_t state) { return state; }
  static void encode16(const void* input, Dtype dtype, std::int64_t index, float factor,
                       bool full_block, std::uint8_t* out) {
    // encode_range indexes the packed tensor by element: hand it the base.
    tail::encode_range(input, dtype, index, index + kQuantizeStep, factor, full_block,
                       out - index / 2);
  }
};

// The GEMV's operations on one-lane "vectors" (see nf4_gemv.h): a step is
// one packed byte, its high-nibble weight for the `even` activation and its
// low-nibble one for the `odd`.
struct GemvSimd {
  using Vec = float;
  static constexpr int kLanes = 1;
  static constexpr int kMaxRows = 4;
  static constexpr int kPairedRows = 4;
  struct Lut {
    float values[16];
  };
  static Lut lut(const BlockScales& scales, std::int64_t block) {
    const float scale = block_scale(scales, block);
    Lut lut;
    for (int code = 0; code < 16; ++code) lut.values[code] = nf4::kCodebook[code] * scale;
    return lut;
  }
  static void decode(const std::uint8_t* bytes, const Lut& lut, float& high, float& low) {
    high = lut.values[*bytes >> 4];
    low = lut.values[*bytes & 0x0f];
  }
  static float zero() { return 0.0f; }
  static float add(float a, float b) { return a + b; }
  static float fmadd(float a, float b, float c) { return a * b + c; }
  static float loadu(const float* data) { return *data; }
  static float reduce_add(float value) { return value; }
  static void prefetch(const std::uint8_t*) {}
  static void decode_ordered(const std::uint8_t* bytes, const Lut& lut, float& first,
                             float& second) {
    decode(bytes, lut, first, second);
  }
  static float set1(float value) { return value; }
  static void storeu(float* data, float value) { *data = value; }
  static void store(void* data, Dtype dtype, std::int64_t index, float value) {
    tail::store_float(data, dtype, index, value);
  }
};

}  // namespace

Nf4Kernels nf4_scalar_kernels() {
  return Nf4Kernels{nf4_quantize<QuantizeSimd>, nf4_dequantize<GemvSimd>, nf4_gemv<GemvSimd>,
                    nf4_gemv_transposed<GemvSimd>, nf4_dequantize_range<GemvSimd>, nullptr};
}

void prepare_gemv_input(const void* input, Dtype dtype, std::int64_t rows,
                        std::int64_t in_features, float* buffer) {
  GemvInput layout;
  layout.data = buffer;
  layout.rows = rows;
  layout.in_features = in_features;
  const std::int64_t half = gemv_half(layout);
  for (std::int64_t row = 0; row < rows; ++row) {
    float* natural = buffer + row * gemv_row_stride(layout);
    for (std::int64_t k = 0; k < in_features; ++k) {
      natural[k] = tail::load_float(input, dtype, row * in_features + k);
    }
    for (std::int64_t parity = 0; parity < 2; ++parity) {
      float* even = const_cast<float*>(gemv_even(layout, row, parity));
      float* odd = const_cast<float*>(gemv_odd(layout, row, parity));
      for (std::int64_t j = 0; j < half; ++j) {
        std::int64_t k = parity + 2 * j;
        even[j] = k < in_features ? natural[k] : 0.0f;
        odd[j] = k + 1 < in_features ? natural[k + 1] : 0.0f;
      }
    }
  }
}

void prepare_gemv_input_bf16(const std::uint16_t* input, std::int64_t rows,
                             std::int64_t in_features, std::uint16_t* buffer) {
  for (std::int64_t group = 0; group < rows * in_features; group += kGemvBf16Group) {
    for (std::int64_t position = 0; position < kGemvBf16Group; ++position) {
      buffer[group + position] = input[group + gemv_bf16_column(position)];
    }
  }
}

}  // namespace cpu
}  // namespace lowrank

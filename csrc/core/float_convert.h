// Scalar conversions between fp32 and the 16-bit float formats, torch-free.
// Both round to nearest-even and keep subnormals, Inf and NaN, matching
// c10::BFloat16 / c10::Half conversions (what `tensor.to(dtype)` does).
#pragma once

#include <cstdint>
#include <cstring>

namespace lowrank {

static inline std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

static inline float bits_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

static inline float bf16_to_float(std::uint16_t value) {
  return bits_float(static_cast<std::uint32_t>(value) << 16);
}

static inline std::uint16_t float_to_bf16(float value) {
  std::uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // canonical NaN
  std::uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding_bias) >> 16);
}

static inline float fp16_to_float(std::uint16_t value) {
  std::uint32_t sign = static_cast<std::uint32_t>(value & 0x8000u) << 16;
  std::uint32_t exponent = (value >> 10) & 0x1fu;
  std::uint32_t mantissa = value & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    // Subnormal half: value = mantissa * 2^-24, exact in fp32.
    float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return bits_float(sign | float_bits(magnitude));
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

static inline std::uint16_t float_to_fp16(float value) {
  std::uint32_t bits = float_bits(value);
  std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (magnitude >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow -> Inf
  if (magnitude < 0x38800000u) {
    // Result is subnormal (or zero) in half: round magnitude * 2^24 to an integer.
    // Adding 0.5 (2^-1) in fp32 makes the FPU perform round-to-nearest-even.
    float scaled = bits_float(magnitude) * 0x1p24f;
    float rounded = scaled + 0x1p23f;  // aligns the integer part to the mantissa LSB
    std::uint32_t integer = float_bits(rounded) - float_bits(0x1p23f);
    return static_cast<std::uint16_t>(sign | integer);
  }
  std::uint32_t mantissa_odd = (magnitude >> 13) & 1u;
  magnitude += 0xfffu + mantissa_odd;  // round to nearest even at bit 13
  magnitude -= 0x38000000u;            // rebias exponent 127 -> 15
  return static_cast<std::uint16_t>(sign | (magnitude >> 13));
}

}  // namespace lowrank

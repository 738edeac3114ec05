// NF4 format constants shared by every backend (CPU scalar/SIMD, CUDA, and
// mirrored once in python/lowrank_ext/quant.py).
//
// Layout (bit-compatible with bitsandbytes' NF4):
//   * Blocks run over the flattened tensor; one fp32 absmax per block; the
//     last block may be partial.
//   * Element 2i lives in the HIGH nibble of byte i, element 2i+1 in the LOW
//     nibble. For an odd element count the padding nibble is code 7 (0.0).
//   * Quantization scales a full block by multiplying with 1/absmax (absmax
//     clamped to >= 1e-38) and the partial last block by dividing by its
//     clamped absmax, clamps to [-1, 1], then picks the code whose fp32
//     midpoint bucket holds the value; a value exactly on a midpoint takes the
//     lower code.
//   * Dequantization is code_value * absmax in fp32, then a cast.
//
// Everything here is constexpr / static inline so that each ISA translation
// unit gets its own private copy (no cross-TU inline functions compiled with
// different target flags).
#pragma once

#include <cstdint>

namespace lowrank {
namespace nf4 {

// The 16 NormalFloat-4 levels, index = code (exact fp32 bit patterns).
static constexpr float kCodebook[16] = {
    -0x1.000000p+0f, -0x1.647362p-1f, -0x1.0cd660p-1f, -0x1.946540p-2f,
    -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0.0f,
    0x1.45f5fep-4f,  0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,
    0x1.c34970p-2f,  0x1.200f56p-1f,  0x1.722766p-1f,  0x1.000000p+0f,
};

// fp32 midpoints (c[i] + c[i+1]) / 2 between consecutive levels.
static constexpr float kMidpoints[15] = {
    -0x1.b239b0p-1f, -0x1.38a4e0p-1f, -0x1.d70900p-2f, -0x1.5bd4ecp-2f,
    -0x1.e079d8p-3f, -0x1.1a7178p-3f, -0x1.74f0e2p-5f, 0x1.45f5fep-5f,
    0x1.ec90c4p-4f,  0x1.a0cfc0p-3f,  0x1.2b05a8p-2f,  0x1.8ea7f2p-2f,
    0x1.00da08p-1f,  0x1.491b5ep-1f,  0x1.b913b4p-1f,
};

static constexpr std::uint8_t kZeroCode = 7;
static constexpr float kAbsmaxFloor = 1e-38f;

// Blocksizes accepted by every op: powers of two in [32, 4096].
static constexpr std::int64_t kMinBlocksize = 32;
static constexpr std::int64_t kMaxBlocksize = 4096;
// Double quantization: 8-bit codes over blocks of 256 absmax values.
static constexpr std::int64_t kNestedBlocksize = 256;

static inline bool valid_blocksize(std::int64_t blocksize) {
  return blocksize >= kMinBlocksize && blocksize <= kMaxBlocksize &&
         (blocksize & (blocksize - 1)) == 0;
}

// Code for a value already scaled into [-1, 1] (NaN never reaches here:
// inputs are checked for finiteness first). Counting the midpoints strictly
// below the value is the same as bucketizing with "lower code on a tie".
static inline std::uint8_t encode(float scaled) {
  std::uint8_t code = 0;
  for (int i = 0; i < 15; ++i) code += static_cast<std::uint8_t>(scaled > kMidpoints[i]);
  return code;
}

// Clamp a scaled value into the codebook's range [-1, 1].
static inline float clamp_unit(float v) {
  return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
}

static inline std::int64_t num_blocks(std::int64_t numel, std::int64_t blocksize) {
  return (numel + blocksize - 1) / blocksize;
}

static inline std::int64_t packed_bytes(std::int64_t numel) { return (numel + 1) / 2; }

}  // namespace nf4
}  // namespace lowrank

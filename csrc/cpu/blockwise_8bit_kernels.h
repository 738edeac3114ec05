// Torch-free 8-bit blockwise quantizer, used for the double quantization of
// NF4 absmax (blockwise_8bit_scalar.cpp). Not part of the per-ISA kernel
// table: baseline code only, called by the glue directly.
#pragma once

#include <cstdint>

namespace lowrank {
namespace cpu {

// 8-bit blockwise quantization with a 256-entry sorted code map (used for
// double quantization of NF4 absmax). Scalar only: it runs on numel/blocksize
// values, a tiny fraction of the weight. Rule (bitsandbytes-compatible): each
// block is scaled by 1/absmax, the value in [-1, 1] is mapped to one of 65536
// equal bins, and a lookup built from the code map's midpoints gives the code
// (nearest code for the bin centre). An all-zero block gets code 0.
constexpr int k8bitLookupSize = 65536;
void build_8bit_lookup(const float* code, std::uint8_t* lookup);
void quantize_blockwise_8bit(const float* input, const std::uint8_t* lookup, std::int64_t numel,
                             std::int64_t blocksize, std::int64_t block_begin,
                             std::int64_t block_end, std::uint8_t* codes, float* absmax);

void dequantize_blockwise_8bit(const std::uint8_t* codes, const float* absmax,
                               const float* code, std::int64_t numel,
                               std::int64_t blocksize, std::int64_t begin,
                               std::int64_t end, float* out);

}  // namespace cpu
}  // namespace lowrank

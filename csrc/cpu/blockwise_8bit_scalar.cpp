// The 8-bit blockwise quantizer (double quantization of NF4 absmax; see
// blockwise_8bit_kernels.h). Baseline flags; scalar only.
#include <cmath>

#include "core/nf4.h"
#include "cpu/blockwise_8bit_kernels.h"

namespace lowrank {
namespace cpu {

void build_8bit_lookup(const float* code, std::uint8_t* lookup) {
  float midpoints[255];
  for (int i = 0; i < 255; ++i) midpoints[i] = 0.5f * (code[i] + code[i + 1]);
  int index = 0;
  for (int bin = 0; bin < k8bitLookupSize; ++bin) {
    // Bin centre in [-1, 1]; the code is the first whose upper midpoint is not below it.
    float value = -1.0f + (2.0f * static_cast<float>(bin)) / static_cast<float>(k8bitLookupSize - 1);
    while (index < 255 && midpoints[index] < value) ++index;
    lookup[bin] = static_cast<std::uint8_t>(index);
  }
}

void quantize_blockwise_8bit(const float* input, const std::uint8_t* lookup, std::int64_t numel,
                             std::int64_t blocksize, std::int64_t block_begin,
                             std::int64_t block_end, std::uint8_t* codes, float* absmax) {
  for (std::int64_t block = block_begin; block < block_end; ++block) {
    std::int64_t begin = block * blocksize;
    std::int64_t end = begin + blocksize < numel ? begin + blocksize : numel;
    float block_absmax = 0.0f;
    for (std::int64_t i = begin; i < end; ++i) block_absmax = std::fmax(block_absmax, std::fabs(input[i]));
    absmax[block] = block_absmax;
    if (block_absmax == 0.0f) {
      for (std::int64_t i = begin; i < end; ++i) codes[i] = 0;
      continue;
    }
    const float inverse = 1.0f / block_absmax;
    for (std::int64_t i = begin; i < end; ++i) {
      float normalized = nf4::clamp_unit(input[i] * inverse);
      // Same operation order as the lookup's bins: ((v + 1) * 0.5) * 65535 + 0.5, truncated.
      float position = (normalized + 1.0f) * 0.5f * static_cast<float>(k8bitLookupSize - 1) + 0.5f;
      codes[i] = lookup[static_cast<std::uint16_t>(position)];
    }
  }
}

void dequantize_blockwise_8bit(const std::uint8_t* codes, const float* absmax,
                               const float* code, std::int64_t numel,
                               std::int64_t blocksize, std::int64_t begin,
                               std::int64_t end, float* out) {
  (void)numel;
  for (std::int64_t i = begin; i < end; ++i) out[i] = code[codes[i]] * absmax[i / blocksize];
}

}  // namespace cpu
}  // namespace lowrank

// Scalar reference kernels for NF4 and the 8-bit blockwise quantizer.
// Compiled with baseline flags only; every SIMD kernel is tested against these.
#include <cmath>

#include "core/float_convert.h"
#include "core/nf4.h"
#include "cpu/kernels.h"
#include "cpu/scalar_tail.h"

namespace lowrank {
namespace cpu {
namespace {

bool nf4_quantize_scalar(const void* input, Dtype dtype, std::int64_t numel,
                         std::int64_t blocksize, std::int64_t block_begin,
                         std::int64_t block_end, std::uint8_t* packed, float* absmax) {
  bool finite = true;
  for (std::int64_t block = block_begin; block < block_end; ++block) {
    std::int64_t begin = block * blocksize;
    std::int64_t end = begin + blocksize < numel ? begin + blocksize : numel;
    finite &= tail::quantize_block(input, dtype, numel, begin, end, end - begin == blocksize,
                                   packed, absmax + block);
  }
  return finite;
}

void nf4_dequantize_scalar(const std::uint8_t* packed, const float* absmax, std::int64_t numel,
                           std::int64_t blocksize, std::int64_t block_begin,
                           std::int64_t block_end, void* out, Dtype dtype) {
  for (std::int64_t block = block_begin; block < block_end; ++block) {
    std::int64_t begin = block * blocksize;
    std::int64_t end = begin + blocksize < numel ? begin + blocksize : numel;
    tail::dequantize_range(packed, absmax[block], begin, end, out, dtype);
  }
}

}  // namespace

const CpuKernels& scalar_kernels() {
  static const CpuKernels table{Isa::Scalar, nf4_quantize_scalar, nf4_dequantize_scalar};
  return table;
}

void quantize_blockwise_8bit(const float* input, const float* code, std::int64_t numel,
                             std::int64_t blocksize, std::int64_t block_begin,
                             std::int64_t block_end, std::uint8_t* codes, float* absmax) {
  for (std::int64_t block = block_begin; block < block_end; ++block) {
    std::int64_t begin = block * blocksize;
    std::int64_t end = begin + blocksize < numel ? begin + blocksize : numel;
    float block_absmax = 0.0f;
    for (std::int64_t i = begin; i < end; ++i) block_absmax = std::fmax(block_absmax, std::fabs(input[i]));
    absmax[block] = block_absmax;
    for (std::int64_t i = begin; i < end; ++i) {
      float normalized = input[i] / block_absmax;
      // Largest index whose code value is <= normalized, with code[0] read as
      // -1.0 (the map's first entry is slightly above -1). NaN (0/0 for an
      // all-zero block) fails every comparison and lands on index 0.
      int low = 0;
      int high = 255;
      if (!(normalized >= -1.0f)) {
        high = 0;
      }
      while (low < high) {
        int middle = (low + high + 1) / 2;
        if (code[middle] <= normalized) {
          low = middle;
        } else {
          high = middle - 1;
        }
      }
      int index = low;
      if (index < 255) {
        float left = index == 0 ? -1.0f : code[index];
        if (std::fabs(normalized - code[index + 1]) < std::fabs(normalized - left)) ++index;
      }
      codes[i] = static_cast<std::uint8_t>(index);
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

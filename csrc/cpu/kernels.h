// Torch-free CPU kernel interface. Each ISA translation unit
// (*_scalar.cpp, *_avx2.cpp, *_avx512.cpp) fills one CpuKernels table; the
// baseline dispatcher (dispatch.cpp) picks one table at load time. Kernels
// work on raw pointers and a range of blocks or rows, so the ATen glue can
// split the work with at::parallel_for.
#pragma once

#include <cstdint>

namespace lowrank {
namespace cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// Element type of an activation / output buffer.
enum class Dtype : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// Per-block NF4 scales: plain fp32 absmax, or double-quantized (8-bit codes
// into `nested_code`, one fp32 scale per 256 blocks, plus `offset`).
struct BlockScales {
  const float* absmax = nullptr;
  const std::uint8_t* nested_codes = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.0f;
};

// `static` on purpose: every ISA translation unit gets a private copy, so no
// out-of-line copy built with AVX-512 flags can be shared with baseline code.
static inline float block_scale(const BlockScales& scales, std::int64_t block) {
  if (scales.nested_codes == nullptr) return scales.absmax[block];
  return scales.nested_code[scales.nested_codes[block]] * scales.nested_absmax[block / 256] +
         scales.offset;
}

struct CpuKernels {
  Isa isa;

  // NF4-quantizes blocks [block_begin, block_end) of a flat tensor of `numel`
  // elements. Writes the packed bytes of those blocks and their absmax.
  // Returns false when a block holds NaN or Inf (its output is then undefined).
  bool (*nf4_quantize)(const void* input, Dtype dtype, std::int64_t numel,
                       std::int64_t blocksize, std::int64_t block_begin,
                       std::int64_t block_end, std::uint8_t* packed, float* absmax);

  // Dequantizes blocks [block_begin, block_end) into `out` (dtype `dtype`).
  void (*nf4_dequantize)(const std::uint8_t* packed, const float* absmax,
                         std::int64_t numel, std::int64_t blocksize,
                         std::int64_t block_begin, std::int64_t block_end,
                         void* out, Dtype dtype);
};

const CpuKernels& scalar_kernels();
const CpuKernels& avx2_kernels();
const CpuKernels& avx512_kernels();

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

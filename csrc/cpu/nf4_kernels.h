// Torch-free NF4 kernels: the NF4 part of the CPU kernel table (Nf4Kernels,
// one per ISA, filled by nf4_scalar.cpp, nf4_avx2.cpp and nf4_avx512.cpp,
// plus nf4_avx512bf16.cpp's bf16 GEMV) and the layouts its GEMVs read.
// Kernels work on raw pointers and a range of blocks or rows, so the glue
// can split the work with torch's parallel_for.
#pragma once

#include <cstdint>

#include "core/types.h"

namespace lowrank {
namespace cpu {

// `static` on purpose: every ISA translation unit gets a private copy, so no
// out-of-line copy built with AVX-512 flags can be shared with baseline code.
static inline float block_scale(const BlockScales& scales, std::int64_t block) {
  if (scales.nested_codes == nullptr) return scales.absmax[block];
  return scales.nested_code[scales.nested_codes[block]] * scales.nested_absmax[block / 256] +
         scales.offset;
}

// fp32 activations for Nf4Kernels::gemv, prepared once per call by
// prepare_gemv_input. Row r starts at data + r * gemv_row_stride and holds, in order, each part
// starting gemv_part_stride or gemv_natural_stride floats after the previous:
//   natural[in_features]      x[r, k]
//   pairs[0]: even[half], odd[half]  with even[j] = x[r, 2j],     odd[j] = x[r, 2j + 1]
//   pairs[1]: even[half], odd[half]  with even[j] = x[r, 1 + 2j], odd[j] = x[r, 2 + 2j]
// where half = (in_features + 1) / 2 and missing elements are 0. A weight row
// whose first flat index has parity p meets its byte-aligned runs in
// pairs[p]: the high nibbles of a run of bytes multiply a contiguous slice of
// `even`, the low nibbles the same slice of `odd`, so SIMD code needs no
// interleaving shuffles. The strides are whole cache lines plus one: the GEMV
// reads the same column of every part of up to 16 rows at once, and with
// strides a multiple of 4 KiB (in_features 8192) those 32 streams all fell
// into one L1 set, which made 8 rows in one pass twice as slow as two passes
// of 4 rows.
struct GemvInput {
  const float* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t in_features = 0;
};

// Layout helpers for GemvInput: free `static` functions rather than members,
// so no out-of-line copy compiled with an ISA file's flags can be shared
// (member functions would be inline functions with external linkage).
static inline std::int64_t gemv_half(const GemvInput& input) { return (input.in_features + 1) / 2; }
static inline std::int64_t gemv_padded(std::int64_t floats) { return (floats + 15) / 16 * 16 + 16; }
static inline std::int64_t gemv_natural_stride(const GemvInput& input) {
  return gemv_padded(input.in_features);
}
static inline std::int64_t gemv_part_stride(const GemvInput& input) {
  return gemv_padded(gemv_half(input));
}
static inline std::int64_t gemv_row_stride(const GemvInput& input) {
  return gemv_natural_stride(input) + 4 * gemv_part_stride(input);
}
static inline const float* gemv_natural(const GemvInput& input, std::int64_t row) {
  return input.data + row * gemv_row_stride(input);
}
static inline const float* gemv_even(const GemvInput& input, std::int64_t row, std::int64_t parity) {
  return gemv_natural(input, row) + gemv_natural_stride(input) +
         2 * parity * gemv_part_stride(input);
}
static inline const float* gemv_odd(const GemvInput& input, std::int64_t row, std::int64_t parity) {
  return gemv_even(input, row, parity) + gemv_part_stride(input);
}

// bf16 activations for Nf4Kernels::gemv_bf16 (in_features a multiple of
// kGemvBf16Group), prepared once per call by prepare_gemv_input_bf16. Row r
// starts at data + r * in_features and holds the row's bf16 bit patterns,
// each group of kGemvBf16Group columns permuted so that position p of the
// group holds column gemv_bf16_column(p): the order in which the AVX512-BF16
// kernel's byte-shuffle decode produces 64 weights from 32 packed bytes
// (see gemv_bf16_column), so the kernel needs no shuffles for activations.
struct GemvBf16Input {
  const std::uint16_t* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t in_features = 0;
};

static constexpr std::int64_t kGemvBf16Group = 64;

// Column (within a group of 64) held at position `position` of the permuted
// bf16 activation group. The decode reads 32 bytes into both 256-bit halves
// of a register, high nibbles (even columns) in 128-bit lanes 0-1 and low
// nibbles (odd columns) in lanes 2-3; lane L, byte b stands for packed byte
// b + 16 * (L & 1). Unpacking the looked-up low and high bf16 bytes gives
// two registers of 32 words: word q of lane L is byte q of lane L in the
// first register (positions 0..31), byte 8 + q in the second (32..63).
static inline std::int64_t gemv_bf16_column(std::int64_t position) {
  const std::int64_t second = position / 32;
  const std::int64_t lane = (position % 32) / 8;
  const std::int64_t byte = position % 8 + 8 * second + 16 * (lane & 1);
  return 2 * byte + (lane >> 1);
}

// Widest column range one gemv_transposed call takes.
static constexpr std::int64_t kGemvTransposedMaxColumns = 1024;

struct Nf4Kernels {
  // NF4-quantizes blocks [block_begin, block_end) of a flat tensor of `numel`
  // elements. Writes the packed bytes of those blocks and their absmax.
  // Returns false when a block holds NaN or Inf (its output is then undefined).
  bool (*quantize)(const void* input, Dtype dtype, std::int64_t numel,
                       std::int64_t blocksize, std::int64_t block_begin,
                       std::int64_t block_end, std::uint8_t* packed, float* absmax);

  // Dequantizes blocks [block_begin, block_end) into `out` (dtype `dtype`).
  void (*dequantize)(const std::uint8_t* packed, const float* absmax, std::int64_t numel,
                     std::int64_t blocksize, std::int64_t block_begin, std::int64_t block_end,
                     void* out, Dtype dtype);

  // out[r, o] = sum_k x[r, k] * W[o, k] (+ bias[o]) for every row r of `input`
  // and o in [out_begin, out_end), W the NF4 weight [out_features,
  // in_features] (blocks over its flattened form; a block may straddle rows).
  // Accumulates in fp32 and rounds once into `out` ([rows, out_features],
  // row-major, dtype `out_dtype`). `bias` is fp32 [out_features] or null.
  void (*gemv)(const GemvInput& input, const std::uint8_t* packed, const BlockScales& scales,
               std::int64_t out_features, std::int64_t in_features, std::int64_t blocksize,
               const float* bias, std::int64_t out_begin, std::int64_t out_end, void* out,
               Dtype out_dtype);

  // accumulator[r * accumulator_stride + (k - column_begin)] =
  //     sum_o grad[r * out_features + o] * W[o, k]
  // for r < rows and k in [column_begin, column_end), the columns at most
  // kGemvTransposedMaxColumns wide (the weight rows' slices are decoded into
  // a stack buffer). grad is fp32 [rows, out_features]; sums in fp32.
  void (*gemv_transposed)(const float* grad, std::int64_t rows, const std::uint8_t* packed,
                          const BlockScales& scales, std::int64_t out_features,
                          std::int64_t in_features, std::int64_t blocksize,
                          std::int64_t column_begin, std::int64_t column_end, float* accumulator,
                          std::int64_t accumulator_stride);

  // Dequantizes flat weight elements [begin, end) (any bounds, blocks may be
  // cut) into out[0, end - begin) in `dtype`; same values as dequantize.
  void (*dequantize_range)(const std::uint8_t* packed, const BlockScales& scales,
                           std::int64_t blocksize, std::int64_t begin, std::int64_t end, void* out,
                           Dtype dtype);

  // gemv for bf16 activations with AVX512-BF16 dot products: each weight
  // is bf16(codebook value) * fp32 block scale (within one bf16 rounding of
  // the dequantized weight), products summed in fp32. Needs in_features to
  // be a multiple of kGemvBf16Group. Null unless the table is AVX-512 and
  // the CPU has AVX512-BF16 (nf4_gemv_avx512bf16, set by dispatch.cpp).
  void (*gemv_bf16)(const GemvBf16Input& input, const std::uint8_t* packed,
                    const BlockScales& scales, std::int64_t out_features,
                    std::int64_t in_features, std::int64_t blocksize, const float* bias,
                    std::int64_t out_begin, std::int64_t out_end, void* out, Dtype out_dtype);
};

// Fills a GemvInput buffer of rows * gemv_row_stride() floats from
// `rows` contiguous rows of `in_features` values of type `dtype`.
void prepare_gemv_input(const void* input, Dtype dtype, std::int64_t rows,
                        std::int64_t in_features, float* buffer);

// Fills a GemvBf16Input buffer of rows * in_features bf16 values from `rows`
// contiguous rows of bf16 `input` (in_features a multiple of kGemvBf16Group).
void prepare_gemv_input_bf16(const std::uint16_t* input, std::int64_t rows,
                             std::int64_t in_features, std::uint16_t* buffer);

}  // namespace cpu
}  // namespace lowrank

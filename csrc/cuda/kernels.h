// Torch-free CUDA kernel interface: every host launcher of csrc/cuda/*.cu is
// declared here. Launchers take raw device pointers and a cudaStream_t, launch
// on that stream, and return the launch status (cudaGetLastError); they never
// synchronize. Numerics follow csrc/core/nf4.h and csrc/cpu/nf4_kernels.h exactly:
// quantize and dequantize are bit-identical to the CPU kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/types.h"

namespace lowrank {
namespace cuda {

// Element type and per-block NF4 scales as the CPU kernels have them
// (core/types.h); here every pointer in BlockScales is a device pointer.
using ::lowrank::BlockScales;
using ::lowrank::Dtype;

// An NF4 weight W [out_features, in_features] (row-major before flattening):
// `packed` holds ceil(out*in/2) bytes, element 2i in the high nibble.
struct Nf4Matrix {
  const std::uint8_t* packed = nullptr;
  BlockScales scales;
  std::int64_t out_features = 0;
  std::int64_t in_features = 0;
  std::int64_t blocksize = 64;
};

// ------------------------------------------------------------ quantization --

// NF4-quantizes a flat tensor of `numel` elements. Writes ceil(numel/2) packed
// bytes and ceil(numel/blocksize) absmax values. Sets *nonfinite_flag (device
// int, caller zeroes it) to 1 when any element is NaN or Inf.
cudaError_t nf4_quantize(const void* input, Dtype dtype, std::int64_t numel,
                         std::int64_t blocksize, std::uint8_t* packed, float* absmax,
                         int* nonfinite_flag, cudaStream_t stream);

// Dequantizes `numel` NF4 elements into `out` (dtype `dtype`):
// codebook[code] * scale in fp32, then rounded to nearest-even in `dtype`.
cudaError_t nf4_dequantize(const std::uint8_t* packed, const BlockScales& scales,
                           std::int64_t numel, std::int64_t blocksize, void* out, Dtype dtype,
                           cudaStream_t stream);

// 8-bit blockwise quantization against a sorted 256-entry `code` map, the
// rule of cpu::quantize_blockwise_8bit / cpu::build_8bit_lookup (scale by
// 1/absmax, 65536 bins, nearest code of the bin centre; an all-zero block gets
// code 0). `input` must be finite (checked by the caller). `blocksize` may be
// any positive value.
cudaError_t quantize_blockwise_8bit(const float* input, const float* code, std::int64_t numel,
                                    std::int64_t blocksize, std::uint8_t* codes, float* absmax,
                                    cudaStream_t stream);

// out[i] = code[codes[i]] * absmax[i / blocksize], fp32.
cudaError_t dequantize_blockwise_8bit(const std::uint8_t* codes, const float* absmax,
                                      const float* code, std::int64_t numel,
                                      std::int64_t blocksize, float* out, cudaStream_t stream);

// ---------------------------------------------------------------- matmuls --
// Every matmul uses the weight as the dequantize op would produce it in the
// activation dtype (codebook * scale in fp32, rounded to `dtype`), multiplies
// in fp32 and accumulates in fp32; outputs are rounded once to `dtype`.

// Rows that the GEMV path serves at most; more rows take a GEMM path.
constexpr std::int64_t kGemvMaxRows = 16;

// out[rows, out_features] = input[rows, in_features] @ W.T (+ bias), for
// 1 <= rows <= kGemvMaxRows. input, bias and out are contiguous, of `dtype`.
// One warp per output feature; 16-byte weight loads when in_features % 32 == 0
// and the buffers are 16-byte aligned, an element-wise path otherwise.
cudaError_t nf4_gemv(const void* input, std::int64_t rows, const Nf4Matrix& weight,
                     const void* bias, void* out, Dtype dtype, cudaStream_t stream);

// out[rows, out_features] = input[rows, in_features] @ W.T (+ bias) on tensor
// cores (bf16/fp16 only, sm_80+): each thread block dequantizes its weight
// tile into shared memory inside the main loop, so the dense weight is never
// written to global memory. Any rows >= 1, any in_features.
cudaError_t nf4_gemm_tensor_core(const void* input, std::int64_t rows, const Nf4Matrix& weight,
                                 const void* bias, void* out, Dtype dtype, cudaStream_t stream);

// True when the current device can run nf4_gemm_tensor_core (sm_80 or newer).
bool tensor_core_gemm_supported(int device);

// ------------------------------------------------------ multi-adapter LoRA --
// Mixed-adapter batches (multi_lora_linear): row i of a [rows, features]
// activation uses adapter adapter_indices[i / rows_per_index]; -1 means no
// adapter. Factors are stacked and zero-padded as the op takes them; entries
// past an adapter's rank are never read. Products and sums are in fp32.
// An index outside [-1, num_adapters) or a rank outside [0, max_rank] is not
// an error here (finding it would need the host to read device memory): the
// row's hidden and output values become NaN.

// Per-row adapter selection, all device pointers.
struct MultiLoraRows {
  const std::int64_t* adapter_indices = nullptr;  // [rows / rows_per_index]
  std::int64_t rows_per_index = 1;
  const std::int64_t* ranks = nullptr;  // [num_adapters]
  const float* scalings = nullptr;      // [num_adapters]
  std::int64_t num_adapters = 0;
  std::int64_t max_rank = 0;
  std::int64_t rows = 0;
};

// hidden[row, k] (fp32 [rows, max_rank]) = scalings[a] * sum_j
// input[row, j] * factors[a, k, j] for k < ranks[a]; 0 for k >= ranks[a] and
// for rows without an adapter. input [rows, features] and factors
// [num_adapters, max_rank, features] are contiguous, of `dtype`. One warp per
// (row, rank), 16-byte loads when features allows and the buffers are aligned.
cudaError_t multi_lora_shrink(const MultiLoraRows& rows, const void* input, const void* factors,
                              std::int64_t features, Dtype dtype, float* hidden,
                              cudaStream_t stream);

// out[row, o] = base[row, o] + sum_{k < ranks[a]} hidden[row, k] * factors[a, o, k],
// rounded once to `dtype`; rows without an adapter (or of rank 0) copy base.
// factors [num_adapters, features, max_rank], base and out [rows, features],
// contiguous, of `dtype`; base may be null (read as zeros). One thread per
// (row, output); 16-byte loads of each output's rank slice when max_rank
// allows and factors is aligned.
cudaError_t multi_lora_expand(const MultiLoraRows& rows, const float* hidden,
                              const void* factors, std::int64_t features, const void* base,
                              Dtype dtype, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace lowrank

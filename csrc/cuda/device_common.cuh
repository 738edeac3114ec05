// Device-side helpers shared by the CUDA kernels: element conversions, the
// NF4 codebook in constant memory, block-scale decoding and dtype dispatch.
//
// Bit-exactness with the CPU kernels (built with -ffp-contract=off) needs
// every multiply/add/divide on the quantization path rounded on its own, so
// this code spells them as __fmul_rn / __fadd_rn / __fdiv_rn, which nvcc never
// contracts into an FMA, whatever -fmad says.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/nf4.h"
#include "cuda/kernels.h"

namespace lowrank {
namespace cuda {
namespace device {

// `static` so that every translation unit owns its copy (no relocatable
// device code needed).
static __constant__ float kCodebook[16] = {
    nf4::kCodebook[0],  nf4::kCodebook[1],  nf4::kCodebook[2],  nf4::kCodebook[3],
    nf4::kCodebook[4],  nf4::kCodebook[5],  nf4::kCodebook[6],  nf4::kCodebook[7],
    nf4::kCodebook[8],  nf4::kCodebook[9],  nf4::kCodebook[10], nf4::kCodebook[11],
    nf4::kCodebook[12], nf4::kCodebook[13], nf4::kCodebook[14], nf4::kCodebook[15],
};
static __constant__ float kMidpoints[15] = {
    nf4::kMidpoints[0],  nf4::kMidpoints[1],  nf4::kMidpoints[2],  nf4::kMidpoints[3],
    nf4::kMidpoints[4],  nf4::kMidpoints[5],  nf4::kMidpoints[6],  nf4::kMidpoints[7],
    nf4::kMidpoints[8],  nf4::kMidpoints[9],  nf4::kMidpoints[10], nf4::kMidpoints[11],
    nf4::kMidpoints[12], nf4::kMidpoints[13], nf4::kMidpoints[14],
};

// Conversions between a storage type and fp32 (round to nearest even).
template <typename T>
struct Element;

template <>
struct Element<float> {
  static __device__ __forceinline__ float to_float(float value) { return value; }
  static __device__ __forceinline__ float from_float(float value) { return value; }
};

template <>
struct Element<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 value) {
    return __bfloat162float(value);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float value) {
    return __float2bfloat16_rn(value);
  }
};

template <>
struct Element<__half> {
  static __device__ __forceinline__ float to_float(__half value) { return __half2float(value); }
  static __device__ __forceinline__ __half from_float(float value) {
    return __float2half_rn(value);
  }
};

// `value` rounded to T and widened back: the weight as the dequantize op
// would have stored it in T.
template <typename T>
__device__ __forceinline__ float round_through(float value) {
  return Element<T>::to_float(Element<T>::from_float(value));
}

// NF4 code of a value already scaled into [-1, 1]: the number of midpoints
// strictly below it (a value on a midpoint takes the lower code).
__device__ __forceinline__ std::uint8_t encode(float scaled) {
  std::uint8_t code = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) code += static_cast<std::uint8_t>(scaled > kMidpoints[i]);
  return code;
}

__device__ __forceinline__ float block_scale(const BlockScales& scales, std::int64_t block) {
  if (scales.nested_codes == nullptr) return __ldg(scales.absmax + block);
  float code_value = __ldg(scales.nested_code + __ldg(scales.nested_codes + block));
  float nested_scale = __ldg(scales.nested_absmax + block / nf4::kNestedBlocksize);
  return __fadd_rn(__fmul_rn(code_value, nested_scale), scales.offset);
}

// Copies the codebook into a kernel's shared `codebook[16]` (all threads of the
// block must call it). Lanes index the table with data-dependent codes:
// constant memory would serialize them, while 16 words in 16 banks of shared
// memory serve a warp without conflicts.
__device__ __forceinline__ void load_codebook(float* codebook) {
  if (threadIdx.x < 16) codebook[threadIdx.x] = kCodebook[threadIdx.x];
  __syncthreads();
}

// The dequantized weight value of `code` in fp32, before the dtype cast.
__device__ __forceinline__ float decode(const float* codebook, std::uint32_t code, float scale) {
  return __fmul_rn(codebook[code], scale);
}

}  // namespace device

// Calls `function(T{})` with T the storage type of `dtype`.
template <typename Function>
cudaError_t dispatch_dtype(Dtype dtype, Function&& function) {
  switch (dtype) {
    case Dtype::Float32:
      return function(float{});
    case Dtype::BFloat16:
      return function(__nv_bfloat16{});
    case Dtype::Float16:
      return function(__half{});
  }
  return cudaErrorInvalidValue;
}

// Blocks for a grid-stride loop over `work` items: enough to fill the device,
// never more than the work needs.
inline unsigned int grid_for(std::int64_t work, int threads_per_block) {
  std::int64_t blocks = (work + threads_per_block - 1) / threads_per_block;
  constexpr std::int64_t kMaxBlocks = 65535;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

inline bool aligned_16(const void* pointer) {
  return (reinterpret_cast<std::uintptr_t>(pointer) & 15u) == 0;
}

}  // namespace cuda
}  // namespace lowrank

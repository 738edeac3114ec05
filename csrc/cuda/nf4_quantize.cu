// NF4 quantize / dequantize and the 8-bit blockwise quantizer used for double
// quantization. Bit-identical to csrc/cpu/nf4_scalar.cpp + cpu/scalar_tail.h:
// same absmax (max over magnitude bit patterns), same scaling rule (full
// blocks multiply by 1/absmax, the partial last block divides), same
// midpoint encoding, same 65536-bin rule for the 8-bit map.
#include <cuda_runtime.h>

#include <cstdint>

#include "core/nf4.h"
#include "cuda/device_common.cuh"
#include "cuda/kernels.h"

namespace lowrank {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float clamp_unit(float value) {
  return value < -1.0f ? -1.0f : (value > 1.0f ? 1.0f : value);
}

// One warp per NF4 block: a warp-wide max of the magnitude bits, then every
// lane encodes element pairs (2p, 2p+1) into byte p.
template <typename T>
__global__ void nf4_quantize_kernel(const T* __restrict__ input, std::int64_t numel,
                                    std::int64_t blocksize, std::int64_t blocks,
                                    std::uint8_t* __restrict__ packed, float* __restrict__ absmax,
                                    int* __restrict__ nonfinite_flag) {
  const int lane = threadIdx.x % kWarpSize;
  const std::int64_t warp = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) /
                            kWarpSize;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (std::int64_t block = warp; block < blocks; block += warps) {
    const std::int64_t begin = block * blocksize;
    const std::int64_t end = begin + blocksize < numel ? begin + blocksize : numel;
    const bool full_block = end - begin == blocksize;
    std::uint32_t max_bits = 0;
    for (std::int64_t i = begin + lane; i < end; i += kWarpSize) {
      std::uint32_t bits = __float_as_uint(device::Element<T>::to_float(input[i])) & 0x7fffffffu;
      max_bits = bits > max_bits ? bits : max_bits;
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      std::uint32_t other = __shfl_xor_sync(kFullMask, max_bits, offset);
      max_bits = other > max_bits ? other : max_bits;
    }
    const float block_absmax = __uint_as_float(max_bits);
    if (lane == 0) {
      // A partial last block stores its clamped absmax (the format's rule).
      absmax[block] =
          full_block || block_absmax >= nf4::kAbsmaxFloor ? block_absmax : nf4::kAbsmaxFloor;
      if (max_bits >= 0x7f800000u) atomicOr(nonfinite_flag, 1);
    }
    const float clamped = block_absmax < nf4::kAbsmaxFloor ? nf4::kAbsmaxFloor : block_absmax;
    const float factor = full_block ? __fdiv_rn(1.0f, clamped) : clamped;
    for (std::int64_t pair = begin / 2 + lane; pair < (end + 1) / 2; pair += kWarpSize) {
      const std::int64_t i = 2 * pair;
      float high_value = device::Element<T>::to_float(input[i]);
      high_value = full_block ? __fmul_rn(high_value, factor) : __fdiv_rn(high_value, factor);
      std::uint32_t high = device::encode(clamp_unit(high_value));
      std::uint32_t low = nf4::kZeroCode;
      if (i + 1 < end) {
        float low_value = device::Element<T>::to_float(input[i + 1]);
        low_value = full_block ? __fmul_rn(low_value, factor) : __fdiv_rn(low_value, factor);
        low = device::encode(clamp_unit(low_value));
      }
      packed[pair] = static_cast<std::uint8_t>((high << 4) | low);
    }
  }
}

// Elements per vector step of the dequantize kernel: 4 packed bytes (one
// 32-bit load), so a warp reads 128 contiguous bytes and writes 256
// contiguous elements per step.
constexpr int kDequantizeUnit = 8;

template <typename T>
__device__ __forceinline__ void store_unit(T* out, const float (&values)[kDequantizeUnit]) {
  alignas(16) T converted[kDequantizeUnit];
#pragma unroll
  for (int j = 0; j < kDequantizeUnit; ++j) converted[j] = device::Element<T>::from_float(values[j]);
  constexpr int kVectors = kDequantizeUnit * sizeof(T) / 16;
#pragma unroll
  for (int v = 0; v < kVectors; ++v) {
    reinterpret_cast<uint4*>(out)[v] = reinterpret_cast<const uint4*>(converted)[v];
  }
}

// Vector path (kVector): needs `packed` 4-byte and `out` 16-byte aligned.
// Units of 8 elements never straddle an NF4 block (blocksize >= 32).
template <typename T, bool kVector>
__global__ void nf4_dequantize_kernel(const std::uint8_t* __restrict__ packed, BlockScales scales,
                                      std::int64_t numel, std::int64_t blocksize,
                                      T* __restrict__ out) {
  __shared__ float codebook[16];
  device::load_codebook(codebook);
  const std::int64_t thread = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  std::int64_t vector_end = 0;
  if (kVector) {
    const std::int64_t units = numel / kDequantizeUnit;
    vector_end = units * kDequantizeUnit;
    const std::uint32_t* words = reinterpret_cast<const std::uint32_t*>(packed);
    for (std::int64_t unit = thread; unit < units; unit += stride) {
      const float scale = device::block_scale(scales, unit * kDequantizeUnit / blocksize);
      const std::uint32_t word = __ldg(words + unit);
      float values[kDequantizeUnit];
#pragma unroll
      for (int byte = 0; byte < 4; ++byte) {
        const std::uint32_t bits = (word >> (8 * byte)) & 0xffu;  // little-endian byte order
        values[2 * byte] = device::decode(codebook, bits >> 4, scale);
        values[2 * byte + 1] = device::decode(codebook, bits & 0x0fu, scale);
      }
      store_unit(out + unit * kDequantizeUnit, values);
    }
  }
  for (std::int64_t i = vector_end + thread; i < numel; i += stride) {
    const std::uint8_t byte = __ldg(packed + i / 2);
    const std::uint32_t code = (i & 1) ? (byte & 0x0fu) : (byte >> 4);
    const float scale = device::block_scale(scales, i / blocksize);
    out[i] = device::Element<T>::from_float(device::decode(codebook, code, scale));
  }
}

// Bins of the 8-bit quantizer (cpu::build_8bit_lookup): a value in [-1, 1]
// falls into one of 65536 equal bins, and a bin's code is the number of map
// midpoints strictly below the bin centre.
constexpr int k8bitBins = 65536;

// One warp per 8-bit block. Instead of the CPU's 64 KiB bin table, each
// element's bin centre is searched among the 255 midpoints in shared memory:
// the same code, without a per-call table build.
__global__ void quantize_blockwise_8bit_kernel(const float* __restrict__ input,
                                               const float* __restrict__ code, std::int64_t numel,
                                               std::int64_t blocksize, std::int64_t blocks,
                                               std::uint8_t* __restrict__ codes,
                                               float* __restrict__ absmax) {
  __shared__ float midpoints[255];
  for (int i = threadIdx.x; i < 255; i += blockDim.x) {
    midpoints[i] = __fmul_rn(0.5f, __fadd_rn(code[i], code[i + 1]));
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize;
  const std::int64_t warp = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) /
                            kWarpSize;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (std::int64_t block = warp; block < blocks; block += warps) {
    const std::int64_t begin = block * blocksize;
    const std::int64_t end = begin + blocksize < numel ? begin + blocksize : numel;
    float block_absmax = 0.0f;
    for (std::int64_t i = begin + lane; i < end; i += kWarpSize) {
      block_absmax = fmaxf(block_absmax, fabsf(input[i]));
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      block_absmax = fmaxf(block_absmax, __shfl_xor_sync(kFullMask, block_absmax, offset));
    }
    if (lane == 0) absmax[block] = block_absmax;
    // An all-zero block gets code 0 (the CPU rule); inverse is unused then.
    const float inverse = block_absmax == 0.0f ? 0.0f : __fdiv_rn(1.0f, block_absmax);
    for (std::int64_t i = begin + lane; i < end; i += kWarpSize) {
      if (block_absmax == 0.0f) {
        codes[i] = 0;
        continue;
      }
      const float normalized = clamp_unit(__fmul_rn(input[i], inverse));
      // ((v + 1) * 0.5) * 65535 + 0.5, each step rounded, then truncated.
      const float position = __fadd_rn(
          __fmul_rn(__fmul_rn(__fadd_rn(normalized, 1.0f), 0.5f), static_cast<float>(k8bitBins - 1)),
          0.5f);
      const unsigned int bin = __float2uint_rz(position);
      const float centre = __fadd_rn(
          -1.0f, __fdiv_rn(__fmul_rn(2.0f, static_cast<float>(bin)), static_cast<float>(k8bitBins - 1)));
      // Count of midpoints < centre (midpoints ascend): a lower-bound search.
      int low = 0;
      int high = 255;
      while (low < high) {
        const int middle = (low + high) / 2;
        if (midpoints[middle] < centre) {
          low = middle + 1;
        } else {
          high = middle;
        }
      }
      codes[i] = static_cast<std::uint8_t>(low);
    }
  }
}

__global__ void dequantize_blockwise_8bit_kernel(const std::uint8_t* __restrict__ codes,
                                                 const float* __restrict__ absmax,
                                                 const float* __restrict__ code,
                                                 std::int64_t numel, std::int64_t blocksize,
                                                 float* __restrict__ out) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < numel; i += stride) {
    out[i] = __fmul_rn(__ldg(code + codes[i]), __ldg(absmax + i / blocksize));
  }
}

}  // namespace

cudaError_t nf4_quantize(const void* input, Dtype dtype, std::int64_t numel,
                         std::int64_t blocksize, std::uint8_t* packed, float* absmax,
                         int* nonfinite_flag, cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  const std::int64_t blocks = nf4::num_blocks(numel, blocksize);
  const unsigned int grid = grid_for(blocks * kWarpSize, kThreads);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    nf4_quantize_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(input), numel, blocksize, blocks, packed, absmax, nonfinite_flag);
    return cudaGetLastError();
  });
}

cudaError_t nf4_dequantize(const std::uint8_t* packed, const BlockScales& scales,
                           std::int64_t numel, std::int64_t blocksize, void* out, Dtype dtype,
                           cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  const bool vector = (reinterpret_cast<std::uintptr_t>(packed) & 3u) == 0 && aligned_16(out);
  const unsigned int grid = grid_for(numel / kDequantizeUnit + kDequantizeUnit, kThreads);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (vector) {
      nf4_dequantize_kernel<T, true><<<grid, kThreads, 0, stream>>>(packed, scales, numel,
                                                                    blocksize, static_cast<T*>(out));
    } else {
      nf4_dequantize_kernel<T, false><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
          packed, scales, numel, blocksize, static_cast<T*>(out));
    }
    return cudaGetLastError();
  });
}

cudaError_t quantize_blockwise_8bit(const float* input, const float* code, std::int64_t numel,
                                    std::int64_t blocksize, std::uint8_t* codes, float* absmax,
                                    cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  const std::int64_t blocks = nf4::num_blocks(numel, blocksize);
  quantize_blockwise_8bit_kernel<<<grid_for(blocks * kWarpSize, kThreads), kThreads, 0, stream>>>(
      input, code, numel, blocksize, blocks, codes, absmax);
  return cudaGetLastError();
}

cudaError_t dequantize_blockwise_8bit(const std::uint8_t* codes, const float* absmax,
                                      const float* code, std::int64_t numel,
                                      std::int64_t blocksize, float* out, cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  dequantize_blockwise_8bit_kernel<<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
      codes, absmax, code, numel, blocksize, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lowrank

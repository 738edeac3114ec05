// NF4 GEMV for 1..16 input rows: out[r, n] = sum_k input[r, k] * W[n, k].
//
// Decode-time matmuls are bound by reading the 4-bit weight, so each weight
// byte is loaded once and used for every row: one warp owns one output
// feature n, each lane loads 16 packed bytes (32 weights, one NF4 block since
// blocks are >= 32 aligned elements) per step, decodes them through the
// shared-memory codebook with the block scale decoded in-kernel (nested
// scales included), and multiplies them with kRows rows of the input in fp32.
// A warp shuffle reduction finishes each dot product.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device_common.cuh"
#include "cuda/kernels.h"

namespace lowrank {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kWeightsPerLoad = 32;  // 16 bytes of packed codes
constexpr unsigned kFullMask = 0xffffffffu;

// Loads input[k .. k+32) of one row (16-byte aligned) widened to fp32.
template <typename T>
__device__ __forceinline__ void load_row_segment(const T* row, float (&values)[kWeightsPerLoad]) {
  constexpr int kPerVector = 16 / sizeof(T);
#pragma unroll
  for (int v = 0; v < kWeightsPerLoad / kPerVector; ++v) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row) + v);
    const T* elements = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kPerVector; ++j) {
      values[v * kPerVector + j] = device::Element<T>::to_float(elements[j]);
    }
  }
}

// kVector: in_features % 32 == 0 and packed / input 16-byte aligned, so a
// lane's 32 weights are one aligned 16-byte load inside one NF4 block.
template <typename T, int kRows, bool kVector>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerBlock)
    nf4_gemv_kernel(const T* __restrict__ input, int rows, Nf4Matrix weight,
                    const T* __restrict__ bias, T* __restrict__ out) {
  __shared__ float codebook[16];
  device::load_codebook(codebook);
  const int lane = threadIdx.x % kWarpSize;
  const std::int64_t feature =
      static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (feature >= weight.out_features) return;
  const std::int64_t in_features = weight.in_features;
  const std::int64_t row_begin = feature * in_features;  // flat index of W[feature, 0]

  float accumulators[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) accumulators[r] = 0.0f;

  if (kVector) {
#pragma unroll 2
    for (std::int64_t k = lane * kWeightsPerLoad; k < in_features;
         k += kWarpSize * kWeightsPerLoad) {
      const std::int64_t element = row_begin + k;
      const uint4 bytes = __ldg(reinterpret_cast<const uint4*>(weight.packed + element / 2));
      const float scale = device::block_scale(weight.scales, element / weight.blocksize);
      float weights[kWeightsPerLoad];
      const std::uint32_t words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
#pragma unroll
      for (int byte = 0; byte < 16; ++byte) {
        const std::uint32_t bits = (words[byte / 4] >> (8 * (byte % 4))) & 0xffu;
        weights[2 * byte] = device::round_through<T>(device::decode(codebook, bits >> 4, scale));
        weights[2 * byte + 1] =
            device::round_through<T>(device::decode(codebook, bits & 0x0fu, scale));
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) {
          float values[kWeightsPerLoad];
          load_row_segment(input + r * in_features + k, values);
#pragma unroll
          for (int j = 0; j < kWeightsPerLoad; ++j) {
            accumulators[r] = fmaf(weights[j], values[j], accumulators[r]);
          }
        }
      }
    }
  } else {
    for (std::int64_t k = lane; k < in_features; k += kWarpSize) {
      const std::int64_t element = row_begin + k;
      const std::uint8_t byte = __ldg(weight.packed + element / 2);
      const std::uint32_t code = (element & 1) ? (byte & 0x0fu) : (byte >> 4);
      const float scale = device::block_scale(weight.scales, element / weight.blocksize);
      const float value = device::round_through<T>(device::decode(codebook, code, scale));
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) {
          accumulators[r] = fmaf(value, device::Element<T>::to_float(input[r * in_features + k]),
                                 accumulators[r]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      accumulators[r] += __shfl_xor_sync(kFullMask, accumulators[r], offset);
    }
  }
  if (lane == 0) {
    const float bias_value = bias == nullptr ? 0.0f : device::Element<T>::to_float(bias[feature]);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < rows) {
        out[r * weight.out_features + feature] =
            device::Element<T>::from_float(accumulators[r] + bias_value);
      }
    }
  }
}

template <typename T, int kRows>
cudaError_t launch_gemv(const T* input, int rows, const Nf4Matrix& weight, const T* bias, T* out,
                        cudaStream_t stream) {
  const bool vector = weight.in_features % kWeightsPerLoad == 0 && aligned_16(weight.packed) &&
                      aligned_16(input);
  const std::int64_t grid = (weight.out_features + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 blocks(static_cast<unsigned int>(grid));
  if (vector) {
    nf4_gemv_kernel<T, kRows, true>
        <<<blocks, kWarpSize * kWarpsPerBlock, 0, stream>>>(input, rows, weight, bias, out);
  } else {
    nf4_gemv_kernel<T, kRows, false>
        <<<blocks, kWarpSize * kWarpsPerBlock, 0, stream>>>(input, rows, weight, bias, out);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t nf4_gemv(const void* input, std::int64_t rows, const Nf4Matrix& weight,
                     const void* bias, void* out, Dtype dtype, cudaStream_t stream) {
  if (rows < 1 || rows > kGemvMaxRows) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* typed_input = static_cast<const T*>(input);
    const T* typed_bias = static_cast<const T*>(bias);
    T* typed_out = static_cast<T*>(out);
    const int count = static_cast<int>(rows);
    // Row counts round up to a compiled width; the kernel masks the rest.
    if (count == 1) return launch_gemv<T, 1>(typed_input, count, weight, typed_bias, typed_out, stream);
    if (count == 2) return launch_gemv<T, 2>(typed_input, count, weight, typed_bias, typed_out, stream);
    if (count <= 4) return launch_gemv<T, 4>(typed_input, count, weight, typed_bias, typed_out, stream);
    if (count <= 8) return launch_gemv<T, 8>(typed_input, count, weight, typed_bias, typed_out, stream);
    return launch_gemv<T, 16>(typed_input, count, weight, typed_bias, typed_out, stream);
  });
}

}  // namespace cuda
}  // namespace lowrank

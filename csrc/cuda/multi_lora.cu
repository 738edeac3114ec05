// Multi-adapter LoRA on CUDA (mixed-adapter batches): the gathered "shrink"
// and "expand" of batched LoRA, one row per thread block, each row reading
// its own adapter's factors (the BGMV form of Punica / S-LoRA). Rows are not
// sorted: every row finds its adapter through the index tensor on the device,
// so nothing ever waits for the host and the launch count does not depend on
// the number of adapters. Rows of one adapter re-read its factors from L2
// (an adapter's A and B are a few hundred KiB at r = 16), so DRAM traffic is
// each used adapter's factors once plus the activations.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device_common.cuh"
#include "cuda/kernels.h"

namespace lowrank {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
// Shrink: one warp per (row, rank); a block holds the warps of consecutive
// ranks of one row, so its warps share the row's activations in L1.
constexpr int kShrinkWarps = 4;
// Expand: one thread per (row, output feature).
constexpr int kExpandThreads = 256;
constexpr std::int64_t kMaxGridY = 65535;

// The adapter of one row, as the kernels see it. `invalid` marks an index
// outside [-1, num_adapters) or a rank outside [0, max_rank]: such rows get
// NaN, because checking the values on the host would cost a synchronization.
struct RowAdapter {
  std::int64_t adapter = -1;
  std::int64_t rank = 0;
  bool invalid = false;
};

__device__ __forceinline__ RowAdapter row_adapter(const MultiLoraRows& rows, std::int64_t row) {
  RowAdapter result;
  const std::int64_t index = __ldg(rows.adapter_indices + row / rows.rows_per_index);
  if (index == -1) return result;
  if (index < -1 || index >= rows.num_adapters) {
    result.invalid = true;
    return result;
  }
  const std::int64_t rank = __ldg(rows.ranks + index);
  if (rank < 0 || rank > rows.max_rank) {
    result.invalid = true;
    return result;
  }
  result.adapter = index;
  result.rank = rank;
  return result;
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// 16 bytes of T: kWidth elements read with one vector load.
template <typename T>
struct Vector {
  static constexpr int kWidth = 16 / sizeof(T);
  uint4 bits;
  __device__ __forceinline__ explicit Vector(const T* address)
      : bits(__ldg(reinterpret_cast<const uint4*>(address))) {}
  __device__ __forceinline__ T operator[](int index) const {
    return reinterpret_cast<const T*>(&bits)[index];
  }
};

// hidden[row, k] = scaling * input[row, :] . factors[adapter, k, :] for
// k < rank. kVectorized: features % Vector<T>::kWidth == 0 and both buffers
// 16-byte aligned, so every row of input and factors is too.
template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kShrinkWarps * kWarpSize)
    shrink_kernel(MultiLoraRows rows, const T* __restrict__ input,
                  const T* __restrict__ factors, std::int64_t features,
                  float* __restrict__ hidden) {
  using E = device::Element<T>;
  const std::int64_t row = blockIdx.x;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const RowAdapter selected = row_adapter(rows, row);
  const T* x = input + row * features;
  float* hidden_row = hidden + row * rows.max_rank;
  for (std::int64_t k = static_cast<std::int64_t>(blockIdx.y) * kShrinkWarps + warp;
       k < rows.max_rank; k += static_cast<std::int64_t>(gridDim.y) * kShrinkWarps) {
    if (selected.invalid || k >= selected.rank) {
      // Zeros past the rank let the backward's dense GEMMs read every column.
      if (lane == 0) hidden_row[k] = selected.invalid ? __int_as_float(0x7fc00000) : 0.0f;
      continue;
    }
    const T* factor = factors + (selected.adapter * rows.max_rank + k) * features;
    float sum = 0.0f;
    if constexpr (kVectorized) {
      constexpr int kWidth = Vector<T>::kWidth;
#pragma unroll 4
      for (std::int64_t j = static_cast<std::int64_t>(lane) * kWidth; j < features;
           j += kWarpSize * kWidth) {
        const Vector<T> x_vector(x + j);
        const Vector<T> factor_vector(factor + j);
#pragma unroll
        for (int e = 0; e < kWidth; ++e) {
          sum += E::to_float(x_vector[e]) * E::to_float(factor_vector[e]);
        }
      }
    } else {
      for (std::int64_t j = lane; j < features; j += kWarpSize) {
        sum += E::to_float(x[j]) * E::to_float(factor[j]);
      }
    }
    sum = warp_sum(sum);
    if (lane == 0) hidden_row[k] = __ldg(rows.scalings + selected.adapter) * sum;
  }
}

// out[row, o] = base[row, o] + hidden[row, :rank] . factors[adapter, o, :rank],
// summed in fp32 in rank order and rounded once. kVectorized: max_rank %
// Vector<T>::kWidth == 0 and factors 16-byte aligned, so each output's rank
// slice starts aligned; the vector past `rank` is masked element-wise (the
// padding is never read into the sum, whatever it holds).
template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kExpandThreads)
    expand_kernel(MultiLoraRows rows, const float* __restrict__ hidden,
                  const T* __restrict__ factors, std::int64_t features,
                  const T* __restrict__ base, T* __restrict__ out) {
  using E = device::Element<T>;
  const std::int64_t row = blockIdx.x;
  const RowAdapter selected = row_adapter(rows, row);
  const float* hidden_row = hidden + row * rows.max_rank;
  for (std::int64_t o = static_cast<std::int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
       o < features; o += static_cast<std::int64_t>(gridDim.y) * kExpandThreads) {
    float value = base == nullptr ? 0.0f : E::to_float(base[row * features + o]);
    if (selected.invalid) {
      value = __int_as_float(0x7fc00000);
    } else if (selected.rank > 0) {
      const T* factor = factors + (selected.adapter * features + o) * rows.max_rank;
      float sum = 0.0f;
      if constexpr (kVectorized) {
        constexpr int kWidth = Vector<T>::kWidth;
        for (std::int64_t k = 0; k < selected.rank; k += kWidth) {
          const Vector<T> factor_vector(factor + k);
#pragma unroll
          for (int e = 0; e < kWidth; ++e) {
            if (k + e < selected.rank) {
              sum += __ldg(hidden_row + k + e) * E::to_float(factor_vector[e]);
            }
          }
        }
      } else {
        for (std::int64_t k = 0; k < selected.rank; ++k) {
          sum += __ldg(hidden_row + k) * E::to_float(factor[k]);
        }
      }
      value += sum;
    }
    out[row * features + o] = E::from_float(value);
  }
}

unsigned int grid_y(std::int64_t tiles) {
  return static_cast<unsigned int>(tiles < kMaxGridY ? (tiles < 1 ? 1 : tiles) : kMaxGridY);
}

}  // namespace

cudaError_t multi_lora_shrink(const MultiLoraRows& rows, const void* input, const void* factors,
                              std::int64_t features, Dtype dtype, float* hidden,
                              cudaStream_t stream) {
  if (rows.rows == 0 || rows.max_rank == 0) return cudaSuccess;
  if (rows.rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned int>(rows.rows),
                    grid_y((rows.max_rank + kShrinkWarps - 1) / kShrinkWarps));
    const bool vectorized = features % Vector<T>::kWidth == 0 && aligned_16(input) &&
                            aligned_16(factors);
    const T* typed_input = static_cast<const T*>(input);
    const T* typed_factors = static_cast<const T*>(factors);
    if (vectorized) {
      shrink_kernel<T, true><<<grid, kShrinkWarps * kWarpSize, 0, stream>>>(
          rows, typed_input, typed_factors, features, hidden);
    } else {
      shrink_kernel<T, false><<<grid, kShrinkWarps * kWarpSize, 0, stream>>>(
          rows, typed_input, typed_factors, features, hidden);
    }
    return cudaGetLastError();
  });
}

cudaError_t multi_lora_expand(const MultiLoraRows& rows, const float* hidden,
                              const void* factors, std::int64_t features, const void* base,
                              Dtype dtype, void* out, cudaStream_t stream) {
  if (rows.rows == 0 || features == 0) return cudaSuccess;
  if (rows.rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned int>(rows.rows),
                    grid_y((features + kExpandThreads - 1) / kExpandThreads));
    const bool vectorized = rows.max_rank % Vector<T>::kWidth == 0 && aligned_16(factors);
    const T* typed_factors = static_cast<const T*>(factors);
    const T* typed_base = static_cast<const T*>(base);
    T* typed_out = static_cast<T*>(out);
    if (vectorized) {
      expand_kernel<T, true><<<grid, kExpandThreads, 0, stream>>>(
          rows, hidden, typed_factors, features, typed_base, typed_out);
    } else {
      expand_kernel<T, false><<<grid, kExpandThreads, 0, stream>>>(
          rows, hidden, typed_factors, features, typed_base, typed_out);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace lowrank

// NF4 GEMM on tensor cores (bf16/fp16 inputs, fp32 accumulation, sm_80+):
// out[M, N] = input[M, K] @ W.T (+ bias), W [N, K] in NF4.
//
// Each thread block computes a 128x128 output tile. Per 32-wide K step it
// loads the input tile [128 x 32] and dequantizes the weight tile [128 x 32]
// (codebook in shared memory, block scales incl. nested ones decoded here)
// into shared memory, then 8 warps run WMMA 16x16x16 on it, each warp owning
// a 64x32 sub-tile (4x2 accumulator fragments). The global loads of the next
// K step are issued into registers before the current step's math, so memory
// latency overlaps the tensor-core work. The dense weight never reaches
// global memory.
//
// Shared layouts (T = bf16 or fp16, rows padded to 40 elements = 80 bytes so
// that WMMA fragment pointers stay 32-byte aligned and rows shift banks):
//   input_tile [128][40]  row-major, element (m, k) at m * 40 + k
//   weight_tile[128][40]  element (n, k) at n * 40 + k, i.e. the B operand
//                         [K x N] in column-major order
#include <cuda_runtime.h>
#include <mma.h>

// bf16 WMMA needs sm_80. A device pass for an older architecture would have
// to compile the kernel to an empty body, which returns uninitialised memory
// as its result, so such a build stops here (cmake/cuda.cmake rejects those
// LOWRANK_CUDA_ARCHS first; the host never picks this kernel below sm_80,
// see tensor_core_gemm_supported).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "nf4_gemm.cu needs sm_80 or newer: remove older architectures from LOWRANK_CUDA_ARCHS"
#endif

#include <cstdint>
#include <type_traits>

#include "cuda/device_common.cuh"
#include "cuda/kernels.h"

namespace lowrank {
namespace cuda {
namespace {

constexpr int kTileM = 128;
constexpr int kTileN = 128;
constexpr int kTileK = 32;
constexpr int kTileStride = kTileK + 8;
constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kFragment = 16;
constexpr int kWarpTileM = 64;
constexpr int kWarpTileN = 32;
constexpr int kFragmentsM = kWarpTileM / kFragment;
constexpr int kFragmentsN = kWarpTileN / kFragment;
// Each thread stages 16 consecutive K elements of one row of each tile.
constexpr int kSegment = 16;
static_assert(kTileM * kTileK == kThreads * kSegment, "one input segment per thread");
static_assert(kTileN * kTileK == kThreads * kSegment, "one weight segment per thread");

// Registers holding one thread's share of the next K step.
template <typename T>
struct Staging {
  alignas(16) T input[kSegment];
  alignas(16) T weight[kSegment];
};

template <typename T>
__device__ __forceinline__ void stage_input(const T* __restrict__ input, std::int64_t rows,
                                            std::int64_t in_features, bool vector,
                                            std::int64_t row, std::int64_t k,
                                            T (&values)[kSegment]) {
  const T zero = device::Element<T>::from_float(0.0f);
  if (row < rows && vector && k + kSegment <= in_features) {
    const uint4* source = reinterpret_cast<const uint4*>(input + row * in_features + k);
    reinterpret_cast<uint4*>(values)[0] = __ldg(source);
    reinterpret_cast<uint4*>(values)[1] = __ldg(source + 1);
    return;
  }
#pragma unroll
  for (int j = 0; j < kSegment; ++j) {
    values[j] = row < rows && k + j < in_features ? input[row * in_features + k + j] : zero;
  }
}

template <typename T>
__device__ __forceinline__ void stage_weight(const Nf4Matrix& weight, const float* codebook,
                                             bool vector, std::int64_t feature, std::int64_t k,
                                             T (&values)[kSegment]) {
  const T zero = device::Element<T>::from_float(0.0f);
  const std::int64_t element = feature * weight.in_features + k;
  if (feature < weight.out_features && vector && k + kSegment <= weight.in_features) {
    // element % 16 == 0: 8 aligned bytes inside one NF4 block (blocksize >= 32).
    const uint2 bytes = __ldg(reinterpret_cast<const uint2*>(weight.packed + element / 2));
    const float scale = device::block_scale(weight.scales, element / weight.blocksize);
    const std::uint32_t words[2] = {bytes.x, bytes.y};
#pragma unroll
    for (int byte = 0; byte < 8; ++byte) {
      const std::uint32_t bits = (words[byte / 4] >> (8 * (byte % 4))) & 0xffu;
      values[2 * byte] = device::Element<T>::from_float(device::decode(codebook, bits >> 4, scale));
      values[2 * byte + 1] =
          device::Element<T>::from_float(device::decode(codebook, bits & 0x0fu, scale));
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < kSegment; ++j) {
    values[j] = zero;
    if (feature < weight.out_features && k + j < weight.in_features) {
      const std::int64_t index = element + j;
      const std::uint8_t byte = __ldg(weight.packed + index / 2);
      const std::uint32_t code = (index & 1) ? (byte & 0x0fu) : (byte >> 4);
      const float scale = device::block_scale(weight.scales, index / weight.blocksize);
      values[j] = device::Element<T>::from_float(device::decode(codebook, code, scale));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    nf4_gemm_kernel(const T* __restrict__ input, std::int64_t rows, Nf4Matrix weight,
                    const T* __restrict__ bias, T* __restrict__ out, bool vector_input,
                    bool vector_weight) {
  namespace wmma = nvcuda::wmma;
  __shared__ float codebook[16];
  __shared__ alignas(128) T input_tile[kTileM * kTileStride];
  __shared__ alignas(128) T weight_tile[kTileN * kTileStride];
  __shared__ alignas(128) float scratch[kThreads / kWarpSize][kFragment * kFragment];
  device::load_codebook(codebook);

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warp_m = warp / (kTileN / kWarpTileN);  // 0..1
  const int warp_n = warp % (kTileN / kWarpTileN);  // 0..3
  const std::int64_t tile_m = static_cast<std::int64_t>(blockIdx.y) * kTileM;
  const std::int64_t tile_n = static_cast<std::int64_t>(blockIdx.x) * kTileN;
  const int stage_row = threadIdx.x / (kTileK / kSegment);
  const int stage_k = (threadIdx.x % (kTileK / kSegment)) * kSegment;
  const std::int64_t in_features = weight.in_features;

  wmma::fragment<wmma::accumulator, kFragment, kFragment, kFragment, float>
      accumulators[kFragmentsM][kFragmentsN];
#pragma unroll
  for (int i = 0; i < kFragmentsM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragmentsN; ++j) wmma::fill_fragment(accumulators[i][j], 0.0f);
  }

  Staging<T> staging;
  stage_input(input, rows, in_features, vector_input, tile_m + stage_row, stage_k, staging.input);
  stage_weight(weight, codebook, vector_weight, tile_n + stage_row, stage_k, staging.weight);

  for (std::int64_t k0 = 0; k0 < in_features; k0 += kTileK) {
    T* input_destination = input_tile + stage_row * kTileStride + stage_k;
    T* weight_destination = weight_tile + stage_row * kTileStride + stage_k;
    reinterpret_cast<uint4*>(input_destination)[0] = reinterpret_cast<const uint4*>(staging.input)[0];
    reinterpret_cast<uint4*>(input_destination)[1] = reinterpret_cast<const uint4*>(staging.input)[1];
    reinterpret_cast<uint4*>(weight_destination)[0] = reinterpret_cast<const uint4*>(staging.weight)[0];
    reinterpret_cast<uint4*>(weight_destination)[1] = reinterpret_cast<const uint4*>(staging.weight)[1];
    __syncthreads();

    const std::int64_t next_k = k0 + kTileK;
    if (next_k < in_features) {
      stage_input(input, rows, in_features, vector_input, tile_m + stage_row, next_k + stage_k,
                  staging.input);
      stage_weight(weight, codebook, vector_weight, tile_n + stage_row, next_k + stage_k,
                   staging.weight);
    }

#pragma unroll
    for (int kk = 0; kk < kTileK; kk += kFragment) {
      wmma::fragment<wmma::matrix_a, kFragment, kFragment, kFragment, T, wmma::row_major>
          a_fragments[kFragmentsM];
      wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragment, T, wmma::col_major>
          b_fragments[kFragmentsN];
#pragma unroll
      for (int i = 0; i < kFragmentsM; ++i) {
        const int m = warp_m * kWarpTileM + i * kFragment;
        wmma::load_matrix_sync(a_fragments[i], input_tile + m * kTileStride + kk, kTileStride);
      }
#pragma unroll
      for (int j = 0; j < kFragmentsN; ++j) {
        const int n = warp_n * kWarpTileN + j * kFragment;
        wmma::load_matrix_sync(b_fragments[j], weight_tile + n * kTileStride + kk, kTileStride);
      }
#pragma unroll
      for (int i = 0; i < kFragmentsM; ++i) {
#pragma unroll
        for (int j = 0; j < kFragmentsN; ++j) {
          wmma::mma_sync(accumulators[i][j], a_fragments[i], b_fragments[j], accumulators[i][j]);
        }
      }
    }
    __syncthreads();
  }

  // Epilogue: each warp spills one fragment at a time to its scratch tile and
  // writes it out with bias, rounding once to T, masking the edges.
  float* warp_scratch = scratch[warp];
#pragma unroll
  for (int i = 0; i < kFragmentsM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragmentsN; ++j) {
      wmma::store_matrix_sync(warp_scratch, accumulators[i][j], kFragment, wmma::mem_row_major);
      __syncwarp();
      const std::int64_t base_m = tile_m + warp_m * kWarpTileM + i * kFragment;
      const std::int64_t base_n = tile_n + warp_n * kWarpTileN + j * kFragment;
      for (int index = lane; index < kFragment * kFragment; index += kWarpSize) {
        const std::int64_t m = base_m + index / kFragment;
        const std::int64_t n = base_n + index % kFragment;
        if (m < rows && n < weight.out_features) {
          float value = warp_scratch[index];
          if (bias != nullptr) value += device::Element<T>::to_float(bias[n]);
          out[m * weight.out_features + n] = device::Element<T>::from_float(value);
        }
      }
      __syncwarp();
    }
  }
}

}  // namespace

bool tensor_core_gemm_supported(int device) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return false;
  }
  return major >= 8;
}

cudaError_t nf4_gemm_tensor_core(const void* input, std::int64_t rows, const Nf4Matrix& weight,
                                 const void* bias, void* out, Dtype dtype, cudaStream_t stream) {
  if (dtype == Dtype::Float32) return cudaErrorInvalidValue;
  if (rows <= 0) return cudaSuccess;
  const std::int64_t grid_n = (weight.out_features + kTileN - 1) / kTileN;
  const std::int64_t grid_m = (rows + kTileM - 1) / kTileM;
  if (grid_n > 0x7fffffff || grid_m > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>(grid_n), static_cast<unsigned int>(grid_m));
  // Vector loads: 16 input elements (32 bytes) per thread need K % 8 == 0 and
  // a 16-byte aligned base; 8 packed bytes per thread need K % 16 == 0 and an
  // 8-byte aligned base.
  const bool vector_input = weight.in_features % 8 == 0 && aligned_16(input);
  const bool vector_weight = weight.in_features % 16 == 0 &&
                             (reinterpret_cast<std::uintptr_t>(weight.packed) & 7u) == 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;
    } else {
      nf4_gemm_kernel<T><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(input), rows, weight, static_cast<const T*>(bias),
          static_cast<T*>(out), vector_input, vector_weight);
      return cudaGetLastError();
    }
  });
}

}  // namespace cuda
}  // namespace lowrank

// What the CUDA glue needs from torch beyond glue_helpers.h, on the stable
// ABI: the device guard, the current stream, launch checks and host copies.
// Shared by cuda_ops.cpp and multi_lora_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "glue_helpers.h"

#ifndef USE_CUDA
#error "cuda_glue.h needs USE_CUDA (the CUDA part of torch's C shim)"
#endif

namespace lowrank {
namespace cuda {

// Makes the tensor's device current for the scope (as c10::cuda::CUDAGuard).
class DeviceGuard {
 public:
  explicit DeviceGuard(const Tensor& tensor) : guard_(tensor.get_device_index()) {}

 private:
  torch::stable::accelerator::DeviceGuard guard_;
};

// torch's current stream on the tensor's device.
inline cudaStream_t current_stream(const Tensor& tensor) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch_get_current_cuda_stream(tensor.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

inline void check_launch(const char* op, cudaError_t status) {
  LOWRANK_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ",
                cudaGetErrorString(status));
}

// A copy on the host (a device-to-host copy: waits for the stream).
inline Tensor to_host(const Tensor& tensor) {
  return torch::stable::to(tensor,
                           torch::stable::Device(torch::headeronly::DeviceType::CPU));
}

}  // namespace cuda
}  // namespace lowrank

// The pybind11 module lowrank_ext._C: build information, the CPU ISA switch
// and a fingerprint of tensors for the Python layers' caches. Ops are not
// bound here; they register with the dispatcher (registration.cpp) when this
// library is loaded.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#ifndef LOWRANK_VERSION
#define LOWRANK_VERSION "0.0.0"
#endif
#ifndef LOWRANK_TORCH_VERSION
#define LOWRANK_TORCH_VERSION "unknown"
#endif
#ifndef LOWRANK_CUDA_ARCHS
#define LOWRANK_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (auto isa : {lowrank::cpu::Isa::Scalar, lowrank::cpu::Isa::Avx2, lowrank::cpu::Isa::Avx512}) {
    if (lowrank::cpu::isa_supported(isa)) names.emplace_back(lowrank::cpu::isa_name(isa));
  }
  return names;
}

py::dict build_info() {
  py::dict info;
  info["version"] = LOWRANK_VERSION;
  info["torch_version"] = LOWRANK_TORCH_VERSION;
#ifdef LOWRANK_WITH_CUDA
  info["backends"] = std::vector<std::string>{"cpu", "cuda"};
  info["cuda_archs"] = std::string(LOWRANK_CUDA_ARCHS);
#else
  info["backends"] = std::vector<std::string>{"cpu"};
  info["cuda_archs"] = std::string();
#endif
  info["cpu_isa"] = lowrank::cpu::isa_name(lowrank::cpu::active_isa());
  // at::parallel_for only runs in parallel when this library itself was built
  // with the parallel backend torch uses (OpenMP in the official wheels).
#ifdef _OPENMP
  info["cpu_parallel"] = "openmp";
#else
  info["cpu_parallel"] = "none";
#endif
  info["cpu_isas_supported"] = supported_isas();
  // Whether the CPU has AVX512-BF16: without it the 4-bit GEMM path
  // multiplies bfloat16 activations in fp32 (see gemm_dtype in cpu_ops.cpp).
  info["cpu_bf16_dot_product"] = lowrank::cpu::bf16_dot_product_supported();
  return info;
}

// The version counter and data address of every tensor in `tensors`, as raw
// bytes. Equal fingerprints of the same tensor objects mean unchanged
// contents, unless modified behind autograd's back (through .data). The LoRA
// layers check their stacked-factor caches with it: one C++ pass over the
// factors, where reading these in Python right after a large GEMM (the
// objects out of the caches) cost as much as a third of the multi-adapter op
// with 32 adapters.
py::bytes tensor_fingerprint(const py::list& tensors) {
  std::string bytes(tensors.size() * 2 * sizeof(std::int64_t), '\0');
  auto* fields = reinterpret_cast<std::int64_t*>(bytes.data());
  for (const py::handle item : tensors) {
    if (!THPVariable_Check(item.ptr())) {
      throw py::type_error("tensor_fingerprint: expected a list of tensors");
    }
    const at::Tensor& tensor = THPVariable_Unpack(item.ptr());
    *fields++ = static_cast<std::int64_t>(tensor._version());
    *fields++ =
        tensor.has_storage()
            ? static_cast<std::int64_t>(reinterpret_cast<std::intptr_t>(tensor.const_data_ptr()))
            : 0;
  }
  return py::bytes(bytes);
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "lowrank_ext compiled core (ops register with torch.ops.lowrank_ext)";
  module.def("build_info", &build_info, "Version, torch version, backends, CPU ISA, CUDA archs.");
  module.def(
      "get_cpu_isa", [] { return std::string(lowrank::cpu::isa_name(lowrank::cpu::active_isa())); },
      "Name of the CPU kernel set in use: scalar, avx2 or avx512.");
  module.def(
      "set_cpu_isa",
      [](const std::string& name) { lowrank::cpu::set_active_isa(lowrank::cpu::parse_isa(name)); },
      py::arg("name"), "Switch the CPU kernel set; raises ValueError if unknown or unsupported.");
  module.def("supported_cpu_isas", &supported_isas, "CPU kernel sets this machine can run.");
  module.def("tensor_fingerprint", &tensor_fingerprint, py::arg("tensors"),
             "bytes of each tensor's version counter and data address.");
}

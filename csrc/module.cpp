// The pybind11 module lowrank_ext._C: build information and the CPU ISA
// switch. Ops are not bound here; they register with the dispatcher
// (registration.cpp) when this library is loaded.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cpu/dispatch.h"

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
  return info;
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
}

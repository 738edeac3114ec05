"""The compiled library: loading it registers the ops; the rest through ctypes.

``liblowrank_ext.so`` is a plain shared library on torch's stable ABI, not a
Python extension module: ``torch.ops.load_library`` loads it (its static
initializers register the schemas and the CPU / CUDA kernels with the
dispatcher), and its few non-tensor functions, build information and the CPU
ISA switch, are C functions called here through ctypes. Nothing in it depends
on the Python version, and nothing on torch's C++ ABI.

The package imports this module as ``lowrank_ext._C`` (the name of the former
extension module, which the layers and tests use).
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from typing import Sequence

import torch

LIBRARY_NAME = "liblowrank_ext.so"
_ERROR_SIZE = 512


def library_path() -> str:
    """Where the library lies: beside this file."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY_NAME)


def _load() -> ctypes.CDLL:
    path = library_path()
    if not os.path.exists(path):
        raise ImportError(
            f"lowrank_ext's compiled library {LIBRARY_NAME} is missing from "
            f"{os.path.dirname(path)}: build the package (pip install --no-build-isolation .) "
            f"or, in a source tree, copy the built library there")
    torch.ops.load_library(path)
    library = ctypes.CDLL(path)
    library.lowrank_build_info_json.restype = ctypes.c_char_p
    library.lowrank_build_info_json.argtypes = []
    library.lowrank_get_cpu_isa.restype = ctypes.c_char_p
    library.lowrank_get_cpu_isa.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    library.lowrank_set_cpu_isa.restype = ctypes.c_int
    library.lowrank_set_cpu_isa.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
    return library


_library = _load()
_BUILD_INFO = json.loads(_library.lowrank_build_info_json().decode())


def _torch_parallel_backend() -> str:
    # The ops split work with torch's own parallel_for, so they run in the
    # parallel backend of the running torch (OpenMP in the official wheels).
    info = torch.__config__.parallel_info()
    if "ATen parallel backend: OpenMP" in info:
        return "openmp"
    if "ATen parallel backend: native thread pool" in info:
        return "native"
    return "torch"


def build_info() -> dict:
    """Version, torch version built against, backends, CUDA archs, CPU ISA in
    use and the ones this machine supports, AVX512-BF16, parallel backend."""
    info = dict(_BUILD_INFO)
    info["cpu_isas_supported"] = list(info["cpu_isas_supported"])
    info["backends"] = list(info["backends"])
    info["cpu_isa"] = get_cpu_isa()
    info["cpu_parallel"] = _torch_parallel_backend()
    return info


def get_cpu_isa() -> str:
    """Name of the CPU kernel set in use: scalar, avx2 or avx512."""
    error = ctypes.create_string_buffer(_ERROR_SIZE)
    name = _library.lowrank_get_cpu_isa(error, _ERROR_SIZE)
    if name is None:
        raise RuntimeError(error.value.decode())
    return name.decode()


def set_cpu_isa(name: str) -> None:
    """Switch the CPU kernel set; raises ValueError if unknown or unsupported."""
    error = ctypes.create_string_buffer(_ERROR_SIZE)
    if _library.lowrank_set_cpu_isa(str(name).encode(), error, _ERROR_SIZE) != 0:
        raise ValueError(error.value.decode())


def supported_cpu_isas() -> list[str]:
    """CPU kernel sets this machine can run."""
    return list(_BUILD_INFO["cpu_isas_supported"])


_FINGERPRINT_FIELD = struct.Struct("=qq")


def tensor_fingerprint(tensors: Sequence[torch.Tensor]) -> bytes:
    """bytes of each tensor's version counter and data address. Equal
    fingerprints of the same tensor objects mean unchanged contents, unless
    modified behind autograd's back (through .data)."""
    fields = bytearray()
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError("tensor_fingerprint: expected a list of tensors")
        try:
            address = tensor.data_ptr()
        except RuntimeError:  # no storage (a tensor subclass, a traced tensor)
            address = 0
        fields += _FINGERPRINT_FIELD.pack(tensor._version, address)
    return bytes(fields)

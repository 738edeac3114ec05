"""The compiled library is built on torch's stable ABI for the oldest torch it
serves: the package refuses a torch older than that, and a CUDA build beside a
CPU torch or another CUDA major; wheels require torch>=<that version>
(issue 19)."""

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

import lowrank_ext
from lowrank_ext import _library, _torch_check

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_torch_pin():
    spec = importlib.util.spec_from_file_location("torch_pin", ROOT / "build_support" / "torch_pin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("running, running_cuda", [
    ("2.10.0", None),
    ("2.13.0+cpu", None),
    ("2.14.1+cu130", "13.0"),  # a CPU build runs beside a CUDA torch
    ("3.0.0", None),
])
def test_cpu_build_loads_into_every_torch_from_the_minimum_on(running, running_cuda):
    assert _torch_check.mismatch("2.13.0+cpu", "2.10", None, running, running_cuda) is None


@pytest.mark.parametrize("running", ["2.9.1+cpu", "2.4.0", "1.13.1"])
def test_older_torch_is_refused_naming_the_versions(running):
    reason = _torch_check.mismatch("2.13.0+cpu", "2.10", None, running, None)
    assert reason is not None
    assert running in reason and "torch>=2.10" in reason and "2.13.0+cpu" in reason


def test_cuda_build_needs_a_cuda_torch_of_its_cuda_major():
    reason = _torch_check.mismatch("2.14.1+cu130", "2.10", "13.0", "2.14.1+cpu", None)
    assert reason is not None and "CPU build" in reason
    reason = _torch_check.mismatch("2.14.1+cu130", "2.10", "13.0", "2.12.1+cu128", "12.8")
    assert reason is not None and "CUDA 12.8" in reason and "CUDA 13" in reason
    for running, cuda in [("2.14.1+cu130", "13.0"), ("2.15.0+cu131", "13.1")]:
        assert _torch_check.mismatch("2.14.1+cu130", "2.10", "13.0", running, cuda) is None


def test_build_records_its_torch_and_the_minimum_of_the_wheel_requirement():
    from lowrank_ext import _build_config

    assert _build_config.TORCH_VERSION == lowrank_ext.build_info()["torch_version"]
    assert _build_config.MIN_TORCH_VERSION == _load_torch_pin().MIN_TORCH_VERSION
    assert _build_config.WITH_CUDA == ("cuda" in lowrank_ext.build_info()["backends"])
    assert bool(_build_config.CUDA_VERSION) == _build_config.WITH_CUDA


_OLD_TORCH_IMPORT = """
import sys, types
fake = types.ModuleType("lowrank_ext._build_config")
fake.TORCH_VERSION = "9.0.0+cpu"
fake.MIN_TORCH_VERSION = "9.0"
fake.WITH_CUDA = False
fake.CUDA_VERSION = ""
sys.modules["lowrank_ext._build_config"] = fake
try:
    import lowrank_ext
except ImportError as error:
    print("IMPORT-ERROR:", error)
    print("LIBRARY-LOADED:", "lowrank_ext._library" in sys.modules)
"""


def test_import_refuses_before_loading_the_library():
    result = subprocess.run([sys.executable, "-c", _OLD_TORCH_IMPORT], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "IMPORT-ERROR: lowrank_ext needs torch>=9.0" in result.stdout
    assert torch.__version__ in result.stdout
    assert "LIBRARY-LOADED: False" in result.stdout


def test_skip_variable_loads_anyway():
    result = subprocess.run([sys.executable, "-c", _OLD_TORCH_IMPORT], capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, _torch_check.SKIP_VARIABLE: "1"})
    assert result.returncode == 0, result.stderr
    assert "IMPORT-ERROR" not in result.stdout


def test_wheel_requires_the_minimum_torch_not_a_minor_version():
    torch_pin = _load_torch_pin()
    assert torch_pin.MIN_TORCH_VERSION == "2.10"
    assert torch_pin.torch_requirement() == "torch>=2.10"
    assert torch_pin.torch_requirement("2.11") == "torch>=2.11"
    requirements = torch_pin.dynamic_metadata("dependencies", {"base": ["numpy"]})
    assert requirements == ["numpy", "torch>=2.10"]
    with pytest.raises(ValueError, match="base"):
        torch_pin.dynamic_metadata("dependencies", {"extra": []})


def _undefined_symbols(path):
    listing = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True,
                             text=True, check=True).stdout
    return [line.split()[-1].split("@")[0] for line in listing.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_library_uses_only_the_c_interfaces_of_torch_and_python_not_at_all():
    """The stable ABI promise: no C++ symbol of libtorch / c10 (those change
    between minor versions; mangled names in namespaces c10, at, torch or
    caffe2) and nothing of CPython (one build for every Python)."""
    symbols = _undefined_symbols(_library.library_path())
    torch_cxx = re.compile(r"^_Z(N|NK)?(3c10|2at|5torch|6caffe2)|^_Z.*N(3c10|2at|5torch|6caffe2)")
    assert not [s for s in symbols if torch_cxx.match(s)], \
        f"C++ symbols of torch: {[s for s in symbols if torch_cxx.match(s)][:10]}"
    assert not [s for s in symbols if s.startswith("Py")], "the library uses the Python C-API"
    assert any(s.startswith("aoti_torch_") or s.startswith("torch_") for s in symbols)

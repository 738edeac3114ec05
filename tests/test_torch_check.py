"""The package refuses to load its compiled module beside another torch, and
wheels pin the torch minor version they were compiled against (issue 19)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import lowrank_ext
from lowrank_ext import _torch_check

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_torch_pin():
    spec = importlib.util.spec_from_file_location("torch_pin", ROOT / "build_support" / "torch_pin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("built, running", [
    ("2.13.0+cpu", "2.13.0+cpu"),
    ("2.13.0+cpu", "2.13.1+cu130"),  # patch releases and local labels keep the ABI
    ("2.13.0", "2.13.0+cpu"),
])
def test_same_minor_loads(built, running):
    assert _torch_check.mismatch(built, False, running, None) is None


@pytest.mark.parametrize("built, running", [
    ("2.13.0+cpu", "2.14.1+cu130"),
    ("2.13.0+cpu", "2.12.1+cpu"),
    ("2.13.0+cpu", "3.13.0"),
])
def test_other_minor_is_refused_naming_both_versions(built, running):
    reason = _torch_check.mismatch(built, False, running, "13.0")
    assert reason is not None
    assert built in reason and running in reason
    assert "--no-build-isolation" in reason  # the rebuild command


def test_cuda_build_beside_cpu_torch_is_refused():
    reason = _torch_check.mismatch("2.14.1+cu130", True, "2.14.1+cpu", None)
    assert reason is not None and "CPU build" in reason
    assert _torch_check.mismatch("2.14.1+cu130", True, "2.14.1+cu130", "13.0") is None
    # A CPU build runs beside a CUDA torch of the same version.
    assert _torch_check.mismatch("2.14.1+cpu", False, "2.14.1+cu130", "13.0") is None


def test_build_records_the_torch_it_was_compiled_against():
    from lowrank_ext import _build_config

    assert _build_config.TORCH_VERSION == torch.__version__
    assert _build_config.TORCH_VERSION == lowrank_ext.build_info()["torch_version"]


_MISMATCHED_IMPORT = """
import sys, types
fake = types.ModuleType("lowrank_ext._build_config")
fake.TORCH_VERSION = "1.99.0+cpu"
fake.WITH_CUDA = False
sys.modules["lowrank_ext._build_config"] = fake
try:
    import lowrank_ext
except ImportError as error:
    print("IMPORT-ERROR:", error)
    print("C-LOADED:", "lowrank_ext._C" in sys.modules)
"""


def test_import_refuses_before_loading_the_extension():
    result = subprocess.run([sys.executable, "-c", _MISMATCHED_IMPORT], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "IMPORT-ERROR: lowrank_ext was compiled against torch 1.99.0+cpu" in result.stdout
    assert torch.__version__ in result.stdout
    assert "C-LOADED: False" in result.stdout


def test_skip_variable_loads_anyway():
    result = subprocess.run([sys.executable, "-c", _MISMATCHED_IMPORT], capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, _torch_check.SKIP_VARIABLE: "1"})
    assert result.returncode == 0, result.stderr
    assert "IMPORT-ERROR" not in result.stdout


def test_wheel_requirement_pins_the_build_minor():
    torch_pin = _load_torch_pin()
    assert torch_pin.torch_requirement("2.13.0+cpu") == "torch==2.13.*"
    assert torch_pin.torch_requirement("2.14.1+cu130") == "torch==2.14.*"
    requirements = torch_pin.dynamic_metadata("dependencies", {"base": ["numpy"]})
    major, minor = torch.__version__.split(".")[:2]
    assert requirements == ["numpy", f"torch=={major}.{minor}.*"]
    with pytest.raises(ValueError, match="base"):
        torch_pin.dynamic_metadata("dependencies", {"extra": []})

"""Shared fixtures: every CPU kernel test runs on every ISA this machine has."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lowrank_ext  # noqa: E402

CPU_ISAS = lowrank_ext.supported_cpu_isas()


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Switches the CPU kernel set for one test and restores it afterwards."""
    previous = lowrank_ext.get_cpu_isa()
    lowrank_ext.set_cpu_isa(request.param)
    yield request.param
    lowrank_ext.set_cpu_isa(previous)


@pytest.fixture
def generator():
    """A fresh, seeded generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little") % 2**31)

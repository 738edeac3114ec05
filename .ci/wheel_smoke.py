"""Smoke test for an installed lowrank_ext wheel, run outside the source tree
with no compiler on PATH: quantize -> dequantize round trip and nf4_linear
against the dense product. Exits non-zero on failure. With
LOWRANK_SMOKE_NO_COMPILER=1 it also asserts that no compiler is on PATH."""

import os
import shutil
import sys

import torch

import lowrank_ext
from lowrank_ext import NF4Weight, ops


def main() -> int:
    if os.environ.get("LOWRANK_SMOKE_NO_COMPILER") == "1":
        tools = ("cc", "gcc", "c++", "g++", "clang", "nvcc")
        compilers = [name for name in tools if shutil.which(name)]
        assert not compilers, f"compilers on PATH: {compilers}"
    assert "site-packages" in lowrank_ext.__file__, f"not the installed wheel: {lowrank_ext.__file__}"
    print("lowrank_ext", lowrank_ext.build_info())

    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    weight = torch.randn(96, 160, generator=generator)
    packed, absmax = ops.nf4_quantize(weight, 64)
    restored = ops.nf4_dequantize(packed, absmax, weight.shape, 64, torch.float32)
    # Half the widest NF4 gap (-1 to -0.6962) is 0.1519, plus rounding slack.
    block_absmax = absmax.repeat_interleave(64)[: weight.numel()].view_as(weight)
    assert ((restored - weight).abs() <= 0.153 * block_absmax).all(), "round trip error too large"

    nf4 = NF4Weight.from_float(weight, 64, double_quant=True)
    input = torch.randn(7, 160, generator=generator)
    out = ops.nf4_linear(input, *nf4.linear_args())
    expected = input.double() @ nf4.dequantize(torch.float32).double().T
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    print("wheel smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

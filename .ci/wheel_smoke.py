"""Smoke test for an installed lowrank_ext wheel, run outside the source tree
with no compiler on PATH: quantize -> dequantize round trip, nf4_linear
against the dense product, lora_linear / qlora_linear forward and backward
against plain torch, and torch.compile(fullgraph=True) of a QLoRA layer's
forward and backward (the aot_eager backend: tracing through the fake and
autograd kernels needs no compiler). Exits non-zero on failure. With
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

    # lora_linear forward and backward against the same math in plain torch.
    weight64 = torch.randn(24, 160, generator=generator, dtype=torch.float64)
    bias64 = torch.randn(24, generator=generator, dtype=torch.float64)
    factors = [torch.randn(4, 160, generator=generator, dtype=torch.float64),
               torch.randn(24, 4, generator=generator, dtype=torch.float64)]
    x = torch.randn(5, 160, generator=generator, dtype=torch.float64, requires_grad=True)
    A, B = (factor.clone().requires_grad_() for factor in factors)
    out = ops.lora_linear(x, weight64, bias64, A, B, 0.5)
    out.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    A_ref, B_ref = (factor.clone().requires_grad_() for factor in factors)
    ref = x_ref @ weight64.T + bias64 + 0.5 * (x_ref @ A_ref.T) @ B_ref.T
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for got, want in ((x.grad, x_ref.grad), (A.grad, A_ref.grad), (B.grad, B_ref.grad)):
        torch.testing.assert_close(got, want)

    # A QLoRA layer: eager forward + backward, then compiled (fullgraph).
    from lowrank_ext.nn import QLoRALinear

    base = torch.nn.Linear(160, 96)
    layer = QLoRALinear.from_linear(base, r=8, alpha=16, init=False)
    x = torch.randn(3, 160, generator=generator, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    eager_grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    x.grad = None
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    traced = compiled(x)
    traced.sum().backward()
    traced_grads = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    torch.testing.assert_close(traced, eager)
    for got, want in zip(traced_grads, eager_grads):
        torch.testing.assert_close(got, want)
    print(f"wheel smoke test passed with torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

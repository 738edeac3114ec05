"""The ops' outputs are fresh tensors, never views of a temporary.

Autograd in Python (python/lowrank_ext/_autograd.py) returns the op's output
from a torch.autograd.Function: an output that is a view is marked as created
in a custom Function, and modifying it in place then fails ("Output 0 of
_LoraLinear is a view and is being modified inplace"), as a Llama MLP's
in-place activation or a residual add does."""

import pytest
import torch

from lowrank_ext import NF4Weight, ops


def _three_d(generator, requires_grad=True):
    return torch.randn(2, 3, 64, generator=generator, requires_grad=requires_grad)


def _factors(generator, out_features=24):
    return (torch.randn(4, 64, generator=generator, requires_grad=True),
            torch.randn(out_features, 4, generator=generator, requires_grad=True))


CASES = {
    "lora_linear": lambda g, x: ops.lora_linear(x, torch.randn(24, 64, generator=g), None,
                                                *_factors(g), 0.5),
    "qlora_linear": lambda g, x: ops.qlora_linear(
        x, *NF4Weight.from_float(torch.randn(24, 64, generator=g)).linear_args(), None,
        *_factors(g), 0.5),
    "nf4_linear": lambda g, x: ops.nf4_linear(
        x, *NF4Weight.from_float(torch.randn(24, 64, generator=g)).linear_args(), None),
    "dropout": lambda g, x: ops.dropout(x, 0.25, torch.tensor([7])),
}


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_output_is_no_view_and_takes_in_place_updates(op, grad):
    generator = torch.Generator().manual_seed(0)
    x = _three_d(generator, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = CASES[op](generator, x)
        assert not out._is_view(), f"{op} returned a view"
        expected = out.detach() * 2 + 1
        out.mul_(2).add_(1)  # an in-place activation / residual add
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
    if grad:
        out.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape

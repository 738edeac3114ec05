"""Counter-based dropout: the mask is a pure function of (seed, index).

Statistical bound: the kept fraction of n elements has standard deviation
sqrt(p(1-p)/n); the tests allow 6 of them (a false failure about once in
10^9 runs).
"""

import math

import pytest
import torch

import lowrank_ext
from lowrank_ext import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_drop_rate_scale_and_isa_agreement(dtype, p):
    x = (torch.rand(257, 1031) + 0.5).to(dtype)  # no zeros: a zero output means dropped
    seed = torch.tensor([20261129])
    outputs = {}
    previous = lowrank_ext.get_cpu_isa()
    try:
        for isa in lowrank_ext.supported_cpu_isas():
            lowrank_ext.set_cpu_isa(isa)
            outputs[isa] = ops.dropout(x, p, seed)
    finally:
        lowrank_ext.set_cpu_isa(previous)
    reference = outputs["scalar"]
    assert all(torch.equal(out, reference) for out in outputs.values())
    dropped = (reference == 0).double().mean().item()
    assert abs(dropped - p) <= 6 * math.sqrt(p * (1 - p) / x.numel())
    kept = reference != 0
    # fp32 product with the fp32 scale 1 / (1 - p), rounded once to the dtype.
    expected = (x.float() * torch.tensor(1.0 / (1 - p), dtype=torch.float32)).to(dtype)
    assert torch.equal(reference[kept], expected[kept])


def test_same_seed_same_mask_other_seed_other_mask():
    x = torch.randn(4096)
    first = ops.dropout(x, 0.5, torch.tensor([1]))
    assert torch.equal(first, ops.dropout(x, 0.5, torch.tensor([1])))
    other = ops.dropout(x, 0.5, torch.tensor([2]))
    agreement = ((first == 0) == (other == 0)).double().mean().item()
    assert abs(agreement - 0.5) < 6 * math.sqrt(0.25 / 4096)


def test_default_seed_follows_torch_manual_seed():
    x = torch.randn(1000)
    torch.manual_seed(7)
    first = ops.dropout(x, 0.3)
    torch.manual_seed(7)
    assert torch.equal(first, ops.dropout(x, 0.3))


def test_backward_reuses_the_forward_mask():
    x = torch.randn(33, 65, requires_grad=True)
    out = ops.dropout(x, 0.25, torch.tensor([99]))
    grad = torch.randn_like(out)
    out.backward(grad)
    keep = (out != 0).float()
    torch.testing.assert_close(x.grad, grad * keep / 0.75, rtol=1e-6, atol=0)


def test_results_do_not_depend_on_thread_count():
    x = torch.randn(300_000)
    seed = torch.tensor([5])
    reference = ops.dropout(x, 0.1, seed)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.dropout(x, 0.1, seed), reference)
    finally:
        torch.set_num_threads(previous)


def test_compile_fullgraph_equals_eager():
    x = torch.randn(8, 40, requires_grad=True)
    seed = torch.tensor([3])
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: ops.dropout(t, 0.2, seed) * 2, fullgraph=True)
    assert torch.equal(compiled(x), ops.dropout(x, 0.2, seed) * 2)


def test_bad_arguments_are_rejected():
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="p must be in"):
        ops.dropout(x, 1.0)
    with pytest.raises(RuntimeError, match="p must be in"):
        ops.dropout(x, -0.1)
    with pytest.raises(RuntimeError, match="seed must be a CPU int64"):
        ops.dropout(x, 0.1, torch.tensor([1.5]))
    with pytest.raises(RuntimeError, match="input must be float32"):
        ops.dropout(torch.ones(4, dtype=torch.int32), 0.1)

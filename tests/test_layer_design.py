"""One layer design for every base and adapter variant (docs/architecture.md,
"Layers: base x variant"): behaviour that must not depend on which adapter
variant sits on which base.

The NF4 merge exists once, so AdaLoRA on a 4-bit base merges as QLoRA does:
every requested adapter is added in fp32 and the sum quantized once (the
error reported is that of the one rounding), ``keep_merged_weight`` keeps a
dense merged weight instead, and unmerging restores the 4-bit data exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_ext.nn import AdaLoRALinear, NF4Linear, QLoRALinear


def _count_requantize(layer):
    calls = []
    requantize = layer.base_layer.requantize

    def counted(dense):
        calls.append(dense.shape)
        return requantize(dense)

    layer.base_layer.requantize = counted
    return calls


def _adalora_nf4(seed):
    torch.manual_seed(seed)
    layer = AdaLoRALinear(NF4Linear.from_linear(nn.Linear(128, 64)), init_r=4, alpha=8,
                          init=False)
    layer.update_layer("other", init_r=2, alpha=2, init=False)
    layer.set_adapter(["default", "other"])
    return layer


def _qlora(seed):
    torch.manual_seed(seed)
    layer = QLoRALinear.from_linear(nn.Linear(128, 64), r=4, alpha=8, init=False)
    layer.update_layer("other", r=2, alpha=2, init=False)
    return layer


@pytest.mark.parametrize("make", [_adalora_nf4, _qlora], ids=["adalora", "qlora"])
def test_nf4_merge_of_two_adapters_requantizes_once_and_reports_that_error(make):
    layer = make(3)
    x = torch.randn(5, 128)
    unmerged = layer(x)
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    exact = (layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default")
             + layer.delta_weight("other"))
    calls = _count_requantize(layer)
    errors = layer.merge()
    assert len(calls) == 1, "the merged adapters must be quantized together, once"
    measured = (layer.base_layer.dequantize(torch.float32) - exact).abs().max().item()
    # One rounding of the sum: at most half the widest NF4 step (~0.16 of a block's absmax).
    assert errors == {"default": pytest.approx(measured), "other": pytest.approx(measured)}
    assert 0 < measured <= 0.17 * exact.abs().max().item()
    assert layer.merged_adapters == ["default", "other"]
    torch.testing.assert_close(layer(x), unmerged, atol=10 * measured * 128 ** 0.5, rtol=0)
    layer.unmerge()
    after = layer.base_layer.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert torch.equal(layer(x), unmerged)


@pytest.mark.parametrize("make", [_adalora_nf4, _qlora], ids=["adalora", "qlora"])
def test_nf4_merge_keeping_a_dense_weight_is_exact_and_leaves_the_4bit_base(make):
    layer = make(4)
    x = torch.randn(3, 128)
    unmerged = layer(x)
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    calls = _count_requantize(layer)
    errors = layer.merge(["default"], keep_merged_weight=True)
    assert calls == [] and errors == {"default": 0.0}
    assert layer.merged_weight.dtype == torch.float32
    after = layer.base_layer.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    # "other" still runs on top of the dense merged weight.
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="other way"):
        layer.merge(["other"], keep_merged_weight=False)
    assert layer.merge(["other"]) == {"other": 0.0}  # the mode of the last merge
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.unmerge()
    assert layer.merged_weight is None and torch.equal(layer(x), unmerged)


def test_adalora_on_a_dense_base_takes_no_4bit_merge_options():
    layer = AdaLoRALinear(nn.Linear(16, 8), init_r=2)
    with pytest.raises(TypeError, match="keep_merged_weight"):
        layer.merge(keep_merged_weight=True)


def test_adalora_wrapper_on_a_4bit_model_merges_keeping_dense_weights():
    from lowrank_ext import AdaLoRAModule

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    model[0] = NF4Linear.from_linear(model[0])
    model[2] = NF4Linear.from_linear(model[2])
    wrapped = AdaLoRAModule(model, target_modules=["0", "2"], init_r=4, target_r=2, total_step=10,
                            init_lora_weights=False)
    wrapped.eval()
    x = torch.randn(4, 32)
    unmerged = wrapped(x)
    report = wrapped.merge(keep_merged_weight=True)
    assert report == {"0": {"default": 0.0}, "2": {"default": 0.0}}
    torch.testing.assert_close(wrapped(x), unmerged, atol=1e-5, rtol=1e-5)
    wrapped.unmerge()
    assert torch.equal(wrapped(x), unmerged)

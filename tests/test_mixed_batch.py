"""Mixed-adapter batches: model(..., adapter_names=[...]) gives every row its own adapter.

Reference: the same row run alone with that adapter active (or with adapters
disabled for "__base__"). Tolerances: fp32 1e-5 (one extra rounding of the
fused sum), bf16 3e-2 relative to the output scale (bf16 has 8 mantissa bits
and both paths round intermediate results differently).
"""

import pytest
import torch
from torch import nn

import lowrank_ext


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def wrapped(kind, dtype=torch.float32):
    torch.manual_seed(0)
    model = TinyModel().to(dtype)
    options = dict(target_modules=["up", "down"], init_lora_weights=False)
    wrapper_class = lowrank_ext.LoRAModule if kind == "lora" else lowrank_ext.QLoRAModule
    wrapper = wrapper_class(model, r=4, lora_alpha=8, **options)
    wrapper.add_adapter("second", r=8, lora_alpha=4, **options)
    wrapper.add_adapter("third", r=2, lora_alpha=2, **options)
    return wrapper


def reference_rows(wrapper, x, names):
    rows = []
    for row, name in zip(x, names):
        if name == "__base__":
            with wrapper.disable_adapter():
                rows.append(wrapper(row[None]))
        else:
            wrapper.set_adapter(name)
            rows.append(wrapper(row[None]))
    return torch.cat(rows)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("leading", [(), (3,)])
def test_each_row_uses_its_adapter(kind, dtype, leading):
    wrapper = wrapped(kind, dtype)
    names = ["default", "__base__", "third", "second", "default", "third", "__base__"]
    x = torch.randn(len(names), *leading, 24).to(dtype)
    with torch.no_grad():
        mixed = wrapper(x, adapter_names=names)
        expected = reference_rows(wrapper, x, names)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2 * expected.abs().max().item()
    torch.testing.assert_close(mixed, expected, atol=tolerance, rtol=0)


def test_mixed_batch_trains_like_separate_rows():
    wrapper = wrapped("lora")
    names = ["second", "default", "second", "__base__"]
    x = torch.randn(4, 24)
    # set_adapter freezes inactive adapters (as PEFT does); train them all here.
    factors = [p for n, p in wrapper.named_parameters() if "lora_" in n]
    gradients = {}
    for run in ("mixed", "reference"):
        for parameter in factors:
            parameter.requires_grad_(True)
            parameter.grad = None
        output = wrapper(x, adapter_names=names) if run == "mixed" else reference_rows(
            wrapper, x, names)
        if run == "reference":
            for parameter in factors:
                parameter.requires_grad_(True)
        output.square().sum().backward()
        gradients[run] = [torch.zeros_like(p) if p.grad is None else p.grad for p in factors]
    for mixed, reference in zip(gradients["mixed"], gradients["reference"]):
        torch.testing.assert_close(mixed, reference, atol=1e-5, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in gradients["mixed"])


def test_inference_reuses_stacked_factors_until_they_change():
    wrapper = wrapped("lora")
    names = ["second", "default"]
    x = torch.randn(2, 24)
    with torch.no_grad():
        first = wrapper(x, adapter_names=names)
        for name, parameter in wrapper.named_parameters():
            if "lora_" in name:
                parameter.add_(0.5)
        second = wrapper(x, adapter_names=names)
        expected = reference_rows(wrapper, x, names)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=1e-5)


def _replace_parameter(wrapper):
    layer = wrapper.model.up
    layer.lora_A["second"].weight = nn.Parameter(torch.randn_like(layer.lora_A["second"].weight))


def _replace_module(wrapper):
    layer = wrapper.model.up
    old = layer.lora_B["third"]
    new = nn.Linear(old.in_features, old.out_features, bias=False)
    nn.init.normal_(new.weight)
    layer.lora_B["third"] = new


def _swap_modules(wrapper):
    layer = wrapper.model.up
    # Modules built before the cache: no parameter registration happens.
    for factors in (layer.lora_A, layer.lora_B):
        factors["second"], factors["default"] = factors["default"], factors["second"]


def _load_with_assign(wrapper):
    state = {name: torch.randn_like(value) for name, value in wrapper.model.state_dict().items()
             if "lora_B" in name}
    wrapper.model.load_state_dict(state, strict=False, assign=True)


def _copy_state(wrapper):
    state = {name: torch.randn_like(value) for name, value in wrapper.model.state_dict().items()
             if "lora_A" in name}
    wrapper.model.load_state_dict(state, strict=False)


def _change_scale(wrapper):
    wrapper.model.down.scaling["third"] *= 3.0


def _write_through_data(wrapper):
    # Swapping .data changes the factor's data address (its version stays).
    weight = wrapper.model.down.lora_B["default"].weight
    weight.data = torch.randn_like(weight)


def _add_through_data(wrapper):
    # In-place writes through .data bump no version counter (p.data is a new
    # tensor with its own counter) and keep the data address.
    wrapper.model.up.lora_B["second"].weight.data.add_(0.5)


def _copy_through_data(wrapper):
    # A hot swap: new weights copied into the same storage.
    weight = wrapper.model.down.lora_A["third"].weight
    weight.data.copy_(torch.randn_like(weight))


def _ema_through_data(wrapper):
    # An EMA update as training code writes it (shadow = decay * shadow + (1 - decay) * p).
    for name, parameter in wrapper.named_parameters():
        if "lora_B" in name:
            parameter.data.mul_(0.5).add_(torch.ones_like(parameter), alpha=0.5)


def _round_trip_dtype(wrapper):
    wrapper.model.to(torch.float64)
    with torch.no_grad():
        for name, parameter in wrapper.named_parameters():
            if "lora_B" in name:
                parameter.mul_(-1.0)  # changes the content too, so a stale stack would show
    wrapper.model.to(torch.float32)


@pytest.mark.parametrize("change", [_replace_parameter, _replace_module, _swap_modules,
                                    _load_with_assign, _copy_state, _change_scale,
                                    _write_through_data, _add_through_data, _copy_through_data,
                                    _ema_through_data, _round_trip_dtype])
def test_stacked_factor_cache_notices_every_kind_of_change(change):
    """The inference cache of stacked factors never serves factors that changed."""
    wrapper = wrapped("lora")
    names = ["second", "default", "third", "__base__"]
    x = torch.randn(len(names), 24)
    with torch.no_grad():
        before = wrapper(x, adapter_names=names)
        change(wrapper)
        after = wrapper(x, adapter_names=names)
        expected = reference_rows(wrapper, x, names)
    assert not torch.allclose(before, expected, atol=1e-4)  # the change matters
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)


def test_stack_made_in_inference_mode_serves_later_calls():
    """A stack built under inference_mode is refreshed in place on reuse, which
    torch forbids outside inference mode: such a call gets its own stack."""
    wrapper = wrapped("lora")
    names = ["third", "default"]
    x = torch.randn(2, 24)
    with torch.inference_mode():
        wrapper(x, adapter_names=names)
    with torch.no_grad():
        wrapper.model.up.lora_A["third"].weight.data.mul_(-1.0)
        torch.testing.assert_close(wrapper(x, adapter_names=names),
                                   reference_rows(wrapper, x, names), atol=1e-5, rtol=1e-5)


def test_compiled_model_matches_eager_and_sees_factor_updates():
    """torch.compile of a wrapped model with adapter_names: the factor stack and
    row indices are prepared outside the graph, so new names and updated
    factors are honoured exactly as in eager mode."""
    wrapper = wrapped("lora")
    compiled = torch.compile(wrapper)
    x = torch.randn(5, 24)
    with torch.no_grad():
        for names in (["default", "second", "__base__", "third", "default"],
                      ["third", "third", "second", "__base__", "default"]):
            torch.testing.assert_close(compiled(x, adapter_names=names),
                                       reference_rows(wrapper, x, names), atol=1e-5, rtol=1e-5)
        for name, parameter in wrapper.named_parameters():
            if "lora_B" in name:
                parameter.mul_(-2.0)
        torch.testing.assert_close(compiled(x, adapter_names=names),
                                   reference_rows(wrapper, x, names), atol=1e-5, rtol=1e-5)


def test_bad_adapter_names_are_rejected():
    wrapper = wrapped("lora")
    x = torch.randn(3, 24)
    with pytest.raises(KeyError, match="no adapter named"):
        wrapper(x, adapter_names=["default", "missing", "default"])
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3"):
        wrapper(x, adapter_names=["default", "third"])
    # The layers are back to normal after a failure.
    wrapper.set_adapter("default")
    assert all(layer.row_adapter_names is None for _, layer in wrapper.adapter_layers())


def test_unsupported_layers_are_named():
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Flatten(), nn.Linear(8, 2))
    wrapper = lowrank_ext.LoRAModule(model, r=2, target_modules=["0", "2"])
    with pytest.raises(NotImplementedError, match="LoRAConv"):
        wrapper(torch.randn(2, 4, 4), adapter_names=["default", "__base__"])


def adalora_wrapped(quantized):
    """Two AdaLoRA adapters of different ranks: "default" with every layer at
    init_r=6, one layer masked to 3 triplets (not shrunk) and the other shrunk
    to 2; "second" built from a rank pattern (4 of 5 triplets kept)."""
    torch.manual_seed(0)
    model = TinyModel()
    if quantized:
        model.up = lowrank_ext.nn.NF4Linear.from_linear(model.up, 64, False, None)
    options = dict(target_modules=["up", "down"], total_step=10, init_lora_weights=False)
    wrapper = lowrank_ext.AdaLoRAModule(model, init_r=6, target_r=2, lora_alpha=8, **options)
    wrapper.add_adapter("second", init_r=5, target_r=2, lora_alpha=4,
                        rank_pattern={"up.lora_E": [True, False, True, True, True],
                                      "down.lora_E": [True, True, False, True, True]},
                        **options)
    up, down = wrapper.model.up, wrapper.model.down
    up.set_kept("default", torch.tensor([True, False, True, False, True, False]))
    down.set_kept("default", torch.tensor([False, True, False, False, True, False]))
    down.shrink("default")
    with torch.no_grad():  # a trained lambda, so every adapter changes the output
        for name, parameter in wrapper.named_parameters():
            if "lora_E" in name:
                parameter.add_(0.5)
    for layer in (up, down):
        layer.zero_masked("default")
    return wrapper.eval()


@pytest.mark.parametrize("quantized", [False, True])
def test_adalora_rows_of_different_ranks_match_each_adapter_alone(quantized):
    wrapper = adalora_wrapped(quantized)
    assert wrapper.model.down.rank("default") == 2 and wrapper.model.up.active_rank("default") == 3
    names = ["second", "__base__", "default", "second", "default"]
    x = torch.randn(len(names), 24)
    with torch.no_grad():
        mixed = wrapper(x, adapter_names=names)
        expected = reference_rows(wrapper, x, names)
        with wrapper.disable_adapter():
            base = wrapper(x)
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[[0, 2]], base[[0, 2]], atol=1e-3)  # the adapters matter


def test_adalora_refuses_mixed_batches_in_training():
    wrapper = adalora_wrapped(False).train()
    with pytest.raises(ValueError, match="adapter_names.*training"):
        wrapper(torch.randn(2, 24), adapter_names=["default", "second"])
    with pytest.raises(ValueError, match="adapter_names.*training"):
        with wrapper.row_adapters(["default", "second"]):
            pass

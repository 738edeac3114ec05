"""PEFT as a front end: ``get_peft_model(model, use_fused_kernels(LoraConfig(...)))``.

The reference is always PEFT itself: the same model and adapter values
through PEFT's own layers (for NF4 bases, PEFT on a dense model holding the
dequantized weights). Tolerances: float32 1e-5 (the fused op sums in another
order); NF4 1e-4 (the 4-bit kernel dequantizes on the fly, in another order
than a dense float32 matmul); bfloat16 models are compared with float32
instead, the fused layers' error being at most twice PEFT's own (the fused
op computes the low-rank term in bfloat16 at more than 16 rows, PEFT in the
factors' float32).
"""

import copy
import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lowrank_ext  # noqa: E402
from lowrank_ext import ops  # noqa: E402
from lowrank_ext.nn import NF4Linear, QLoRALinear  # noqa: E402
from lowrank_ext.peft_integration import (  # noqa: E402
    DenseLinear,
    FusedLoraLinear,
    FusedLoraNF4Linear,
)

FP32 = dict(rtol=1e-5, atol=1e-5)
NF4 = dict(rtol=1e-4, atol=1e-4)
# bfloat16: relative norm error against float32 at most twice PEFT's own (or 1e-2).
BF16_FACTOR, BF16_FLOOR = 2.0, 1e-2
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2
VOCAB = 128


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).to(dtype)


def quantized(model):
    """``model`` with every projection stored as an NF4Linear (the output head stays dense)."""
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, NF4Linear.from_linear(module))
    return model


def dequantized(model):
    """A copy of ``model`` whose NF4Linear layers are dense, holding the dequantized weights."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, NF4Linear):
            parent, child = name.rsplit(".", 1)
            setattr(dense.get_submodule(parent), child, module.to_dense())
    return dense


def lora_config(**overrides):
    # init_lora_weights=False: both factors random, so the adapters are not a no-op.
    options = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PROJECTIONS,
                   init_lora_weights=False)
    return peft.LoraConfig(**dict(options, **overrides))


def fused_config(**overrides):
    return lowrank_ext.use_fused_kernels(lora_config(**overrides))


def same_adapters(reference, fused):
    """Copy every adapter value of ``reference`` into ``fused`` (same PEFT keys)."""
    state = {key: value for key, value in reference.state_dict().items() if "lora_" in key}
    missing = [key for key in state if key not in fused.state_dict()]
    assert not missing
    fused.load_state_dict(state, strict=False)


def pair(model, dense_model=None, **overrides):
    """(PEFT's model, the fused one) holding the same adapter values."""
    reference = peft.get_peft_model(dense_model if dense_model is not None
                                    else copy.deepcopy(model), lora_config(**overrides))
    fused = peft.get_peft_model(model, fused_config(**overrides))
    same_adapters(reference, fused)
    return reference, fused


def token_ids(rows=2, length=12):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))


def counting(monkeypatch, op_name):
    """Record each call of ``lowrank_ext.ops.<op_name>`` (the fused layers call it through ops)."""
    calls = []
    original = getattr(ops, op_name)

    def wrapper(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(ops, op_name, wrapper)
    return calls


def adapter_grads(model):
    return {name: parameter.grad for name, parameter in model.named_parameters()
            if parameter.requires_grad}


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def test_dense_bases_get_fused_layers_with_peft_outputs_and_gradients(monkeypatch):
    reference, fused = pair(tiny_llama())
    layers = [m for m in fused.modules() if isinstance(m, FusedLoraLinear)]
    assert len(layers) == LAYERS * len(PROJECTIONS)
    assert not any(isinstance(m, FusedLoraLinear) for m in reference.modules())
    calls = counting(monkeypatch, "lora_linear")
    ids = token_ids()
    fused_out = fused(input_ids=ids, labels=ids)
    assert len(calls) == len(layers)
    reference_out = reference(input_ids=ids, labels=ids)
    torch.testing.assert_close(fused_out.logits, reference_out.logits, **FP32)
    fused_out.loss.backward()
    reference_out.loss.backward()
    fused_grads, reference_grads = adapter_grads(fused), adapter_grads(reference)
    assert fused_grads.keys() == reference_grads.keys() and len(fused_grads) == 2 * len(layers)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, **FP32, msg=name)


@pytest.mark.parametrize("length", [6, 12], ids=["few-rows", "many-rows"])
def test_bfloat16_model_is_as_accurate_as_peft(length):
    # get_peft_model keeps the factors in float32 (autocast_adapter_dtype);
    # 2 x 6 rows take the op's float32 low-rank path, 2 x 12 its bfloat16 one.
    # bfloat16 results differ from PEFT's by rounding in either path, so both
    # are measured against float32 (the same values in a float32 model).
    reference, fused = pair(tiny_llama(torch.bfloat16))
    assert fused.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype \
        == torch.float32
    exact = peft.get_peft_model(tiny_llama(torch.bfloat16).float(), lora_config())
    same_adapters(reference, exact)
    ids = token_ids(length=length)
    results = {}
    for name, model in (("fused", fused), ("peft", reference), ("exact", exact)):
        output = model(input_ids=ids, labels=ids)
        output.loss.backward()
        results[name] = [output.logits] + list(adapter_grads(model).values())
    assert results["fused"][0].dtype == torch.bfloat16
    errors = {name: [relative_error(value, truth)
                     for value, truth in zip(results[name], results["exact"])]
              for name in ("fused", "peft")}
    assert errors["fused"][0] <= max(BF16_FACTOR * errors["peft"][0], BF16_FLOOR)
    assert max(errors["fused"][1:]) <= max(BF16_FACTOR * max(errors["peft"][1:]), BF16_FLOOR)


def test_nf4_bases_match_peft_on_the_dequantized_weights(monkeypatch):
    model = quantized(tiny_llama())
    reference, fused = pair(model, dense_model=dequantized(model))
    layers = [m for m in fused.modules() if isinstance(m, FusedLoraNF4Linear)]
    assert len(layers) == LAYERS * len(PROJECTIONS)
    assert all(isinstance(layer.get_base_layer(), NF4Linear) for layer in layers)
    calls = counting(monkeypatch, "qlora_linear")
    ids = token_ids()
    fused_out = fused(input_ids=ids, labels=ids)
    assert len(calls) == len(layers)
    reference_out = reference(input_ids=ids, labels=ids)
    torch.testing.assert_close(fused_out.logits, reference_out.logits, **NF4)
    fused_out.loss.backward()
    reference_out.loss.backward()
    fused_grads = adapter_grads(fused)
    for name, grad in adapter_grads(reference).items():
        torch.testing.assert_close(fused_grads[name], grad, **NF4, msg=name)


def test_dropout_draws_lowrank_ext_mask_in_training_and_none_in_eval():
    base = nn.Sequential(nn.Linear(32, 24))
    reference, fused = pair(base, target_modules=["0"], lora_dropout=0.5)
    layer = fused.base_model.model[0]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    trained = fused(x)
    torch.manual_seed(3)
    dropped = ops.dropout(x, 0.5)
    factor_A, factor_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + layer.scaling["default"] * dropped @ factor_A.T @ factor_B.T
    torch.testing.assert_close(trained, expected, **FP32)
    fused.eval()
    reference.eval()
    assert not torch.allclose(fused(x), trained)
    torch.testing.assert_close(fused(x), reference(x), **FP32)


def _two_active(model):
    model.add_adapter("other", lora_config())
    model.base_model.set_adapter(["default", "other"])


def _merged(model):
    model.merge_adapter()


FALLBACKS = {
    "two active adapters": (_two_active, {}, {}),
    "merged": (_merged, {}, {}),
    "mixed-adapter batch": (None, {"adapter_names": ["default", "__base__"]}, {}),
    "dora": (None, {}, {"use_dora": True}),
    "lora_bias": (None, {}, {"lora_bias": True}),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_other_cases_run_peft_forward(monkeypatch, case):
    prepare, call_options, config_options = FALLBACKS[case]
    reference = peft.get_peft_model(tiny_llama(), lora_config(**config_options))
    fused = peft.get_peft_model(tiny_llama(), fused_config(**config_options))
    if prepare is not None:
        torch.manual_seed(4)
        prepare(reference)
        torch.manual_seed(4)
        prepare(fused)
    # The same values everywhere (a merge already folded them into the base weights).
    if case != "merged":
        same_adapters(reference, fused)
    # PEFT takes adapter_names in eval mode only.
    reference.eval()
    fused.eval()
    calls = counting(monkeypatch, "lora_linear")
    ids = token_ids()
    fused_logits = fused(input_ids=ids, **call_options).logits
    assert calls == []
    torch.testing.assert_close(fused_logits, reference(input_ids=ids, **call_options).logits,
                               **FP32)


def test_disabled_adapters_and_autocast_run_peft_forward(monkeypatch):
    reference, fused = pair(tiny_llama())
    calls = counting(monkeypatch, "lora_linear")
    ids = token_ids()
    with fused.disable_adapter(), reference.disable_adapter():
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   **FP32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_logits, reference_logits = fused(input_ids=ids).logits, reference(input_ids=ids).logits
    assert calls == []
    torch.testing.assert_close(fused_logits, reference_logits, **FP32)


def test_quantized_linear_subclasses_keep_peft_layers():
    bnb = pytest.importorskip("bitsandbytes")
    dense = nn.Linear(64, 32)
    quantized_layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4")
    quantized_layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False,
                                               quant_type="nf4")._quantize("cpu")
    assert isinstance(dense, DenseLinear) and not isinstance(quantized_layer, DenseLinear)
    model = nn.Sequential(dense, nn.ReLU(), quantized_layer)
    plain = peft.get_peft_model(copy.deepcopy(model), lora_config(target_modules=["0", "2"]))
    fused = peft.get_peft_model(model, fused_config(target_modules=["0", "2"]))
    assert type(fused.base_model.model[0]) is FusedLoraLinear
    # Whichever layer PEFT itself picks for the 4-bit one (its bitsandbytes
    # layer where bitsandbytes' 4-bit backend is available).
    assert type(fused.base_model.model[2]) is type(plain.base_model.model[2])


def test_nf4_merge_requantizes_and_unmerge_restores_the_codes_exactly():
    model = quantized(tiny_llama())
    fused = peft.get_peft_model(model, fused_config())
    layer = fused.base_model.model.model.layers[0].mlp.down_proj
    codes, scales = layer.base_layer.weight.clone(), layer.base_layer.weight_absmax.clone()
    ids = token_ids()
    with torch.no_grad():
        adapted = fused(input_ids=ids).logits
        with fused.disable_adapter():
            plain = fused(input_ids=ids).logits
        fused.merge_adapter()
        assert not torch.equal(layer.base_layer.weight, codes)
        merged = fused(input_ids=ids).logits
        # 4-bit rounding of the merged weight, small beside what the adapters add.
        assert (merged - adapted).norm() < 0.5 * (adapted - plain).norm()
        fused.unmerge_adapter()
        assert torch.equal(layer.base_layer.weight, codes)
        assert torch.equal(layer.base_layer.weight_absmax, scales)
        torch.testing.assert_close(fused(input_ids=ids).logits, adapted, rtol=0, atol=0)
        unloaded = fused.merge_and_unload()
        assert not any(isinstance(m, FusedLoraNF4Linear) for m in unloaded.modules())
        assert isinstance(unloaded.model.layers[0].mlp.down_proj, NF4Linear)
        torch.testing.assert_close(unloaded(input_ids=ids).logits, merged, **FP32)


@pytest.mark.parametrize("options", [{"use_dora": True}, {"lora_bias": True},
                                     {"init_lora_weights": "pissa"}],
                         ids=["dora", "lora_bias", "pissa"])
def test_nf4_bases_refuse_options_that_need_the_dense_weight(options):
    model = quantized(tiny_llama())
    with pytest.raises(ValueError, match="NF4Linear bases|dense base weight"):
        peft.get_peft_model(model, fused_config(**options))


def test_use_fused_kernels_refuses_adalora():
    with pytest.raises(TypeError, match="LoraConfig"):
        lowrank_ext.use_fused_kernels(peft.AdaLoraConfig(total_step=10, target_modules=["q_proj"]))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_saved_adapter_loads_in_peft_in_lowrank_ext_and_back_into_fused_layers(tmp_path):
    fused = peft.get_peft_model(tiny_llama(), fused_config())
    fused.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "adapter_config.json")) as handle:
        saved = json.load(handle)
    assert "_custom_modules" not in saved and saved["r"] == 4
    ids = token_ids()
    expected = _logits(fused, ids)

    plain = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(isinstance(m, FusedLoraLinear) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, ids), expected, **FP32)

    ours = lowrank_ext.load_adapter(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(_logits(ours, ids), expected, **FP32)

    config = lowrank_ext.use_fused_kernels(peft.LoraConfig.from_pretrained(tmp_path))
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config)
    assert sum(isinstance(m, FusedLoraLinear) for m in back.modules()) == LAYERS * len(PROJECTIONS)
    torch.testing.assert_close(_logits(back, ids), expected, **FP32)


def test_nf4_adapter_loads_in_qlora_wrapper_in_peft_and_in_fused_layers(tmp_path):
    fused = peft.get_peft_model(quantized(tiny_llama()), fused_config())
    fused.save_pretrained(tmp_path)
    ids = token_ids()
    expected = _logits(fused, ids)

    ours = lowrank_ext.load_adapter(quantized(tiny_llama()), str(tmp_path))
    assert sum(isinstance(m, QLoRALinear) for m in ours.modules()) == LAYERS * len(PROJECTIONS)
    torch.testing.assert_close(_logits(ours, ids), expected, **FP32)

    config = lowrank_ext.use_fused_kernels(peft.LoraConfig.from_pretrained(tmp_path))
    back = peft.PeftModel.from_pretrained(quantized(tiny_llama()), tmp_path, config=config)
    assert sum(isinstance(m, FusedLoraNF4Linear) for m in back.modules()) == \
        LAYERS * len(PROJECTIONS)
    torch.testing.assert_close(_logits(back, ids), expected, **FP32)

    plain = peft.PeftModel.from_pretrained(dequantized(quantized(tiny_llama())), tmp_path)
    torch.testing.assert_close(_logits(plain, ids), expected, **NF4)


def test_all_linear_covers_nf4_layers_when_given_the_model():
    model = quantized(tiny_llama())
    config = lowrank_ext.use_fused_kernels(lora_config(target_modules="all-linear"), model)
    assert config.target_modules == set(PROJECTIONS)
    fused = peft.get_peft_model(model, config)
    assert sum(isinstance(m, FusedLoraNF4Linear) for m in fused.modules()) == \
        LAYERS * len(PROJECTIONS)
    # The output head stays dense and unadapted, as PEFT's all-linear leaves it.
    assert type(fused.base_model.model.lm_head) is nn.Linear
    # A dense model keeps PEFT's own expansion.
    dense_config = lowrank_ext.use_fused_kernels(lora_config(target_modules="all-linear"),
                                                 tiny_llama())
    assert dense_config.target_modules == "all-linear"

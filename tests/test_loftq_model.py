"""LoftQ through the user-facing API: QLoRAConfig / QLoRAModule(init_lora_weights="loftq")
and QLoRALinear.from_linear(init="loftq").

Models are tiny random Hugging Face models (fp32). Tolerances: LoftQ's own
numerics are tested in test_loftq.py; here the wiring must reproduce
:func:`loftq_init` on each layer bit for bit (``torch.equal``), and a model
reloaded from what was saved must give the same logits up to fp32 summation
order (``atol = rtol = 1e-5``; in practice they are equal).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from lowrank_ext import LoRAConfig, LoRAModule, QLoRAConfig, QLoRAModule, AdaLoRAConfig
from lowrank_ext.loftq import LoftQConfig, loftq_init
from lowrank_ext.nn import LoRALinear, NF4Linear, QLoRALinear
from lowrank_ext.quant import NF4Weight

transformers = pytest.importorskip("transformers")

SAME = dict(atol=1e-5, rtol=1e-5)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=128)
    return transformers.LlamaForCausalLM(config).eval()


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128,
                                     n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def relative_error(model, reference):
    return ((logits(model) - reference).norm() / reference.norm()).item()


def codes(weight):
    """An NF4 weight's stored data (packed codes, block scales, nested scales)
    as one tensor; ``weight`` is an NF4Weight or a QLoRA layer."""
    if isinstance(weight, QLoRALinear):
        weight = weight.base_layer.quantized_weight()
    parts = [weight.packed.view(torch.uint8), weight.absmax.reshape(-1).view(torch.uint8)]
    if weight.nested_absmax is not None:
        parts.append(weight.nested_absmax.view(torch.uint8))
        parts.append(torch.tensor([weight.offset], dtype=torch.float64).view(torch.uint8))
    return torch.cat([part.cpu() for part in parts])


def dense_weights(model):
    return {name: module.weight.detach().clone() for name, module in model.named_modules()
            if isinstance(module, nn.Linear)}


# ------------------------------------------------------------------ QLoRAModule


def test_loftq_model_starts_closer_to_the_dense_model():
    reference = logits(llama())
    options = dict(r=8, lora_alpha=16, target_modules="all-linear")
    plain = QLoRAModule(llama(), **options)
    loftq = QLoRAModule(llama(), init_lora_weights="loftq", **options)
    # Measured: plain 0.110, LoftQ 0.085 relative logit error (ratio 0.77) on
    # this full-rank random model; assert a safe ratio.
    plain_error, loftq_error = relative_error(plain, reference), relative_error(loftq, reference)
    assert loftq_error < 0.9 * plain_error, (plain_error, loftq_error)
    plain_layers = dict(plain.adapter_layers())
    for path, layer in loftq.adapter_layers():
        assert layer.lora_A["default"].weight.abs().sum() > 0
        assert layer.lora_B["default"].weight.abs().sum() > 0
        # loftq_iter=1: Q is plain NF4(W), bit for bit.
        assert torch.equal(codes(layer), codes(plain_layers[path]))
    assert loftq.peft_config["default"].loftq_config == LoftQConfig(4, 1)


def test_each_layer_is_loftq_init_of_its_dense_weight_with_its_rank_and_scaling():
    dense = dense_weights(llama())
    config = QLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True,
                         rank_pattern={"v_proj": 6}, alpha_pattern={"down_proj": 3.0},
                         init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=3),
                         double_quant=False, blocksize=32)
    model = QLoRAModule(llama(), config)
    layers = dict(model.adapter_layers())
    assert len(layers) == 3 * 2
    for path, layer in layers.items():
        r, alpha = config.rank_and_alpha(path)
        assert layer.r["default"] == r and layer.lora_alpha["default"] == alpha
        scaling = alpha / math.sqrt(r)
        quantized, lora_A, lora_B = loftq_init(dense[path], r, scaling=scaling, num_iter=3,
                                               blocksize=32, double_quant=False)
        assert torch.equal(codes(layer), codes(quantized))
        assert torch.equal(layer.lora_A["default"].weight, lora_A)
        assert torch.equal(layer.lora_B["default"].weight, lora_B)
    assert layers["model.layers.0.self_attn.v_proj"].r["default"] == 6


def test_more_iterations_change_the_base_and_reduce_the_weight_error():
    dense = dense_weights(llama())
    one = QLoRAModule(llama(), r=8, target_modules=TARGETS, init_lora_weights="loftq")
    five = QLoRAModule(llama(), r=8, target_modules=TARGETS, init_lora_weights="loftq",
                       loftq_config={"loftq_iter": 5})
    one_layers = dict(one.adapter_layers())
    changed = 0
    for path, layer in five.adapter_layers():
        changed += not torch.equal(codes(layer), codes(one_layers[path]))
        plain = NF4Weight.from_float(dense[path], 64, True).dequantize(torch.float32)
        error = (dense[path] - layer.base_layer.dequantize(torch.float32)
                 - layer.delta_weight("default")).norm()
        # LoftQ's point: well below plain QLoRA's ||W - NF4(W)|| (measured ratio ~0.8).
        assert error < 0.95 * (dense[path] - plain).norm()
    assert changed == len(one_layers)


def test_gpt2_conv1d_targets():
    reference = logits(gpt2())
    plain = QLoRAModule(gpt2(), r=8, target_modules=["c_attn", "c_fc"])
    loftq = QLoRAModule(gpt2(), r=8, target_modules=["c_attn", "c_fc"],
                        init_lora_weights="loftq")
    assert relative_error(loftq, reference) < relative_error(plain, reference)
    dense = {name: module.weight.detach().t() for name, module in gpt2().named_modules()
             if name.endswith("c_attn")}
    for path, layer in loftq.adapter_layers():
        if path in dense:
            _, lora_A, lora_B = loftq_init(dense[path].contiguous(), 8, scaling=1.0)
            assert torch.equal(layer.lora_A["default"].weight, lora_A)
            assert torch.equal(layer.lora_B["default"].weight, lora_B)


def test_dora_magnitude_is_taken_after_loftq():
    options = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="loftq")
    loftq = QLoRAModule(llama(), **options)
    qdora = QLoRAModule(llama(), use_dora=True, **options)
    for path, layer in qdora.adapter_layers():
        weight = layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default")
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(),
                                   weight.norm(dim=1), **SAME)
    # m = ||Q + s B A|| row by row: DoRA starts as the plain LoftQ layer.
    torch.testing.assert_close(logits(qdora), logits(loftq), **SAME)


def test_targets_kept_dense_take_the_default_init():
    # An embedding target is not quantized: nothing for LoftQ to absorb.
    model = QLoRAModule(llama(), r=4, target_modules=["q_proj", "embed_tokens"],
                        init_lora_weights="loftq")
    layers = dict(model.adapter_layers())
    assert layers["model.embed_tokens"].lora_embedding_A["default"].abs().sum() == 0
    assert layers["model.layers.0.self_attn.q_proj"].lora_B["default"].weight.abs().sum() > 0


# ------------------------------------------------------------------- refusals


def test_loftq_is_for_qlora_only():
    with pytest.raises(ValueError, match="QLoRAConfig"):
        LoRAConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="QLoRAConfig"):
        LoRAModule(llama(), target_modules=TARGETS, init_lora_weights="loftq")
    with pytest.raises(ValueError, match="init_lora_weights"):
        AdaLoRAConfig(init_lora_weights="loftq", total_step=10)
    with pytest.raises(ValueError, match="loftq"):
        LoRALinear(nn.Linear(8, 8), init="loftq")
    with pytest.raises(ValueError, match="from_linear"):
        QLoRALinear(NF4Linear.from_linear(nn.Linear(64, 64)), init="loftq")


@pytest.mark.parametrize("loftq_config, error, message", [
    ({"loftq_bits": 8}, ValueError, "loftq_bits"),
    ({"loftq_iter": 0}, ValueError, "loftq_iter"),
    ({"bits": 4}, ValueError, "unknown keys"),
    (4, TypeError, "loftq_config"),
])
def test_bad_loftq_config(loftq_config, error, message):
    with pytest.raises(error, match=message):
        QLoRAConfig(init_lora_weights="loftq", loftq_config=loftq_config)


def test_loftq_config_without_loftq_init_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        config = QLoRAConfig(loftq_config=LoftQConfig(loftq_iter=2))
    assert config.loftq_config is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert QLoRAConfig(loftq_config={}).loftq_config is None


def test_rank_too_large_names_the_layer():
    with pytest.raises(ValueError, match="q_proj.*r must be <="):
        QLoRAModule(llama(), r=65, target_modules=["q_proj"], init_lora_weights="loftq")


def test_prequantized_model_is_refused():
    model = llama()
    layer = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = NF4Linear.from_linear(layer)
    with pytest.raises(ValueError, match="already 4-bit.*unquantized model"):
        QLoRAModule(model, r=4, target_modules=["q_proj"], init_lora_weights="loftq")
    # The transaction left the model as it was: the other q_proj is still dense.
    assert type(model.model.layers[1].self_attn.q_proj) is nn.Linear


def test_second_loftq_adapter_on_a_shared_base_is_refused():
    model = QLoRAModule(llama(), r=4, target_modules=["q_proj"], init_lora_weights="loftq",
                        quantize_modules=None)
    before = {key: value.clone() for key, value in model.state_dict().items()
              if isinstance(value, torch.Tensor)}
    with pytest.raises(ValueError, match="already holds adapters"):
        model.add_adapter("second", r=4, target_modules=["q_proj"], init_lora_weights="loftq")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(after[key], value) for key, value in before.items())
    # A plain second adapter on the same layers is fine.
    model.add_adapter("plain", r=4, target_modules=["q_proj"], quantize_modules=None)
    # LoftQ on layers still dense (quantize_modules=None kept v_proj dense) works.
    model.add_adapter("third", r=4, target_modules=["v_proj"], init_lora_weights="loftq")
    assert isinstance(model.model.model.layers[0].self_attn.v_proj, QLoRALinear)


# ---------------------------------------------------------------- one layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_from_linear_loftq(kind):
    torch.manual_seed(3)
    linear = nn.Linear(96, 64)
    weight = linear.weight.detach()
    if kind == "conv1d":
        conv = transformers.pytorch_utils.Conv1D(64, 96)
        with torch.no_grad():
            conv.weight.copy_(weight.t())
            conv.bias.copy_(linear.bias)
        linear = conv
    layer = QLoRALinear.from_linear(linear, r=8, alpha=32, init="loftq",
                                    loftq_config={"loftq_iter": 2})
    quantized, lora_A, lora_B = loftq_init(weight, 8, scaling=4.0, num_iter=2)
    assert torch.equal(codes(layer), codes(quantized))
    assert torch.equal(layer.lora_A["default"].weight, lora_A)
    assert torch.equal(layer.lora_B["default"].weight, lora_B)
    plain = QLoRALinear.from_linear(linear, r=8, alpha=32)
    x = torch.randn(16, 96)
    with torch.no_grad():
        expected = linear(x)
        assert (layer(x) - expected).norm() < (plain(x) - expected).norm()


def test_from_linear_loftq_config_needs_loftq_init():
    with pytest.raises(ValueError, match="loftq_config"):
        QLoRALinear.from_linear(nn.Linear(64, 64), loftq_config={"loftq_iter": 2})
    with pytest.raises(ValueError, match="unquantized"):
        QLoRALinear.from_linear(NF4Linear.from_linear(nn.Linear(64, 64)), init="loftq")


# ---------------------------------------------------------------- PEFT configs


def test_peft_loftq_config_objects_are_read():
    peft = pytest.importorskip("peft")
    config = QLoRAConfig(init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_iter=2))
    assert config.loftq_config == LoftQConfig(4, 2)
    lora = peft.LoraConfig(init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_iter=3))
    config = QLoRAConfig(init_lora_weights=lora.init_lora_weights, loftq_config=lora.loftq_config)
    assert config.loftq_config == LoftQConfig(4, 3)


# ------------------------------------------------------------- save and load


def test_iter_1_adapter_alone_reloads_exactly(tmp_path):
    model = QLoRAModule(llama(), r=8, lora_alpha=16, target_modules=TARGETS,
                        init_lora_weights="loftq")
    expected = logits(model)
    model.save_adapter(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    # Saved as a plain adapter, as PEFT's LoftQ example does, so that loading
    # (here or in PEFT) does not run LoftQ again.
    assert saved["init_lora_weights"] is True
    # A plain QLoRA model of the same dense model has the same NF4 base.
    fresh = QLoRAModule(llama(), r=8, target_modules=TARGETS)
    fresh.load_adapter(str(tmp_path), "loaded")
    fresh.set_adapter("loaded")
    torch.testing.assert_close(logits(fresh), expected, atol=0, rtol=0)


def test_peft_written_loftq_adapter_loads_as_plain_with_a_warning(tmp_path):
    model = QLoRAModule(llama(), r=8, target_modules=TARGETS, init_lora_weights="loftq")
    expected = logits(model)
    model.save_adapter(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    values = json.loads(path.read_text())
    values.update(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    path.write_text(json.dumps(values))
    fresh = QLoRAModule(llama(), r=8, target_modules=TARGETS)
    with pytest.warns(UserWarning, match="LoftQ-quantized base"):
        fresh.load_adapter(str(tmp_path), "loaded")
    assert fresh.peft_config["loaded"].init_lora_weights is True
    fresh.set_adapter("loaded")
    torch.testing.assert_close(logits(fresh), expected, atol=0, rtol=0)


def test_iter_above_1_needs_the_base_saved_too():
    options = dict(r=8, lora_alpha=16, target_modules=TARGETS)
    model = QLoRAModule(llama(), init_lora_weights="loftq", loftq_config={"loftq_iter": 3},
                        **options)
    expected = logits(model)
    state = model.state_dict()
    # The adapter alone on a plain NF4 base is not the LoftQ model...
    fresh = QLoRAModule(llama(), **options)
    fresh.load_state_dict({key: value for key, value in state.items() if "lora_" in key},
                          strict=False)
    assert not torch.allclose(logits(fresh), expected, **SAME)
    # ...the whole wrapped model's state dict (4-bit base included) is.
    fresh = QLoRAModule(llama(), **options)
    fresh.load_state_dict(state)
    torch.testing.assert_close(logits(fresh), expected, atol=0, rtol=0)

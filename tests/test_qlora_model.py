"""QLoRAModule on whole models: unloading, export, what is (not) quantized.

Models are tiny random Hugging Face models built from configs, in fp32.
Tolerances: a dense merge differs from the unmerged adapted model only in
fp32 summation order (``atol = rtol = 1e-4`` on logits of magnitude ~1); a
4-bit requantized merge adds NF4 rounding of the merged weights, bounded
below by its own measured error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_ext import LoRAModule, QLoRAModule, load_adapter
from lowrank_ext.nn import NF4Linear, QLoRALinear

transformers = pytest.importorskip("transformers")

DENSE = dict(atol=1e-4, rtol=1e-4)


def llama(**overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=128, **overrides)
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def randomize(model, std=0.1):
    """Non-zero adapter factors, so outputs depend on them."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def adapted_llama(**options):
    model = QLoRAModule(llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        **options)
    randomize(model)
    return model


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


# ----------------------------------------------------------- merge_and_unload


@pytest.mark.parametrize("earlier", [None, "keep_merged_weight", "requantized"])
def test_merge_and_unload_returns_the_dense_merged_model(earlier):
    model = adapted_llama()
    expected = logits(model)
    with model.disable_adapter():
        base = logits(model)
    assert (expected - base).abs().max() > 0.1  # the adapter matters
    if earlier == "keep_merged_weight":
        model.merge(keep_merged_weight=True)
        model.unmerge()
    elif earlier == "requantized":
        model.merge()  # stays merged: the unload must still start from the original base
    options = {"keep_merged_weight": True} if earlier is None else {}
    plain = model.merge_and_unload(**options)
    assert not any(isinstance(m, (NF4Linear, QLoRALinear)) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(plain.model.layers[0].mlp.up_proj) is nn.Linear  # quantized, not adapted
    torch.testing.assert_close(logits(plain), expected, **DENSE)


def test_merge_and_unload_can_stay_4bit():
    model = adapted_llama()
    expected = logits(model)
    with model.disable_adapter():
        base = logits(model)
    report = model.merge()
    merged_4bit = logits(model)
    model.unmerge()
    plain = model.merge_and_unload(keep_merged_weight=False)
    assert isinstance(plain.model.layers[0].self_attn.q_proj, NF4Linear)
    assert max(error for layer in report.values() for error in layer.values()) > 0
    # Same requantization as merge(): equal outputs, which carry the adapter
    # (much closer to the adapted model than to the base).
    torch.testing.assert_close(logits(plain), merged_4bit, atol=0, rtol=0)
    assert (merged_4bit - expected).abs().max() < 0.5 * (expected - base).abs().max()


def test_merge_and_unload_keeps_gpt2_conv1d_layout():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128,
                                     n_positions=16)
    model = QLoRAModule(transformers.GPT2LMHeadModel(config).eval(), r=4,
                        target_modules=["c_attn"])
    randomize(model)
    expected = logits(model)
    plain = model.merge_and_unload()
    block = plain.transformer.h[0]
    assert type(block.attn.c_attn).__name__ == "Conv1D"
    assert type(block.mlp.c_fc).__name__ == "Conv1D"
    torch.testing.assert_close(logits(plain), expected, **DENSE)


def test_merge_and_unload_safe_merge_refuses_without_changing_the_model():
    model = adapted_llama()
    layer = model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="layers.1.self_attn.v_proj.*non-finite"):
        model.merge_and_unload(safe_merge=True)
    assert model.model.model.layers[1].self_attn.v_proj is layer
    assert isinstance(model.model.model.layers[0].self_attn.q_proj, QLoRALinear)


# --------------------------------------------------------- modules_to_save


def bert_classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=48, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def llama_classifier():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=128, num_labels=3,
                                      pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("build, targets, head", [
    (bert_classifier, ["query", "value"], "classifier"),
    (llama_classifier, ["q_proj", "v_proj"], "score")])
def test_modules_to_save_stay_dense_train_and_load_elsewhere(tmp_path, build, targets, head):
    peft = pytest.importorskip("peft")
    model = QLoRAModule(build(), r=4, target_modules=targets, modules_to_save=[head])
    wrapper = getattr(model.model, head)
    copy = wrapper.modules_to_save["default"]
    assert type(wrapper.original_module) is nn.Linear and type(copy) is nn.Linear
    assert copy.weight.requires_grad
    ids = IDS.clamp(min=1)  # no padding token (0): Llama pools the last non-pad position
    before = copy.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # the first step moves only B, the head and nothing else of the adapter
        model(ids, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(copy.weight, before)

    model.save_adapter(str(tmp_path))
    saved = model.adapter_state_dict()
    # The head's own tensors (Llama's score has no bias), no 4-bit codes.
    assert {key for key in saved if f".{head}." in key} == {
        f"base_model.model.{head}.{name}" for name, _ in copy.named_parameters()}
    ours = load_adapter(build(), str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(build(), str(tmp_path))
    with torch.no_grad():
        expected = theirs(ids).logits
        # Same adapter and head on the same dense model: summation order only.
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(getattr(theirs.base_model.model, head)
                                   .modules_to_save["default"].weight, copy.weight)


def test_modules_to_save_already_quantized_is_refused():
    model = QLoRAModule(bert_classifier(), r=4, target_modules=["query"])
    assert isinstance(model.model.classifier, NF4Linear)
    with pytest.raises(ValueError, match=r"\['classifier'\] are already 4-bit"):
        model.add_adapter("second", target_modules=["value"], modules_to_save=["classifier"])
    assert list(model.peft_config) == ["default"]
    assert isinstance(model.model.classifier, NF4Linear)


# ------------------------------------------------------ nn.MultiheadAttention


def encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
                         nn.Linear(32, 5)).eval()


def test_attention_out_proj_stays_dense_and_the_encoder_trains():
    # MHA passes out_proj.weight to F.multi_head_attention_forward itself:
    # 4-bit codes there made every forward fail.
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = encoder()(x)
    with pytest.warns(UserWarning, match=r"0\.self_attn\.out_proj"):
        model = QLoRAModule(encoder(), r=4, target_modules="all-linear")
    layer = model.model[0]
    assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(layer.linear1, QLoRALinear) and isinstance(model.model[1], QLoRALinear)
    with torch.no_grad():
        out = model(x)
    # No-op adapters: only the NF4 rounding of linear1, linear2 and the head
    # (about 10% per weight for 4-bit codes) separates it from the dense model.
    assert 0 < (out - dense).norm() < 0.15 * dense.norm()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("wrapper", [LoRAModule, QLoRAModule])
def test_encoder_inference_runs_through_the_adapter_layers(wrapper):
    # In eval mode nn.TransformerEncoderLayer (and nn.TransformerEncoder, with
    # a padding mask) take a fused kernel that reads linear1/linear2.weight
    # itself: adapters there were skipped silently, 4-bit codes crashed it.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = wrapper(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True), r=4,
                    target_modules=["linear1", "linear2"], init_lora_weights=False)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    model.train()  # dropout is 0: training mode differs only by taking no shortcut
    expected = model(x, src_key_padding_mask=padding)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x, src_key_padding_mask=padding)
        out = model(x, src_key_padding_mask=padding)
    assert (expected - base).abs().max() > 0.1
    # Rows of padded positions are not compared (the fused path zeroes them).
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :4], expected[1, :4], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_model_exports_to_a_plain_from_pretrained(tmp_path, kind):
    if kind == "llama":
        model = adapted_llama()
    else:
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128,
                                         n_positions=16)
        model = QLoRAModule(transformers.GPT2LMHeadModel(config).eval(), r=4,
                            target_modules=["c_attn", "c_proj"])
        randomize(model)
    expected = logits(model)
    model.merge_and_unload().save_pretrained(str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert not any(isinstance(m, NF4Linear) for m in reloaded.modules())
    # The reload holds the dense merged weights: as close as the merge itself.
    torch.testing.assert_close(logits(reloaded), expected, **DENSE)


# -------------------------------------------------- models loaded by bitsandbytes


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    llama().save_pretrained(str(directory))
    return str(directory)


def bnb_llama(directory, quant_type="nf4"):
    pytest.importorskip("bitsandbytes")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=config).eval()


QUANT_TENSORS = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                 "weight.nested_quant_map")


def test_bnb_4bit_model_is_taken_over_and_its_adapter_loads_in_peft(tmp_path, llama_dir):
    peft = pytest.importorskip("peft")
    model = bnb_llama(llama_dir)
    q_proj = model.model.layers[0].self_attn.q_proj
    stored = {key: value.clone() for key, value in q_proj.state_dict().items()}
    with torch.no_grad():
        base = model(IDS).logits  # a CPU eval forward may repack bitsandbytes' codes
    wrapped = QLoRAModule(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    taken = wrapped.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(taken, NF4Linear)
    assert isinstance(wrapped.model.model.layers[0].mlp.up_proj, NF4Linear)
    mine = taken.quantized_weight().state_dict("weight")
    for key in QUANT_TENSORS:  # no requantization: bitsandbytes' own codes and scales
        assert torch.equal(mine[key].reshape(-1), stored[key].reshape(-1)), key
    with torch.no_grad():
        # Zero B: the base model's output, now computed by our kernels (fp32,
        # summation order only).
        torch.testing.assert_close(logits(wrapped), base, atol=1e-4, rtol=1e-4)
    wrapped.train()
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=1.0)
    for _ in range(2):
        wrapped(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    wrapped.eval()
    expected = logits(wrapped)
    assert (expected - base).abs().max() > 1e-3  # trained
    wrapped.save_adapter(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(bnb_llama(llama_dir), str(tmp_path))
    # bitsandbytes' CPU 4-bit matmul against ours on the same codes, fp32.
    torch.testing.assert_close(logits(theirs), expected, atol=1e-4, rtol=1e-4)
    # LoRAModule (here through load_adapter) puts QLoRA layers on those codes too.
    ours = load_adapter(bnb_llama(llama_dir), str(tmp_path))
    assert isinstance(ours.model.model.layers[0].self_attn.q_proj, QLoRALinear)
    torch.testing.assert_close(logits(ours), expected, atol=1e-4, rtol=1e-4)


def test_bnb_4bit_model_exports_dense(tmp_path, llama_dir):
    model = QLoRAModule(bnb_llama(llama_dir), r=4, target_modules=["q_proj", "v_proj"])
    randomize(model)
    expected = logits(model)
    model.merge_and_unload().save_pretrained(str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(reloaded.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(reloaded), expected, **DENSE)


@pytest.mark.parametrize("wrapper", [LoRAModule, QLoRAModule])
def test_bnb_fp4_model_is_refused_clearly(llama_dir, wrapper):
    model = bnb_llama(llama_dir, quant_type="fp4")
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="quant_type='fp4'.*bnb_4bit_quant_type='nf4'"):
        wrapper(model, r=4, target_modules=["q_proj"])
    assert model.model.layers[0].self_attn.q_proj is layer

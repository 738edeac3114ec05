"""Teach a tiny byte-level language model a new style with LoRA.

1. Build a small causal transformer over bytes (256 symbols) and pre-train it
   briefly on docstrings of Python's standard library (the same text
   ``lowrank-ext finetune`` classifies).
2. The new style is the same prose in UPPER CASE. Measure the pretrained
   model's loss on held-out upper-case text, then train LoRA adapters on its
   attention and MLP projections with ``lowrank_ext.LoRAModule``, the base
   frozen.
3. Show that the upper-case loss drops and print a sample generated from a
   prompt with the adapter on and off.

Run ``python examples/text_generation.py`` (about a minute on two cores) or
with ``--quick`` for a smoke test.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as functional
from torch import nn

import lowrank_ext
from lowrank_ext.finetune.data import stdlib_docstring_splits

CONTEXT = 64


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, with named projections LoRA can target."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        normed = self.norm1(hidden)

        def split(tensor):  # [batch, length, width] -> [batch, heads, length, head width]
            return tensor.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        attended = functional.scaled_dot_product_attention(
            split(self.query(normed)), split(self.key(normed)), split(self.value(normed)),
            is_causal=True)
        hidden = hidden + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return hidden + self.down(functional.gelu(self.up(self.norm2(hidden))))


class ByteLM(nn.Module):
    """A byte-level causal transformer: ids ``[batch, length]`` -> logits ``[batch, length, 256]``."""

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(256, width)
        self.position = nn.Embedding(CONTEXT, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, 256)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.embedding(ids) + self.position(positions)
        for block in self.blocks:
            hidden = block(hidden)
        return self.lm_head(self.norm(hidden))


def byte_stream(texts) -> torch.Tensor:
    """All texts as one uint8-valued long tensor, separated by blank lines."""
    joined = "\n\n".join(texts).encode("utf-8", errors="replace")
    return torch.tensor(list(joined), dtype=torch.long)


def windows(stream: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``CONTEXT + 1`` bytes."""
    starts = torch.randint(0, len(stream) - CONTEXT - 1, (count,), generator=generator)
    return torch.stack([stream[start:start + CONTEXT + 1] for start in starts.tolist()])


def language_model_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats per byte)."""
    logits = model(batch[:, :-1])
    return functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))


def train(model: nn.Module, stream: torch.Tensor, steps: int, learning_rate: float,
          seed: int) -> None:
    """AdamW on random windows of ``stream`` for the parameters that require grad."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        loss = language_model_loss(model, windows(stream, 32, generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model: nn.Module, stream: torch.Tensor, seed: int) -> float:
    """Loss on 64 fixed windows of ``stream``."""
    model.eval()
    return language_model_loss(model, windows(stream, 64, torch.Generator().manual_seed(seed))).item()


@torch.no_grad()
def generate(model: nn.Module, prompt: str, length: int) -> str:
    """Greedy continuation of ``prompt`` by ``length`` bytes."""
    model.eval()
    ids = list(prompt.encode("utf-8"))
    for _ in range(length):
        logits = model(torch.tensor([ids[-CONTEXT:]]))
        ids.append(int(logits[0, -1].argmax()))
    return bytes(ids).decode("utf-8", errors="replace")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps (a smoke test)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    pretrain_steps, adapt_steps = (30, 20) if arguments.quick else (300, 120)
    # Tiny tensors: a second thread costs more in synchronisation than it saves.
    torch.set_num_threads(1)

    start = time.perf_counter()
    torch.manual_seed(arguments.seed)
    splits = stdlib_docstring_splits()
    train_text, held_out_text = byte_stream(splits.train.texts), byte_stream(splits.test.texts)
    upper_train = byte_stream(text.upper() for text in splits.train.texts)
    upper_held_out = byte_stream(text.upper() for text in splits.test.texts)

    model = ByteLM()
    train(model, train_text, pretrain_steps, 2e-3, arguments.seed)
    plain_loss = evaluate(model, held_out_text, arguments.seed)
    upper_before = evaluate(model, upper_held_out, arguments.seed)

    adapted = lowrank_ext.LoRAModule(
        model, r=arguments.rank, lora_alpha=2 * arguments.rank,
        target_modules=["query", "key", "value", "out", "up", "down", "lm_head"])
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in adapted.parameters() if not p.requires_grad)
    train(adapted, upper_train, adapt_steps, 2e-3, arguments.seed + 1)
    upper_after = evaluate(adapted, upper_held_out, arguments.seed)
    prompt = "RETURN THE "
    with_adapter = generate(adapted, prompt, 48)
    with adapted.disable_adapter():
        without_adapter = generate(adapted, prompt, 48)
        plain_after = evaluate(adapted, held_out_text, arguments.seed)

    print(f"pretrained on stdlib docstrings ({pretrain_steps} steps): held-out loss "
          f"{plain_loss:.3f} nats/byte ({plain_loss / math.log(2):.2f} bits)")
    print(f"upper-case text, before LoRA: {upper_before:.3f} nats/byte")
    print(f"LoRA r={arguments.rank} ({trainable:,} trainable, {frozen:,} frozen), "
          f"{adapt_steps} steps: upper-case loss {upper_after:.3f} nats/byte")
    print(f"adapter disabled: plain-text loss {plain_after:.3f} (base unchanged)")
    print(f"sample with adapter:    {with_adapter!r}")
    print(f"sample without adapter: {without_adapter!r}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return {"plain_loss": plain_loss, "plain_loss_adapter_disabled": plain_after,
            "upper_before": upper_before, "upper_after": upper_after,
            "trainable_parameters": trainable, "sample": with_adapter}


if __name__ == "__main__":
    main()

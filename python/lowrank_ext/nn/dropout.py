"""Dropout whose mask is hashed from a seed: :func:`lowrank_ext.ops.dropout` as a layer.

``torch.nn.Dropout`` on CPU draws every element's keep bit from the global
generator (``bernoulli_``), which costs about 5 ms for a 1056x384 fp32
activation on one core, ten times :func:`lowrank_ext.ops.dropout`: in the
fine-tuning job's MiniLM the model's own dropout layers took about 5% of a
training step. The hashed mask is also not stored for backward (it is
regenerated from the seed), so each dropout saves no mask tensor.

Same distribution, different draws: outputs and training runs are
statistically the same as with ``nn.Dropout`` but not bit-equal.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops

_HASHED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def hashed_dropout(x: torch.Tensor, probability: float) -> Optional[torch.Tensor]:
    """``ops.dropout(x, probability)`` where it applies (CPU, fp32/bf16/fp16), else None."""
    if x.device.type == "cpu" and x.dtype in _HASHED_DTYPES:
        return ops.dropout(x, probability)
    return None


class HashDropout(nn.Dropout):
    """``nn.Dropout`` with :func:`lowrank_ext.ops.dropout`'s hashed mask on CPU.

    In training with ``p > 0`` a CPU float32/bfloat16/float16 input gets the
    hashed mask (seeded from torch's global generator, so
    ``torch.manual_seed`` repeats runs); anything else (another device or
    dtype, ``inplace=True``, eval mode) behaves exactly as ``nn.Dropout``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0.0 and not self.inplace:
            out = hashed_dropout(input, self.p)
            if out is not None:
                return out
        return super().forward(input)


def use_hash_dropout(module: nn.Module) -> int:
    """Turn every plain ``nn.Dropout`` in ``module`` into a :class:`HashDropout`, in place.

    The layers keep their ``p``, ``inplace`` and place in the module tree
    (their class changes; they hold no parameters or buffers, so state dicts
    are unchanged). Subclasses of ``nn.Dropout`` and functional dropout calls
    (``F.dropout`` inside a model's code, e.g. attention-probability dropout
    in Hugging Face's attention functions) are left alone. Returns how many
    layers changed.
    """
    changed = 0
    for layer in module.modules():
        if type(layer) is nn.Dropout:
            layer.__class__ = HashDropout
            changed += 1
    return changed

"""Preparing a model for training over a frozen 4-bit base."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..nn import AdapterLayer
from .modules_to_save import ModulesToSave


def _kept_trainable(model: nn.Module) -> set[int]:
    # Adapter factors and modules_to_save copies keep their trainable state,
    # so this may be called before or after wrapping a model.
    kept: set[int] = set()
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            kept.update(id(p) for p in module.adapter_parameters() if p.requires_grad)
        elif isinstance(module, ModulesToSave):
            kept.update(id(p) for p in module.modules_to_save.parameters() if p.requires_grad)
    return kept


def _make_embedding_outputs_require_grad(model: nn.Module) -> None:
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
        return
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if embedding is None:
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        return

    def require_grad(module, inputs, output):
        output.requires_grad_(True)

    embedding.register_forward_hook(require_grad)


def prepare_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                              gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None
                              ) -> nn.Module:
    """Ready a model with (or about to get) a 4-bit base for stable training.

    - freezes every parameter except adapter factors and ``modules_to_save``
      copies that are trainable now (so it works before or after wrapping);
    - casts the remaining fp16/bf16 parameters (norms, biases, embeddings) to
      fp32 for stability; NF4 data are buffers and are untouched;
    - makes the input embeddings' output require grad, so gradients reach
      adapters inside checkpointed blocks;
    - with ``use_gradient_checkpointing``, calls the model's
      ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)``
      (default ``{"use_reentrant": True}``).

    Works on a plain model or a wrapper (its wrapped model is prepared).
    Returns ``model``. Raises ``TypeError`` when checkpointing is requested
    but the model has no ``gradient_checkpointing_enable`` (not a Hugging Face model).
    """
    target = getattr(model, "model", model) if hasattr(model, "peft_config") else model
    enable_checkpointing = getattr(target, "gradient_checkpointing_enable", None)
    if use_gradient_checkpointing and not callable(enable_checkpointing):
        raise TypeError(f"{type(target).__name__} has no gradient_checkpointing_enable(); "
                        "pass use_gradient_checkpointing=False or checkpoint it yourself")
    kept = _kept_trainable(target)
    for parameter in target.parameters():
        if id(parameter) not in kept:
            parameter.requires_grad_(False)
            if parameter.dtype in (torch.float16, torch.bfloat16):
                parameter.data = parameter.data.float()
    _make_embedding_outputs_require_grad(target)
    if use_gradient_checkpointing:
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": True}
        enable_checkpointing(gradient_checkpointing_kwargs=kwargs)
    return model

"""How each fine-tuning method is attached to a model, saved, loaded and measured.

All method-specific wiring lives here, so the training loop is the same for
``lora``, ``adalora``, ``qlora`` and ``full``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

METHODS = ("qlora", "lora", "adalora", "full")

# Every Linear of a BERT layer: attention query/key/value and the three
# "dense" projections (attention output, intermediate, output), as in the
# QLoRA paper, which adapts all linear layers.
DEFAULT_TARGET_MODULES = ("query", "key", "value", "dense")

# The options that shape an adapter: (FinetuneSettings field, CLI flag, default).
ADAPTER_OPTIONS = (("rank", "--rank", 8), ("alpha", "--alpha", 16.0),
                   ("dropout", "--dropout", 0.0),
                   ("target_modules", "--target-modules", DEFAULT_TARGET_MODULES))

# Saved next to the adapter so a run can be resumed or served without
# guessing the method or label order.
RUN_FILE = "finetune_run.json"
FULL_WEIGHTS_FILE = "model.safetensors"


class MethodError(ValueError):
    """An unknown method or options the method cannot honour (a user error)."""


@dataclass
class MethodOptions:
    """Hyper-parameters shared by the adapter methods (PEFT's meanings).

    ``rank`` is LoRA's r, and AdaLoRA's final average rank ``target_r``:
    AdaLoRA starts at ``init_r = ceil(1.5 * rank)`` (the paper's b(0) = 1.5
    b(T)) and prunes down to the same parameter budget as LoRA at ``rank``.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES
    modules_to_save: Sequence[str] = ()
    total_step: int = 1

    def adalora_schedule(self) -> dict:
        """AdaLoRA's budget schedule: 10% warm-up at full rank, 20% at the final rank."""
        tinit = max(1, self.total_step // 10)
        tfinal = max(1, self.total_step // 5)
        if tinit + tfinal >= self.total_step:
            tinit, tfinal = 0, 0
        return {"init_r": math.ceil(1.5 * self.rank), "target_r": self.rank, "tinit": tinit,
                "tfinal": tfinal, "deltaT": max(1, self.total_step // 50),
                "beta1": 0.85, "beta2": 0.85, "total_step": self.total_step,
                # The objective docs/finetune.md describes and its results were run with.
                "orth_reg_weight": 0.1, "orth_reg_form": "paper"}


def check_method(method: str) -> str:
    """``method`` if known, else :class:`MethodError` listing the choices."""
    if method not in METHODS:
        raise MethodError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def prepare(model: nn.Module, method: str, options: MethodOptions) -> nn.Module:
    """The module to train: ``model`` wrapped for ``method`` (``full``: ``model`` itself).

    Adapter methods freeze the base, add adapters to ``target_modules`` and
    keep ``modules_to_save`` trainable; ``qlora`` also stores the base
    Linear weights in NF4.
    """
    check_method(method)
    if method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    import lowrank_ext

    common = {
        "target_modules": list(options.target_modules),
        "lora_alpha": options.alpha,
        "lora_dropout": options.dropout,
        "modules_to_save": list(options.modules_to_save),
    }
    if method == "lora":
        return lowrank_ext.LoRAModule(model, lowrank_ext.LoRAConfig(r=options.rank, **common))
    if method == "qlora":
        # Quantize exactly the adapted layers: the default ("all-linear")
        # would also quantize the classification head, which is trained whole.
        return lowrank_ext.QLoRAModule(model, lowrank_ext.QLoRAConfig(
            r=options.rank, quantize_modules=list(options.target_modules), **common))
    return lowrank_ext.AdaLoRAModule(
        model, lowrank_ext.AdaLoRAConfig(**options.adalora_schedule(), **common))


def check_target_modules(model: nn.Module, target_modules: Sequence[str],
                         modules_to_save: Sequence[str]) -> None:
    """:class:`MethodError` unless every entry of ``target_modules`` names a module of
    ``model`` (outside ``modules_to_save``): a typo would silently adapt fewer layers."""
    from lowrank_ext.tuners.targets import match_targets

    try:
        match_targets(model, list(target_modules), "--target-modules", exclude=modules_to_save)
    except ValueError as error:
        raise MethodError(str(error)) from None


def attach_optimizer(module: nn.Module, method: str, optimizer: torch.optim.Optimizer) -> None:
    """Hook per-step method work onto ``optimizer``.

    AdaLoRA scores its singular triplets from the gradients before each step
    and prunes to the scheduled budget after it (shrinking the factors, and
    the optimizer's state with them, when the allocation is final).
    """
    if method == "adalora":
        module.attach_optimizer(optimizer)


def regularization_loss(module: nn.Module, method: str) -> Optional[torch.Tensor]:
    """A term to add to the training loss, or None.

    AdaLoRA keeps its P and Q factors near-orthogonal with a penalty; the
    wrapper adds it only to a Hugging Face output's ``loss``, and this
    classifier returns bare logits.
    """
    if method == "adalora":
        return module.orthogonal_regularization()
    return None


def save(module: nn.Module, method: str, directory: Path, run_info: dict) -> None:
    """Save what was trained: the PEFT-format adapter, or all weights for ``full``."""
    directory.mkdir(parents=True, exist_ok=True)
    if method == "full":
        from safetensors.torch import save_file

        state = {name: tensor.detach().contiguous() for name, tensor in module.state_dict().items()}
        save_file(state, str(directory / FULL_WEIGHTS_FILE))
    else:
        module.save_adapter(str(directory))
    (directory / RUN_FILE).write_text(json.dumps(run_info, indent=2) + "\n", encoding="utf-8")


def read_run_info(directory: Path) -> dict:
    """The run description saved beside an adapter (method, labels, options)."""
    path = directory / RUN_FILE
    if not directory.is_dir():
        raise MethodError(f"adapter directory not found: {directory}")
    if not path.is_file():
        raise MethodError(f"{directory} was not written by 'lowrank-ext finetune' (no {RUN_FILE})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MethodError(f"cannot resume from {directory}: {RUN_FILE} is corrupt ({error})") from None
    missing = [key for key in ("method", "labels") if not isinstance(info, dict) or key not in info]
    if missing:
        raise MethodError(f"cannot resume from {directory}: {RUN_FILE} lacks {', '.join(missing)}")
    return info


def saved_adapter_options(directory: Path, run_info: dict) -> dict:
    """The adapter options a saved run trained with, keyed as in :data:`ADAPTER_OPTIONS`.

    Runs saved before ``dropout`` was recorded have it in the PEFT config only.
    """
    saved = dict(run_info)
    if "dropout" not in saved:
        config_path = directory / "adapter_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        saved["dropout"] = config.get("lora_dropout", 0.0)
    if saved.get("target_modules") is not None:
        saved["target_modules"] = tuple(saved["target_modules"])
    return {name: saved.get(name) for name, _, _ in ADAPTER_OPTIONS}


def load(model: nn.Module, method: str, directory: Path, options: MethodOptions) -> nn.Module:
    """``model`` prepared for ``method`` with the weights saved in ``directory`` loaded, trainable.

    Raises :class:`MethodError` when the saved weights do not fit the model.
    """
    import lowrank_ext
    from lowrank_ext.tuners.serialization import read_adapter_weights
    from safetensors import SafetensorError

    try:
        if method == "full":
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(directory / FULL_WEIGHTS_FILE)))
            return prepare(model, method, options)
        if method == "qlora":
            # A saved adapter does not say the base was quantized: quantize
            # it as the original run did, then copy the adapter in.
            module = prepare(model, method, options)
            module.load_adapter_state_dict(module.active_adapter,
                                           read_adapter_weights(str(directory)))
            return module
        # LoRA, and AdaLoRA at the ranks its finished allocation kept.
        return lowrank_ext.load_adapter(model, str(directory), is_trainable=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        # One line: load_state_dict lists every mismatched key on its own line.
        reason = " ".join(str(error).split())
        if len(reason) > 300:
            reason = reason[:300] + " ..."
        raise MethodError(f"cannot resume from {directory}: {reason}") from None


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` element counts, each parameter counted once."""
    trainable = total = 0
    for parameter in module.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def _stored_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and the tensors of NF4-quantized weights of ``module``."""
    from lowrank_ext import NF4Weight

    tensors = list(module.parameters()) + list(module.buffers())
    for submodule in module.modules():
        for value in vars(submodule).values():
            if isinstance(value, NF4Weight):
                tensors += [tensor for tensor in (value.packed, value.absmax,
                                                  value.nested_absmax, value.nested_code)
                            if tensor is not None]
    return tensors


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the weights as stored: parameters, buffers and NF4 data.

    Quantized weights count their packed 4-bit codes and (double-quantized)
    scales; a tensor shared by several modules counts once.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in _stored_tensors(module):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def weight_storages(module: nn.Module) -> set[tuple[str, int]]:
    """Storage keys of every stored weight (see :func:`memory.storage_key`)."""
    from .memory import storage_key

    return {storage_key(tensor) for tensor in _stored_tensors(module)}

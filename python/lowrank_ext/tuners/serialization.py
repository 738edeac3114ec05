"""Saving and loading adapters in PEFT's on-disk format (never pickle).

A directory holds ``adapter_config.json`` (PEFT's field names, ``peft_type``,
``base_model_name_or_path``, ``task_type``) and ``adapter_model.safetensors``
(keys ``base_model.model.<module path>.lora_A.weight`` etc., adapter name
removed), so adapters move both ways between this library and PEFT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Callable, Optional

import torch
from torch import nn

from .config import LoRAConfig, layer_init
from .model import PEFT_KEY_PREFIX, AdapterModel, LoRAModule
from .targets import ALL_LINEAR, bypassed_linears

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# peft_type -> (config class, wrapper class); other adapter types register here.
ADAPTER_TYPES: dict[str, tuple[type, type]] = {"LORA": (LoRAConfig, LoRAModule)}


def register_adapter_type(peft_type: str, config_class: type, model_class: type) -> None:
    """Let :func:`load_adapter` build ``model_class`` for configs of ``peft_type``.

    ``config_class`` must provide ``from_peft_dict`` and ``to_peft_dict``.
    """
    ADAPTER_TYPES[peft_type] = (config_class, model_class)


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    directory = os.path.dirname(path) or "."
    handle, temporary = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path),
                                         suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _base_model_name(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    for attribute in ("name_or_path", "_name_or_path"):
        value = getattr(config, attribute, None)
        if value:
            return str(value)
    return None


def save_adapter(wrapper: AdapterModel, directory: str,
                 adapter_name: Optional[str] = None) -> None:
    """Write one adapter of ``wrapper`` to ``directory`` (created if needed).

    ``target_modules`` given as ``"all-linear"`` (or None) is saved as the
    list of module paths it selected, which PEFT resolves on any model.
    Raises ``KeyError`` for an unknown adapter name.
    """
    from safetensors.torch import save_file

    adapter_name = adapter_name or wrapper.active_adapter
    if adapter_name not in wrapper.peft_config:
        raise KeyError(f"no adapter named {adapter_name!r}; have {list(wrapper.peft_config)}")
    config = wrapper.peft_config[adapter_name]
    values = config.to_peft_dict()
    if values.get("target_modules") in (None, ALL_LINEAR):
        values["target_modules"] = list(wrapper.targeted_modules[adapter_name])
    values["base_model_name_or_path"] = (values.get("base_model_name_or_path")
                                         or _base_model_name(wrapper.model))
    tensors = {key: value.detach().to("cpu").contiguous()
               for key, value in wrapper.adapter_state_dict(adapter_name).items()}
    os.makedirs(directory, exist_ok=True)
    _write_atomically(os.path.join(directory, WEIGHTS_NAME),
                      lambda path: save_file(tensors, path, metadata={"format": "pt"}))

    def write_config(path: str) -> None:
        with open(path, "w", encoding="utf-8") as stream:
            json.dump(values, stream, indent=2, sort_keys=True, default=str)
            stream.write("\n")

    _write_atomically(os.path.join(directory, CONFIG_NAME), write_config)


def read_adapter_config(directory: str):
    """Parse ``<directory>/adapter_config.json`` into the matching config class.

    Raises ``FileNotFoundError`` if it is missing, ``ValueError`` if it is not
    valid JSON, names an unknown ``peft_type`` or has unusable values.
    """
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
    try:
        with open(path, encoding="utf-8") as stream:
            values = json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
    peft_type = values.get("peft_type")
    if peft_type not in ADAPTER_TYPES:
        raise ValueError(f"{path}: peft_type {peft_type!r} is not one of {sorted(ADAPTER_TYPES)}")
    config_class, _ = ADAPTER_TYPES[peft_type]
    try:
        return config_class.from_peft_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def read_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    """Load ``<directory>/adapter_model.safetensors`` on CPU.

    Raises ``FileNotFoundError`` if missing and ``ValueError`` if the file is
    corrupted or truncated (anything safetensors cannot parse).
    """
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")
    try:
        return load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own error types for bad files
        raise ValueError(f"{path} is not a valid safetensors file (corrupted or truncated?): "
                         f"{error}") from None


def load_adapter(model: nn.Module, directory: str, adapter_name: str = "default",
                 is_trainable: bool = False) -> AdapterModel:
    """Load a saved adapter (ours or PEFT's) into ``model``.

    ``model`` may be a plain model (it is wrapped: the returned wrapper holds
    it, with the loaded adapter active) or an existing wrapper (the adapter
    is added, as in PEFT: the active adapter and the trainability of every
    existing parameter are unchanged; ``set_adapter`` switches). Existing
    :class:`~lowrank_ext.nn.NF4Linear` layers get QLoRA adapters.

    Args:
        directory: the adapter's folder; when it holds no adapter_config.json
            but ``<directory>/<adapter_name>`` does (PEFT's layout for an
            adapter not named "default"), that subfolder.
        is_trainable: make the loaded adapter's parameters trainable
            (default: frozen, for inference, as PEFT does).

    Returns the wrapper. Raises ``FileNotFoundError`` for missing files and
    ``ValueError`` for a bad config, a corrupted or truncated weights file, or
    an adapter whose targets, keys or shapes do not fit the model; in every
    failure the model is left unchanged.
    """
    # PEFT saves an adapter not named "default" in <directory>/<name>.
    nested = os.path.join(directory, adapter_name)
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)) and os.path.isfile(
            os.path.join(nested, CONFIG_NAME)):
        directory = nested
    config = read_adapter_config(directory)
    tensors = read_adapter_weights(directory)
    # The layers start plain; the stored values overwrite them. A PiSSA
    # adapter's base is rebuilt (W minus its top-r SVD part, as PEFT does on
    # load) once the file is known to fit.
    pissa = layer_init(config.init_lora_weights) == "pissa"
    if isinstance(model, AdapterModel):
        wrapper = model
    else:
        _, model_class = ADAPTER_TYPES[type(config).peft_type]
        wrapper = model_class._empty(model)
    if adapter_name in wrapper.peft_config:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    if not isinstance(config, wrapper.config_class):
        # e.g. a plain LoRA config loaded into a QLoRAModule: same LoRA fields,
        # quantization settings from the wrapper's defaults.
        config = wrapper.config_class(**{field.name: getattr(config, field.name)
                                         for field in dataclasses.fields(config)})
    previous = wrapper.active_adapter
    trainable = {parameter: parameter.requires_grad for parameter in wrapper.parameters()}
    wrapper._add_adapter(adapter_name, dataclasses.replace(config, init_lora_weights=True),
                         strict=False)
    # Targets left out because their owner bypasses them (PEFT's all-linear
    # wraps MultiheadAttention's out_proj): their factors never acted in PEFT.
    for path in set(bypassed_linears(wrapper.model)) - set(
            wrapper.targeted_modules[adapter_name]):
        prefix = f"{PEFT_KEY_PREFIX}{path}.lora_"
        tensors = {key: value for key, value in tensors.items() if not key.startswith(prefix)}
    try:
        if pissa:  # before any base weight is rewritten
            wrapper._check_targets(wrapper.targeted_modules[adapter_name], config)
        destinations = wrapper._state_destinations(adapter_name, tensors)
    except BaseException:
        wrapper.delete_adapter(adapter_name)
        if previous is not None:
            wrapper.set_adapter(previous)
        for parameter, requires_grad in trainable.items():
            parameter.requires_grad_(requires_grad)
        raise
    if pissa:
        with torch.no_grad():
            for _, layer in wrapper.adapter_layers():
                if adapter_name in layer.adapter_names:
                    layer._initialize(adapter_name, "pissa")
    AdapterModel._copy_state(destinations, tensors)
    wrapper.peft_config[adapter_name] = config
    if not is_trainable:
        # As PEFT: an adapter loaded for inference runs without dropout (the
        # new layers would otherwise be in training mode in an eval model).
        wrapper.eval()
    if previous is None:
        if not is_trainable:
            for parameter in wrapper.parameters():
                parameter.requires_grad_(False)
        return wrapper
    # As PEFT's PeftModel.load_adapter: the adapter in use stays in use (one
    # being trained keeps training), every existing parameter keeps its
    # requires_grad, and the loaded adapter's own parameters train only with
    # is_trainable. Activating it is the caller's set_adapter.
    wrapper.set_adapter(previous)
    for parameter in wrapper.parameters():
        parameter.requires_grad_(trainable.get(parameter, is_trainable))
    return wrapper


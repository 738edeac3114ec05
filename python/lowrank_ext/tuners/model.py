"""Model wrappers that inject adapter layers into any torch model.

:class:`AdapterModel` holds what every adapter type shares: injecting and
removing layers (transactionally), selecting and disabling adapters,
merging, trainable-parameter bookkeeping, the PEFT-keyed adapter state dict
and attribute/call pass-through. :class:`LoRAModule` and :class:`QLoRAModule`
add only how their layers are built; an AdaLoRA wrapper subclasses it the same way.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..nn import (AdapterLayer, LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear, NF4Linear,
                  QLoRALinear, is_bnb_linear4bit, is_transformers_conv1d)
from ..nn.mixed_batch import MixedBatchModel
from ..nn.qlora import loftq_quantize
from .config import LoRAConfig, QLoRAConfig, _is_loftq as _is_loftq_init, layer_init, task_heads
from .modules_to_save import ModulesToSave
from .targets import (get_submodule_parent, match_modules_to_save, match_targets,
                      warn_tied_merges)

# Prefix PEFT puts in front of module paths in saved adapter files
# (PeftModel.base_model -> LoraModel.model -> the user's model).
PEFT_KEY_PREFIX = "base_model.model."


class _BoundForward:
    """``wrapper.forward``: calls like a bound method, with the wrapped model's signature.

    Training tools read ``inspect.signature(model.forward)`` to learn which
    inputs a model takes (the Hugging Face Trainer drops every dataset column
    not named there), so the wrapper shows the wrapped model's parameters plus
    ``adapter_names``. ``__func__`` / ``__self__`` are a bound method's:
    Accelerate rewraps ``model.forward.__func__`` for mixed precision.
    """

    __slots__ = ("__func__", "__self__")

    def __init__(self, function: Callable, wrapper: "AdapterModel"):
        self.__func__ = function
        self.__self__ = wrapper

    def __call__(self, *args: Any, **kwargs: Any):
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        own = inspect.signature(AdapterModel.forward).parameters["adapter_names"]
        try:
            signature = inspect.signature(self.__self__._modules["model"].forward)
        except (TypeError, ValueError):  # a forward inspect cannot read: show our own
            signature = inspect.signature(self.__func__)
            return signature.replace(parameters=list(signature.parameters.values())[1:])
        parameters = [parameter for parameter in signature.parameters.values()
                      if parameter.name != "adapter_names"]
        # A keyword-only parameter goes before a trailing **kwargs.
        at = len(parameters) - (1 if parameters and parameters[-1].kind is
                                inspect.Parameter.VAR_KEYWORD else 0)
        parameters.insert(at, own.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        return signature.replace(parameters=parameters)


class _ForwardWithModelSignature:
    """Holds a wrapper class's ``forward``; looked up on a wrapper it gives a
    :class:`_BoundForward`. It has no ``__set__``, so assigning
    ``wrapper.forward`` (as Accelerate and TRL do) still overrides it."""

    def __init__(self, function: Callable):
        self.function = function
        self.__doc__ = function.__doc__

    def __get__(self, wrapper: Optional["AdapterModel"], owner: Optional[type] = None):
        if wrapper is None:
            return self.function
        return _BoundForward(self.function, wrapper)


class AdapterModel(MixedBatchModel, nn.Module):
    """Base wrapper: ``self.model`` is the user's model, edited in place.

    Calls and unknown attributes pass through to the wrapped model, so a
    Hugging Face model keeps ``.config``, ``.generate`` and keyword calls.
    Subclasses set ``config_class`` and implement :meth:`_create_layer` and
    :meth:`_add_to_layer`.

    Attributes:
        model: the wrapped model.
        peft_config: ``{adapter name: config}``.
        active_adapter: the adapter in use (trainable).
    """

    config_class: type = LoRAConfig
    layer_class: type = AdapterLayer

    def __init__(self, model: nn.Module, config=None, adapter_name: str = "default",
                 **kwargs: Any):
        super().__init__()
        if isinstance(model, AdapterModel):
            raise TypeError("model is already wrapped; use .add_adapter() to add another adapter")
        self._setup(model)
        self.add_adapter(adapter_name, config, **kwargs)

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        # A subclass's own forward (AdaLoRA's) shows the wrapped model's signature too.
        forward = cls.__dict__.get("forward")
        if forward is not None and not isinstance(forward, _ForwardWithModelSignature):
            cls.forward = _ForwardWithModelSignature(forward)

    def _setup(self, model: nn.Module) -> None:
        self.model = model
        self.peft_config: dict[str, Any] = {}
        self.targeted_modules: dict[str, list[str]] = {}
        self.active_adapter: Optional[str] = None

    @classmethod
    def _empty(cls, model: nn.Module) -> "AdapterModel":
        """A wrapper with no adapter yet (used by :func:`load_adapter`)."""
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper._setup(model)
        return wrapper

    # ------------------------------------------------------------ pass-through

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any):
        """Call the wrapped model (with its adapters) unchanged.

        ``adapter_names`` (one name per batch row, ``"__base__"`` for none)
        runs a mixed-adapter batch: every row of the batch uses its own adapter,
        in one multi-adapter op per layer; it works in training too (no
        dropout), with activation checkpointing (reentrant or not): the call
        records the rows on the autograd graph it builds, so blocks recomputed
        in backward use them again. See :meth:`row_adapters`.
        """
        model = self._modules["model"]
        if adapter_names is None:
            names = self.__dict__.get("_row_context")
            if names is None or not torch.is_grad_enabled():
                return model(*args, **kwargs)
            return self._recorded_call(model, names, args, kwargs)
        layers, names = self._enter_row_adapters(adapter_names)
        try:
            if not torch.is_grad_enabled():
                return model(*args, **kwargs)
            return self._recorded_call(model, names, args, kwargs)
        finally:
            self._leave_row_adapters(layers)

    forward = _ForwardWithModelSignature(forward)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (adapter layers included)."""
        return self.model

    # ----------------------------------------------------------------- layers

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """(path, layer) of every adapter layer in the model."""
        for path, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield path, module

    def _modules_to_save(self) -> Iterator[tuple[str, ModulesToSave]]:
        for path, module in self.model.named_modules():
            if isinstance(module, ModulesToSave):
                yield path, module

    def _create_layer(self, module: nn.Module, path: str, adapter_name: str,
                      config) -> AdapterLayer:
        raise NotImplementedError

    def _add_to_layer(self, layer: AdapterLayer, path: str, adapter_name: str, config) -> None:
        raise NotImplementedError

    def _prepare_model(self, config, targets: list[str], replaced: list) -> None:
        """Hook run before layers are created (QLoRA quantizes here)."""

    def _check_targets(self, targets: list[str], config) -> None:
        """Hook run before the model changes: raise for targets the config cannot adapt."""

    def _replace(self, path: str, new: nn.Module, replaced: list) -> None:
        parent, name = get_submodule_parent(self.model, path)
        replaced.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)

    def add_adapter(self, adapter_name: str, config=None, **kwargs: Any) -> None:
        """Inject a new adapter (built from ``config`` and keyword overrides) and activate it.

        Transactional: if anything fails (unknown target names, bad values,
        unsupported module kinds), the model is left as it was and the error
        propagates (``ValueError`` / ``TypeError`` naming the problem).
        """
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without '.', "
                             f"got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        config = self.config_class.from_kwargs(config, **kwargs)
        self._add_adapter(adapter_name, config, strict=True)

    def _add_adapter(self, adapter_name: str, config, strict: bool) -> None:
        # strict: every target_modules / modules_to_save list entry must match
        # (a user's typo is an error); loading a saved adapter is as lenient
        # as PEFT (entries for other architectures are ignored, with a warning
        # for target_modules).
        self._inject(adapter_name, config, strict)
        self.peft_config[adapter_name] = config
        self.set_adapter(adapter_name)

    def _inject(self, adapter_name: str, config, strict: bool = True) -> None:
        self._forget_row_layers()
        save_names = list(config.modules_to_save or [])
        targets = match_targets(self.model, config.target_modules, require_all=strict,
                                exclude=save_names)
        self._check_targets(targets, config)
        save_paths = (match_modules_to_save(self.model, save_names, require_all=strict,
                                            optional=task_heads(config.task_type))
                      if save_names else [])
        replaced: list = []
        extended: list[AdapterLayer] = []
        trainable = {parameter: parameter.requires_grad for parameter in self.model.parameters()}
        try:
            self._prepare_model(config, targets, replaced)
            for path in targets:
                module = self.model.get_submodule(path)
                if isinstance(module, AdapterLayer):
                    self._add_to_layer(module, path, adapter_name, config)
                    extended.append(module)
                else:
                    self._replace(path, self._create_layer(module, path, adapter_name, config),
                                  replaced)
            for path in save_paths:
                module = self.model.get_submodule(path)
                if isinstance(module, ModulesToSave):
                    module.add_adapter(adapter_name)
                    extended.append(module)
                else:
                    self._replace(path, ModulesToSave(module, adapter_name), replaced)
        except BaseException:
            for layer in extended:
                if adapter_name in getattr(layer, "adapter_names", ()) or isinstance(
                        layer, ModulesToSave):
                    layer.delete_adapter(adapter_name)
            for parent, name, original in reversed(replaced):
                setattr(parent, name, original)
            for parameter, requires_grad in trainable.items():
                parameter.requires_grad_(requires_grad)
            raise
        self.targeted_modules[adapter_name] = targets
        _use_encoder_submodules(self.model)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; layers left without adapters are unwrapped.

        Raises ``KeyError`` for an unknown name.
        """
        if adapter_name not in self.peft_config:
            raise KeyError(f"no adapter named {adapter_name!r}; have {list(self.peft_config)}")
        self._forget_row_layers()
        for path, layer in list(self.adapter_layers()):
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
                if not layer.adapter_names:
                    parent, name = get_submodule_parent(self.model, path)
                    setattr(parent, name, layer.base_layer)
        for path, wrapper in list(self._modules_to_save()):
            wrapper.delete_adapter(adapter_name)
            if not len(wrapper.modules_to_save):
                parent, name = get_submodule_parent(self.model, path)
                setattr(parent, name, wrapper.original_module)
        del self.peft_config[adapter_name]
        del self.targeted_modules[adapter_name]
        if self.active_adapter == adapter_name:
            remaining = list(self.peft_config)
            self.active_adapter = None
            if remaining:
                self.set_adapter(remaining[-1])

    # -------------------------------------------------------------- selection

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Use ``adapter_name`` in every layer that has it; only its parameters train.

        ``adapter_name`` is one name, or a list holding one. Raises
        ``KeyError`` for an unknown name and ``ValueError`` for several names
        (one adapter is active at a time, as with PEFT's
        ``PeftModel.set_adapter``; ``adapter_names=`` in the forward call
        mixes adapters per batch row).
        """
        if isinstance(adapter_name, (list, tuple)) and len(adapter_name) == 1:
            adapter_name = adapter_name[0]
        if not isinstance(adapter_name, str):
            raise ValueError(f"set_adapter takes one adapter name (one adapter is active at a "
                             f"time, as with PEFT's PeftModel.set_adapter), got adapter_name="
                             f"{adapter_name!r}; for a batch whose rows use different "
                             "adapters, pass adapter_names=[...] to the forward call")
        if adapter_name not in self.peft_config:
            raise KeyError(f"no adapter named {adapter_name!r}; have {list(self.peft_config)}")
        config = self.peft_config[adapter_name]
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        for _, layer in self.adapter_layers():
            if adapter_name in layer.adapter_names:
                layer.set_adapter(adapter_name)
            else:
                layer.set_adapter([])
        for _, wrapper in self._modules_to_save():
            wrapper.set_adapter(adapter_name)
        if config.bias == "all":
            for name, parameter in self.model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias" and ".modules_to_save." not in name \
                        and ".original_module." not in name:
                    parameter.requires_grad_(True)
        elif config.bias == "lora_only":
            for _, layer in self.adapter_layers():
                bias = getattr(layer.base_layer, "bias", None)
                if adapter_name in layer.adapter_names and isinstance(bias, nn.Parameter):
                    bias.requires_grad_(True)
        self.active_adapter = adapter_name

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes as without adapters (merged ones are
        unmerged meanwhile). Trained biases (``bias`` other than ``"none"``) stay."""
        with contextlib.ExitStack() as stack:
            for _, layer in self.adapter_layers():
                stack.enter_context(layer.disable_adapter())
            wrappers = [wrapper for _, wrapper in self._modules_to_save()]
            for wrapper in wrappers:
                wrapper.disabled = True
            try:
                yield
            finally:
                for wrapper in wrappers:
                    wrapper.disabled = False

    # ------------------------------------------------------------------ merge

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False,
              **layer_options: Any) -> dict[str, dict[str, float]]:
        """Fold adapters (default: the active one) into the base weights.

        With ``safe_merge``, non-finite adapter weights raise ``ValueError``
        before anything is merged; a merged weight that overflows raises too,
        and the layers merged by this call are unmerged again.

        Returns ``{module path: {adapter name: max abs rounding error}}``.
        """
        names = [self.active_adapter] if adapter_names is None else list(adapter_names)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise KeyError(f"no adapter named {unknown}; have {list(self.peft_config)}")
        if layer_options and not any(layer.quantized for _, layer in self.adapter_layers()):
            raise TypeError(f"unknown merge options {sorted(layer_options)} (they are for "
                            "adapters on 4-bit bases; this model has none)")
        if safe_merge:
            # Check every delta first, so a bad adapter is refused before any
            # layer changes (unmerging restores weights only up to rounding).
            for path, layer in self.adapter_layers():
                for name in names:
                    if name in layer.adapter_names and not torch.isfinite(
                            layer.delta_weight(name)).all():
                        raise ValueError(f"adapter {name!r} has non-finite weights in {path!r}; "
                                         "nothing was merged")
        warn_tied_merges(self.model, self.adapter_layers(), names)
        report: dict[str, dict[str, float]] = {}
        newly_merged: list[AdapterLayer] = []
        try:
            for path, layer in self.adapter_layers():
                present = [name for name in names if name in layer.adapter_names]
                if not present:
                    continue
                was_merged = layer.merged
                report[path] = self._merge_layer(layer, present, safe_merge, layer_options)
                if not was_merged:
                    newly_merged.append(layer)
        except ValueError:
            for layer in newly_merged:
                layer.unmerge()
            raise
        return report

    def _merge_layer(self, layer: AdapterLayer, names: list[str], safe_merge: bool,
                     layer_options: dict) -> dict[str, float]:
        # Options (keep_merged_weight, merged_dtype) are for 4-bit bases; the
        # dense layers of the same model merge as usual.
        if layer.quantized:
            return layer.merge(names, safe_merge, **layer_options)
        return layer.merge(names, safe_merge)

    def unmerge(self) -> None:
        """Undo every merge, restoring the base weights."""
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, **layer_options: Any) -> nn.Module:
        """Merge the active adapter, remove every adapter layer and return the bare model.

        Modules in ``modules_to_save`` are replaced by the active adapter's copy.
        """
        self.merge(safe_merge=safe_merge, **layer_options)
        self._forget_row_layers()
        for path, layer in list(self.adapter_layers()):
            parent, name = get_submodule_parent(self.model, path)
            setattr(parent, name, layer.base_layer)
        for path, wrapper in list(self._modules_to_save()):
            parent, name = get_submodule_parent(self.model, path)
            setattr(parent, name, wrapper.active_module())
        return self.model

    # ------------------------------------------------------------- parameters

    def trainable_parameter_summary(self) -> tuple[int, int]:
        """(trainable parameter count, all parameter count).

        4-bit base weights count one parameter per stored value, as they did
        before quantization.
        """
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        total += sum(module.in_features * module.out_features
                     for module in self.model.modules() if isinstance(module, NF4Linear))
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts and the trainable share."""
        trainable, total = self.trainable_parameter_summary()
        share = 100.0 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {share:.4f}")

    # ---------------------------------------------------------- serialization

    def adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """One adapter's tensors under PEFT's on-disk keys.

        Keys are ``base_model.model.<module path>.<tensor>`` with the adapter
        name left out: ``...q_proj.lora_A.weight``, ``...embed.lora_embedding_A``,
        trained biases (``...base_layer.bias`` or ``...bias``) and
        ``modules_to_save`` copies under the module's own path.
        """
        adapter_name = adapter_name or self.active_adapter
        if adapter_name not in self.peft_config:
            raise KeyError(f"no adapter named {adapter_name!r}; have {list(self.peft_config)}")
        config = self.peft_config[adapter_name]
        state: dict[str, torch.Tensor] = {}
        for path, layer in self.adapter_layers():
            if adapter_name not in layer.adapter_names:
                continue
            for key, value in layer.adapter_state_dict(adapter_name).items():
                state[f"{PEFT_KEY_PREFIX}{path}.{key}"] = value
            bias = getattr(layer.base_layer, "bias", None)
            if config.bias == "lora_only" and isinstance(bias, torch.Tensor):
                state[f"{PEFT_KEY_PREFIX}{path}.base_layer.bias"] = bias.detach()
        if config.bias == "all":
            for name, parameter in self.model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias" and ".modules_to_save." not in name \
                        and ".original_module." not in name:
                    state[f"{PEFT_KEY_PREFIX}{name}"] = parameter.detach()
        for path, wrapper in self._modules_to_save():
            if adapter_name in wrapper.modules_to_save:
                for key, value in wrapper.modules_to_save[adapter_name].state_dict().items():
                    state[f"{PEFT_KEY_PREFIX}{path}.{key}"] = value.detach()
        return state

    def load_adapter_state_dict(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-keyed tensors (as :meth:`adapter_state_dict` gives) into an adapter.

        All keys and shapes are checked before anything is copied; a mismatch
        raises ``ValueError`` listing the missing, unexpected or misshapen keys.
        Also accepted, as PEFT writes them: base weights of adapted embedding /
        output layers (``...embed_tokens.base_layer.weight``, saved with
        ``save_embedding_layers``) and the original module's tensors of a
        ``modules_to_save`` entry (``...original_module.bias`` and
        ``...modules_to_save.bias`` with ``bias="all"``); they are copied into
        the base model (the copy's under its own key too).
        """
        self._copy_state(self._state_destinations(adapter_name, state), state)

    @staticmethod
    def _copy_state(destinations: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        """Copy each tensor of ``state`` into ``destinations[key]``, in its dtype."""
        with torch.no_grad():
            for key, value in state.items():
                destinations[key].copy_(value.to(destinations[key].dtype))

    def _state_destinations(self, adapter_name: str,
                            state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{key: the tensor it loads into}; raises ``ValueError`` if ``state`` does not fit."""
        expected = self.adapter_state_dict(adapter_name)
        optional = self._optional_state(adapter_name)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected) - set(optional))
        destinations = {**optional, **expected}
        misshapen = [f"{key}: file {tuple(state[key].shape)}, model "
                     f"{tuple(destinations[key].shape)}"
                     for key in sorted(set(state) & set(destinations))
                     if tuple(state[key].shape) != tuple(destinations[key].shape)]
        if missing or unexpected or misshapen:
            problems = []
            if missing:
                problems.append(f"missing {_first(missing)}")
            if unexpected:
                problems.append(f"unexpected {_first(unexpected)}")
            if misshapen:
                problems.append(f"shape mismatch {_first(misshapen)}")
            raise ValueError(f"adapter {adapter_name!r} does not fit this model: "
                             + "; ".join(problems))
        return destinations

    def _optional_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Base-model tensors a PEFT adapter file may carry (see :meth:`load_adapter_state_dict`)."""
        optional: dict[str, torch.Tensor] = {}
        for path, layer in self.adapter_layers():
            weight = getattr(layer.base_layer, "weight", None)
            if (adapter_name in layer.adapter_names and isinstance(weight, torch.Tensor)
                    and weight.is_floating_point()):
                optional[f"{PEFT_KEY_PREFIX}{path}.base_layer.weight"] = weight
        for path, wrapper in self._modules_to_save():
            if adapter_name in wrapper.modules_to_save:
                for key, value in wrapper.original_module.state_dict(keep_vars=True).items():
                    optional[f"{PEFT_KEY_PREFIX}{path}.original_module.{key}"] = value
                # With bias="all" PEFT also writes the copy's biases under this name.
                copy = wrapper.modules_to_save[adapter_name]
                for key, value in copy.state_dict(keep_vars=True).items():
                    optional[f"{PEFT_KEY_PREFIX}{path}.modules_to_save.{key}"] = value
        return optional

    def save_adapter(self, directory: str, adapter_name: Optional[str] = None) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format.

        Each file is written to a temporary name and atomically renamed.
        See :func:`lowrank_ext.tuners.save_adapter`.
        """
        from .serialization import save_adapter

        save_adapter(self, directory, adapter_name)

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[Sequence[str]] = None,
                        is_main_process: bool = True, **kwargs: Any) -> None:
        """Save adapters as ``PeftModel.save_pretrained`` does: ``"default"`` in
        ``save_directory``, any other in ``save_directory/<name>`` (where
        :meth:`load_adapter` and PEFT look for it). Only adapters, never the base.

        ``selected_adapters`` defaults to all; ``is_main_process=False`` writes
        nothing (for the other ranks of a distributed run). Other PEFT options
        (``safe_serialization``, ...) are accepted and have no effect: the files
        are always safetensors. Raises ``KeyError`` for an unknown adapter name.
        """
        from .serialization import save_adapter

        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise KeyError(f"no adapter named {unknown}; have {list(self.peft_config)}")
        if not is_main_process:
            return
        for name in names:
            save_adapter(self, save_directory if name == "default"
                         else os.path.join(save_directory, name), name)

    def load_adapter(self, directory: str, adapter_name: str = "default",
                     is_trainable: bool = False) -> None:
        """Load a saved (ours or PEFT's) adapter as a new adapter of this model.

        As PEFT's ``PeftModel.load_adapter``: the active adapter stays active
        and keeps training; the new one is frozen unless ``is_trainable``.
        See :func:`lowrank_ext.tuners.load_adapter`; the model is unchanged on failure.
        """
        from .serialization import load_adapter

        load_adapter(self, directory, adapter_name, is_trainable)


def _call_submodules(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing: its presence alone makes
    ``nn.TransformerEncoderLayer`` skip its fused inference kernel."""


def _use_encoder_submodules(model: nn.Module) -> None:
    """Route encoder layers holding adapter or 4-bit layers through those layers.

    In eval mode ``nn.TransformerEncoderLayer`` runs one fused kernel that
    reads ``linear1.weight`` / ``linear2.weight`` itself: it would silently
    skip the adapters there, and fail on 4-bit codes. It takes its
    module-by-module path when a forward hook is attached, and
    ``nn.TransformerEncoder`` feeds its layers nested tensors unless
    ``use_nested_tensor`` is off; both are set here (results are unchanged,
    only those fused shortcuts are not taken).
    """
    for module in model.modules():
        if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)) or not any(
                isinstance(inner, (AdapterLayer, NF4Linear)) for inner in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
        elif _call_submodules not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_call_submodules)


def _is_loftq(config) -> bool:
    return _is_loftq_init(getattr(config, "init_lora_weights", None))


def _first(items: list[str], count: int = 5) -> str:
    shown = ", ".join(items[:count])
    return shown + (f" (and {len(items) - count} more)" if len(items) > count else "")


class LoRAModule(AdapterModel):
    """LoRA on any torch model: ``LoRAModule(model, config=None, **overrides)``.

    ``config`` is a :class:`LoRAConfig`; keyword overrides use its field
    names (``r``, ``lora_alpha``/``alpha``, ``lora_dropout``/``dropout``,
    ``target_modules``, ...). Targeted ``nn.Linear`` / ``Conv1D`` become
    :class:`~lowrank_ext.nn.LoRALinear`, convolutions
    :class:`~lowrank_ext.nn.LoRAConv`, embeddings
    :class:`~lowrank_ext.nn.LoRAEmbedding`, and existing
    :class:`~lowrank_ext.nn.NF4Linear` bases :class:`~lowrank_ext.nn.QLoRALinear`.
    Only adapter parameters (and the biases / modules the config names) train.

    Raises ``ValueError`` for unknown targets, out-of-range values or a
    targeted module kind LoRA does not support; the model is then unchanged.
    """

    config_class = LoRAConfig
    layer_class = LoRALayer

    def _layer_options(self, path: str, adapter_name: str, config) -> dict[str, Any]:
        rank, alpha = config.rank_and_alpha(path)
        return dict(r=rank, alpha=alpha, dropout=config.lora_dropout,
                    use_rslora=config.use_rslora, init=layer_init(config.init_lora_weights),
                    adapter_name=adapter_name, use_dora=config.use_dora)

    def _create_layer(self, module, path, adapter_name, config):
        options = self._layer_options(path, adapter_name, config)
        if isinstance(module, NF4Linear):
            return QLoRALinear(module, **options)
        if is_bnb_linear4bit(module):  # a model loaded in 4 bits: QLoRA on its own codes
            return QLoRALinear(NF4Linear.from_bnb(module), **options)
        if isinstance(module, nn.Linear) or is_transformers_conv1d(module):
            return LoRALinear(module, **options)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return LoRAConv(module, **options)
        if isinstance(module, nn.Embedding):
            return LoRAEmbedding(module, **options)
        raise ValueError(f"target module {path!r} is a {type(module).__name__}; LoRA supports "
                         "nn.Linear, Conv1D, nn.Conv1d/2d/3d, nn.Embedding and NF4Linear")

    def _check_targets(self, targets, config):
        # PiSSA rewrites base weights as it goes: refuse before the first one.
        if layer_init(config.init_lora_weights) == "pissa":
            for path in targets:
                module = self.model.get_submodule(path)
                base = module.base_layer if isinstance(module, AdapterLayer) else module
                if not (type(base) is nn.Linear or is_transformers_conv1d(base)):
                    raise ValueError(f"init_lora_weights='pissa' needs linear targets; "
                                     f"{path!r} is a {type(base).__name__}")

    def _add_to_layer(self, layer, path, adapter_name, config):
        if not isinstance(layer, LoRALayer):
            raise ValueError(f"module {path!r} already holds a {type(layer).__name__} adapter; "
                             "LoRA cannot be added to it")
        options = self._layer_options(path, adapter_name, config)
        options.pop("adapter_name")
        layer.update_layer(adapter_name, **options)


class QLoRAModule(LoRAModule):
    """QLoRA: quantize the model's linear layers to NF4, then add LoRA adapters.

    ``config`` is a :class:`QLoRAConfig` (LoRA fields plus ``blocksize``,
    ``double_quant``, ``compute_dtype``, ``quantize_modules``). Every layer
    ``quantize_modules`` selects (default all Linear/Conv1D but the output
    head) becomes a frozen :class:`~lowrank_ext.nn.NF4Linear`; targeted ones
    are wrapped in :class:`~lowrank_ext.nn.QLoRALinear`. Modules a Hugging
    Face model lists in ``_keep_in_fp32_modules`` (T5's ``wo``) stay dense,
    as transformers keeps them when loading in 4 bits; targeted, they get
    plain LoRA.

    ``merge(keep_merged_weight=False)`` requantizes (reporting the error);
    ``keep_merged_weight=True`` keeps dense merged weights instead.
    ``modules_to_save`` modules are never quantized. A model loaded with
    bitsandbytes in NF4 is taken over as stored (no requantization).

    ``init_lora_weights="loftq"`` (with ``loftq_config``) runs LoftQ on each
    targeted ``nn.Linear`` / ``Conv1D``: its 4-bit base and first factors are
    chosen together from the dense weight (with that layer's rank, alpha and
    scaling), so the model starts closer to the dense one than plain QLoRA's.
    It needs the dense model (already 4-bit targets raise ``ValueError``) and
    refuses layers that already hold an adapter (it would requantize their
    shared base). With ``loftq_iter=1`` the base is plain NF4 of the dense
    weights, so the saved adapter alone reloads exactly on a new QLoRAModule
    of the same model; with more iterations the base differs: keep the
    wrapper's ``state_dict()`` (4-bit base included) as well.
    """

    config_class = QLoRAConfig

    def _prepare_model(self, config, targets, replaced):
        # modules_to_save modules are trained whole, so they are never
        # quantized (neither by PEFT's exclusion rule nor by the suffix rule
        # that picks the modules to wrap).
        save_names = list(config.modules_to_save or [])
        saved = match_modules_to_save(self.model, save_names, require_all=False)
        quantized = [path for root in saved
                     for path, module in self.model.get_submodule(root).named_modules(prefix=root)
                     if isinstance(module, NF4Linear) or is_bnb_linear4bit(module)]
        if quantized:
            raise ValueError(f"modules_to_save selects {saved}, but {quantized} are already "
                             "4-bit (quantized by an earlier adapter, or before wrapping: keep "
                             "them dense with BitsAndBytesConfig(llm_int8_skip_modules=[...])) "
                             "and cannot be trained whole; name them in the first adapter's "
                             "modules_to_save")
        # A model loaded with bitsandbytes in 4 bits is taken over as stored:
        # the same NF4 codes and scales, no second rounding.
        for path, module in list(self.model.named_modules()):
            if is_bnb_linear4bit(module):
                self._replace(path, NF4Linear.from_bnb(module), replaced)
        quantize = set(targets)
        if config.quantize_modules is not None:
            quantize |= set(match_targets(self.model, config.quantize_modules,
                                          "quantize_modules", require_all=False,
                                          exclude=save_names))
        quantize = {path for path in quantize
                    if not any(path == root or path.startswith(root + ".") for root in saved)}
        # Layers a Hugging Face model keeps in full precision (T5's "wo") stay
        # dense, as when the model is loaded in 4 bits: its code reads their
        # weight dtype to cast activations.
        keep = list(getattr(self.model, "_keep_in_fp32_modules", None) or []) + list(
            getattr(self.model, "_keep_in_fp32_modules_strict", None) or [])
        quantize = {path for path in quantize
                    if not any(path == name or path.endswith("." + name)
                               or name in path.split(".") for name in keep)}
        loftq = _is_loftq(config)
        targeted = set(targets)
        factors = self.__dict__.setdefault("_loftq_factors", {})
        for path in sorted(quantize):
            module = self.model.get_submodule(path)
            if not (isinstance(module, nn.Linear) or is_transformers_conv1d(module)):
                continue
            if loftq and path in targeted:
                # LoftQ: the base's 4-bit codes and the adapter's first factors
                # are chosen together from the dense weight; the factors are
                # set once the adapter layer exists (_create_layer).
                rank, alpha = config.rank_and_alpha(path)
                scaling = float(alpha) / (math.sqrt(rank) if config.use_rslora else rank)
                try:
                    base, lora_A, lora_B = loftq_quantize(
                        module, rank, scaling, config.loftq_config, config.blocksize,
                        config.double_quant, config.compute_dtype)
                except ValueError as error:
                    raise ValueError(f"init_lora_weights='loftq' on {path!r}: {error}") from None
                factors[path] = (lora_A, lora_B)
                self._replace(path, base, replaced)
                continue
            self._replace(path, NF4Linear.from_linear(
                module, config.blocksize, config.double_quant, config.compute_dtype),
                replaced)

    def _check_targets(self, targets, config):
        super()._check_targets(targets, config)
        if not _is_loftq(config):
            return
        # LoftQ chooses the 4-bit base: it needs each target's dense weight,
        # and must not rewrite a base another adapter already uses.
        for path in targets:
            module = self.model.get_submodule(path)
            if isinstance(module, AdapterLayer):
                raise ValueError(f"init_lora_weights='loftq': {path!r} already holds adapters "
                                 f"{list(module.adapter_names)}; LoftQ would requantize the "
                                 "base they share. Use LoftQ for the first adapter only (later "
                                 "ones can start plain)")
            if isinstance(module, NF4Linear) or is_bnb_linear4bit(module):
                raise ValueError(f"init_lora_weights='loftq': {path!r} is already 4-bit "
                                 f"({type(module).__name__}); LoftQ needs the unquantized "
                                 "model (load it dense and let QLoRAModule quantize it)")

    def _inject(self, adapter_name, config, strict=True):
        try:
            super()._inject(adapter_name, config, strict)
        finally:
            self.__dict__.pop("_loftq_factors", None)

    def _create_layer(self, module, path, adapter_name, config):
        layer = super()._create_layer(module, path, adapter_name, config)
        factors = self.__dict__.get("_loftq_factors", {}).get(path)
        if factors is not None:
            layer.set_loftq_factors(adapter_name, *factors)
        return layer

    def _layer_options(self, path, adapter_name, config):
        options = super()._layer_options(path, adapter_name, config)
        if options["init"] == "pissa":
            raise ValueError("init_lora_weights='pissa' is not available in QLoRAModule (the "
                             "base is quantized first); use QLoRALinear.from_linear(init='pissa')")
        return options

    def merge_and_unload(self, safe_merge: bool = False,
                         keep_merged_weight: bool = True) -> nn.Module:
        """Merge the active adapter, remove every adapter layer and return the bare model.

        By default the model comes back dense, ready for ``save_pretrained``
        and a plain ``from_pretrained``: every 4-bit layer, adapted or not,
        becomes the ``nn.Linear`` / ``Conv1D`` it was quantized from, in its
        original dtype. An adapted layer's weight is its original 4-bit base
        dequantized plus the merged adapters, added in fp32 and rounded once
        (adapters merged earlier, either way, are included). With
        ``keep_merged_weight=False`` the layers stay 4-bit
        (:class:`~lowrank_ext.nn.NF4Linear`) and the merged weights are
        requantized, as PEFT does on a bitsandbytes model (adding NF4 rounding
        error; see :meth:`merge`). ``modules_to_save`` modules are replaced by
        the active adapter's copy. On an error the wrapper is left unchanged.
        """
        if not keep_merged_weight:
            return super().merge_and_unload(safe_merge, keep_merged_weight=False)
        names = [self.active_adapter]
        dense = []
        for path, layer in self.adapter_layers():
            if layer.quantized:
                present = [name for name in names if name in layer.adapter_names]
                try:
                    dense.append((path, layer.dense_merged_layer(present, safe_merge)))
                except ValueError as error:
                    raise ValueError(f"{path}: {error}; nothing was merged") from None
        replaced: list = []
        for path, layer in dense:
            self._replace(path, layer, replaced)
        try:
            # The adapter layers left (LoRA on layers kept dense, embeddings)
            # and modules_to_save unload as in any LoRA model.
            model = super().merge_and_unload(safe_merge)
        except BaseException:
            for parent, name, original in reversed(replaced):
                setattr(parent, name, original)
            self._forget_row_layers()
            raise
        for path, module in list(model.named_modules()):
            if isinstance(module, NF4Linear):
                parent, name = get_submodule_parent(model, path)
                setattr(parent, name, module.to_dense())
        quantization = getattr(getattr(model, "config", None), "quantization_config", None)
        if quantization is not None and hasattr(model, "hf_quantizer") and not any(
                is_bnb_linear4bit(module) for module in model.modules()):
            # Loaded with bitsandbytes, now dense: without this transformers
            # would save it as, and reload it into, a 4-bit model.
            model.hf_quantizer.remove_quantization_config(model)
        return model

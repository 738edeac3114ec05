"""The adapter-type-agnostic base of every adapter layer.

An adapter layer wraps a base layer (``base_layer``, never edited except by
merging) and holds any number of named adapters. Everything that does not
depend on the kind of adapter lives here: which adapters are active, which are
merged into the base weight, disabling, deleting, and the per-adapter state
dict used by save/load. LoRA, QLoRA and AdaLoRA layers subclass it.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .. import ops


_FAST_DROPOUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def adapter_dropout(x: torch.Tensor, probability: float, training: bool) -> Optional[torch.Tensor]:
    """The adapter branch's input: ``dropout(x)`` in training with ``probability > 0``,
    else None (which tells the fused ops to reuse ``x``: no copy, no cost).

    On CPU it uses :func:`lowrank_ext.ops.dropout`, whose mask is hashed from a
    seed instead of drawn element by element from the global generator (the
    generator made dropout about a fifth of a LoRA training step); elsewhere
    ``F.dropout``.
    """
    if probability <= 0.0 or not training:
        return None
    if x.device.type == "cpu" and x.dtype in _FAST_DROPOUT_DTYPES:
        return ops.dropout(x, probability)
    return nn.functional.dropout(x, p=probability, training=True)


def autocast_enabled(x: torch.Tensor) -> bool:
    """True inside ``torch.autocast`` for ``x``'s device.

    The layers then leave dtypes to autocast: the fused ops' Autocast kernels
    cast activations, base weight and factors to the autocast dtype (the
    factors differentiably, so they and their gradients stay fp32) and the
    output keeps that dtype, as ``nn.Linear``'s does; the layers skip their
    own casts of the input to the weight's dtype and of the result back.
    Outside autocast this costs one flag read.
    """
    return torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(x.device.type)


class AdapterLayer(nn.Module):
    """Base class: a frozen ``base_layer`` plus named adapters.

    Subclasses store each adapter's tensors in per-adapter ``nn.ModuleDict`` /
    ``nn.ParameterDict`` attributes listed in ``adapter_dict_names`` (keyed by
    adapter name), and implement :meth:`_merge_adapter`, :meth:`_unmerge_adapter`
    and :meth:`_forget_adapter`.

    Attributes:
        base_layer: the wrapped layer.
        active_adapters: names used by ``forward``, in order.
        merged_adapters: names currently folded into the base weight, in merge order.
        adapters_disabled: when True, ``forward`` returns the base layer's output.
    """

    adapter_dict_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False

    # ---------------------------------------------------------------- queries

    @property
    def adapter_names(self) -> list[str]:
        """Names of every adapter this layer holds, in creation order."""
        names: list[str] = []
        for dict_name in self.adapter_dict_names:
            for name in getattr(self, dict_name).keys():
                if name not in names:
                    names.append(name)
        return names

    # The base layer's weight and bias, read through the adapter layer, as
    # model code expects of the layer it replaced (Hugging Face's T5 reads
    # ``self.wo.weight.dtype``, CLIP ``patch_embedding.weight.dtype``).
    @property
    def weight(self):
        """The base layer's ``weight`` (merged adapters included)."""
        return self.base_layer.weight

    @property
    def bias(self):
        """The base layer's ``bias``."""
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        """True when at least one adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    def _check_known(self, names: Iterable[str]) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        known = self.adapter_names
        unknown = [name for name in names if name not in known]
        if unknown:
            raise KeyError(f"{type(self).__name__} has no adapter named {unknown}; it has {known}")
        return names

    def adapter_parameters(self, adapter_name: Optional[str] = None) -> Iterator[nn.Parameter]:
        """The parameters of one adapter, or of all adapters when ``adapter_name`` is None."""
        for dict_name in self.adapter_dict_names:
            container = getattr(self, dict_name)
            for name in container.keys():
                if adapter_name is not None and name != adapter_name:
                    continue
                entry = container[name]
                if isinstance(entry, nn.Parameter):
                    yield entry
                else:
                    yield from entry.parameters()

    # ------------------------------------------------------------- selection

    def set_adapter(self, adapter_names: Union[str, Sequence[str]]) -> None:
        """Make ``adapter_names`` the active adapters (trainable); the others are frozen.

        Raises ``KeyError`` for a name this layer does not hold.
        """
        names = self._check_known(adapter_names)
        self.active_adapters = names
        for name in self.adapter_names:
            for parameter in self.adapter_parameters(name):
                parameter.requires_grad_(name in names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (unmerging everything first if it is merged).

        Raises ``KeyError`` for an unknown name.
        """
        self._check_known([adapter_name])
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for dict_name in self.adapter_dict_names:
            container = getattr(self, dict_name)
            if adapter_name in container:
                del container[adapter_name]
        self._forget_adapter(adapter_name)
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block, ``forward`` gives exactly the base layer's output.

        Merged adapters are unmerged for the duration and merged back after.
        """
        remerge = list(self.merged_adapters)
        if remerge:
            self.unmerge()
        previous = self.adapters_disabled
        self.adapters_disabled = True
        try:
            yield
        finally:
            self.adapters_disabled = previous
            if remerge:
                self.merge(remerge)

    # ----------------------------------------------------------------- merge

    def merge(self, adapter_names: Optional[Sequence[str]] = None,
              safe_merge: bool = False) -> dict[str, float]:
        """Fold adapters (default: the active ones) into the base weight.

        Args:
            adapter_names: which adapters; already merged ones are skipped.
            safe_merge: compute each merged weight in a copy first and raise
                ``ValueError`` (leaving the layer unchanged) if it is not finite.

        Returns:
            ``{adapter name: max |merged weight - exact fp32 merge|}``, the
            rounding error the merge introduced (storing in a low-precision or
            quantized weight).
        """
        names = self._check_known(self.active_adapters if adapter_names is None else adapter_names)
        errors = {}
        for name in names:
            if name in self.merged_adapters:
                continue
            errors[name] = self._merge_adapter(name, safe_merge)
            self.merged_adapters.append(name)
        return errors

    def unmerge(self) -> None:
        """Undo every merge, last merged first, restoring the base weight."""
        while self.merged_adapters:
            self._unmerge_adapter(self.merged_adapters.pop())

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> float:
        raise NotImplementedError

    def _unmerge_adapter(self, adapter_name: str) -> None:
        raise NotImplementedError

    def _forget_adapter(self, adapter_name: str) -> None:
        """Drop per-adapter settings that are not tensors (ranks, scales...)."""

    def _unmerged_active(self) -> list[str]:
        """The adapters ``forward`` must add on top of the base output."""
        if self.adapters_disabled:
            return []
        return [name for name in self.active_adapters if name not in self.merged_adapters]

    # ---------------------------------------------------------- serialization

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """One adapter's tensors keyed as ``<dict name>[.<tensor name>]``.

        The adapter name is left out of the keys (PEFT's on-disk convention):
        ``lora_A.weight``, ``lora_embedding_A``, ...
        """
        state = {}
        for dict_name in self.adapter_dict_names:
            container = getattr(self, dict_name)
            if adapter_name not in container:
                continue
            entry = container[adapter_name]
            if isinstance(entry, nn.Parameter):
                state[dict_name] = entry.detach()
            else:
                for key, value in entry.state_dict().items():
                    state[f"{dict_name}.{key}"] = value.detach()
        return state

    def load_adapter_state(self, adapter_name: str, state: dict[str, torch.Tensor],
                           where: str = "") -> None:
        """Copy ``state`` (keys as from :meth:`adapter_state_dict`) into an adapter.

        Every key must be present with exactly the expected shape; otherwise a
        ``ValueError`` naming the key (prefixed by ``where``) is raised and
        nothing is copied.
        """
        expected = self.adapter_state_dict(adapter_name)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"adapter tensors for {where or type(self).__name__} do not fit: "
                             f"missing {missing}, unexpected {unexpected}")
        for key, value in state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(f"adapter tensor {where}.{key} has shape {tuple(value.shape)}, "
                                 f"the model needs {tuple(expected[key].shape)}")
        with torch.no_grad():
            for key, value in state.items():
                expected[key].copy_(value.to(expected[key].dtype))

"""The adapter-type-agnostic base of every adapter layer.

An adapter layer wraps a base layer (``base_layer``, never edited except by
merging) and holds any number of named adapters. Everything that does not
depend on the kind of adapter lives here: which adapters are active, which are
merged into the base weight, disabling, deleting, and the per-adapter state
dict used by save/load, and merging through the base kind (``base_kind``,
see :mod:`lowrank_ext.nn.bases`). LoRA, QLoRA and AdaLoRA layers subclass it.
"""

from __future__ import annotations

import contextlib
from types import MappingProxyType
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .bases import DENSE, autocast_enabled  # noqa: F401 (autocast_enabled: for the layers)
from .dropout import hashed_dropout


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
    out = hashed_dropout(x, probability)
    return out if out is not None else nn.functional.dropout(x, p=probability, training=True)


class AdapterLayer(nn.Module):
    """Base class: a frozen ``base_layer`` (its parameters stop training) plus named adapters.

    Subclasses store each adapter's tensors in per-adapter ``nn.ModuleDict`` /
    ``nn.ParameterDict`` attributes listed in ``adapter_dict_names`` (keyed by
    adapter name), and implement :meth:`delta_weight` and :meth:`_forget_adapter`;
    a base other than a dense weight sets ``base_kind`` (and calls its
    ``attach(self)``), adapters with a variant (DoRA) list it in ``lora_variant``.

    Attributes:
        base_layer: the wrapped layer.
        active_adapters: names used by ``forward``, in order.
        merged_adapters: names currently folded into the base weight, in merge order.
        adapters_disabled: when True, ``forward`` returns the base layer's output.
    """

    adapter_dict_names: tuple[str, ...] = ()
    # How the base is run and merged into (see lowrank_ext.nn.bases).
    base_kind = DENSE
    # {adapter name: variant object} for adapters that are not plain (DoRA); none here.
    lora_variant = MappingProxyType({})

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)

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
    def quantized(self) -> bool:
        """True when the base is 4-bit (merges requantize, or keep a dense weight)."""
        return self.base_kind.quantized

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

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False,
              keep_merged_weight: Optional[bool] = None,
              merged_dtype: Optional[torch.dtype] = None) -> dict[str, float]:
        """Fold adapters (default: the active ones) into the base weight.

        Args:
            adapter_names: which adapters; already merged ones are skipped.
            safe_merge: compute the merged weight in a copy first and raise
                ``ValueError`` (leaving the layer unchanged) if it is not finite.
            keep_merged_weight: 4-bit bases only (else ``TypeError``): keep a
                dense merged weight in ``merged_dtype`` (default float32)
                instead of requantizing (no 4-bit rounding, more memory).
                Default: as the last merge did (initially False). Switching
                modes while merged raises ``ValueError``.

        A dense base takes the adapters one by one; a 4-bit base adds them
        all in fp32 and quantizes once (see :class:`~lowrank_ext.nn.bases.NF4Base`).

        Returns:
            ``{adapter name: max |merged weight - exact fp32 merge|}``, the
            rounding error the merge introduced (storing in a low-precision or
            quantized weight; 0 for a dense fp32 merge).
        """
        requested = self.active_adapters if adapter_names is None else adapter_names
        names = [name for name in self._check_known(requested)
                 if name not in self.merged_adapters]
        return self.base_kind.merge(self, list(dict.fromkeys(names)), safe_merge,
                                    keep_merged_weight, merged_dtype)

    def unmerge(self) -> None:
        """Undo every merge, restoring the base weight (a 4-bit base exactly)."""
        self.base_kind.unmerge(self)

    def dense_merged_layer(self, adapter_names: Optional[Sequence[str]] = None,
                           safe_merge: bool = False) -> nn.Module:
        """4-bit bases: the dense layer that takes this one's place when a model is unloaded.

        Its weight is the original 4-bit base (as before any merge)
        dequantized, plus the adapters merged now and ``adapter_names``
        (default the active ones), added in fp32 and rounded once to the
        base's original dtype; its kind is the one the base was quantized from
        (``nn.Linear`` or ``Conv1D``). This layer is left unchanged. With
        ``safe_merge`` a non-finite result raises ``ValueError``.
        """
        requested = self.active_adapters if adapter_names is None else adapter_names
        names = list(self.merged_adapters) + [
            n for n in self._check_known(requested) if n not in self.merged_adapters]
        return self.base_kind.dense_merged_layer(self, names, safe_merge)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's update in fp32, laid out like the base layer's weight."""
        raise NotImplementedError

    # Merging into a dense weight (Linear, Conv, Embedding), one adapter at a time.
    def _dense_base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> float:
        weight = self._dense_base_weight()
        current = weight.detach().float()
        exact = self._merged_dense(current, [adapter_name],
                                   lambda: self._unmerged_weight(current))
        if safe_merge and not torch.isfinite(exact).all():
            raise ValueError(f"merging adapter {adapter_name!r} into {type(self).__name__} "
                             "gives non-finite weights; the layer was left unchanged")
        with torch.no_grad():
            weight.copy_(exact)
        return (weight.detach().float() - exact).abs().max().item()

    def _unmerge_adapter(self, adapter_name: str) -> None:
        weight = self._dense_base_weight()
        with torch.no_grad():
            weight.copy_(self._unmerge_one(weight.float(), adapter_name))

    def _merged_dense(self, current: torch.Tensor, names: Sequence[str],
                      unmerged) -> torch.Tensor:
        """``current`` (fp32, base layout) with adapters ``names`` added in turn.

        A variant's adapter (DoRA) is merged by its variant, which may need the
        weight without any merged adapter (DoRA's norm is taken there, as in
        forward and PEFT): ``unmerged()`` gives it, asked for at most once.
        """
        base_weight = None
        for name in names:
            delta = self.delta_weight(name)
            variant = self.lora_variant.get(name)
            if variant is None:
                current = current + delta
                continue
            if base_weight is None:
                base_weight = unmerged()
            current = variant.merged_weight(self, name, current, base_weight, delta)
        return current

    def _unmerge_one(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight`` (fp32, base layout) with merged adapter ``adapter_name`` taken out."""
        variant = self.lora_variant.get(adapter_name)
        delta = self.delta_weight(adapter_name)
        if variant is None:
            return weight - delta
        return variant.unmerged_weight(self, adapter_name, weight, delta)

    def _unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (fp32) with every merged adapter taken out, last merged first."""
        for name in reversed(self.merged_adapters):
            weight = self._unmerge_one(weight, name)
        return weight

    def _lora_input(self, x: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        """The adapter branch's input (see :func:`adapter_dropout`; subclasses keep
        ``lora_dropout``, PEFT's name, per adapter)."""
        return adapter_dropout(x, self.lora_dropout[adapter_name], self.training)

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

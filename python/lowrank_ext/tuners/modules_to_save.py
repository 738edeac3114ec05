"""Modules trained in full (``modules_to_save``): a trainable copy per adapter."""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.mixed_batch import row_adapters_in_use


class ModulesToSave(nn.Module):
    """Wraps ``original_module`` (kept frozen) and runs a per-adapter trainable copy.

    ``modules_to_save[name]`` is adapter ``name``'s copy; ``forward`` uses the
    active adapter's copy, or the original when disabled or the active
    adapter has none. Unknown attributes resolve on the original module.
    """

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disabled = False
        self.add_adapter(adapter_name)

    def add_adapter(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for ``adapter_name``."""
        duplicate = copy.deepcopy(self.original_module)
        for parameter in duplicate.parameters():
            parameter.requires_grad_(True)
        self.modules_to_save[adapter_name] = duplicate
        self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: Optional[str]) -> None:
        """Use ``adapter_name``'s copy (the original when it has none); only it trains."""
        self.active_adapter = adapter_name
        for name, module in self.modules_to_save.items():
            for parameter in module.parameters():
                parameter.requires_grad_(name == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s copy (no error if it has none)."""
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def active_module(self) -> nn.Module:
        """The module ``forward`` runs now."""
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    # Mixed-adapter batches (AdapterModel(..., adapter_names=[...])): row i of
    # the first positional input goes through adapter names[i]'s copy (the
    # original module for "__base__" or an adapter without a copy), as PEFT.
    supports_row_adapters = True

    def set_row_adapters(self, names: Optional[Sequence[str]]) -> None:
        """Use adapter ``names[i]``'s copy for row ``i`` of the next inputs (None: back to normal)."""
        self.__dict__["row_adapter_names"] = None if names is None else tuple(names)

    def forward(self, *args, **kwargs):
        names = row_adapters_in_use(self.__dict__.get("row_adapter_names"))
        if names is None or self.disabled:
            return self.active_module()(*args, **kwargs)
        return self._row_forward(names, args, kwargs)

    def _row_module(self, name: str) -> nn.Module:
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    def _row_forward(self, names: tuple[str, ...], args: tuple, kwargs: dict):
        inputs = args[0] if args else None
        if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
            raise NotImplementedError("per-row adapter_names on modules_to_save need the batch "
                                      "as the module's first positional tensor argument")
        if inputs.shape[0] != len(names):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has "
                             f"{inputs.shape[0]} rows")
        groups: dict[int, list[int]] = {}
        modules: dict[int, nn.Module] = {}
        for row, name in enumerate(names):
            module = self._row_module(name)
            groups.setdefault(id(module), []).append(row)
            modules[id(module)] = module
        if len(groups) == 1:
            return next(iter(modules.values()))(*args, **kwargs)
        result = None
        for key, rows in groups.items():
            index = torch.tensor(rows, dtype=torch.int64, device=inputs.device)
            output = modules[key](inputs.index_select(0, index), *args[1:], **kwargs)
            if not isinstance(output, torch.Tensor):
                raise NotImplementedError(f"per-row adapter_names on modules_to_save need a "
                                          f"tensor output, got {type(output).__name__}")
            if result is None:
                result = output.new_empty((len(names),) + tuple(output.shape[1:]))
            result = result.index_copy(0, index, output)
        return result

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.original_module, name)

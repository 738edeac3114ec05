"""Modules trained in full (``modules_to_save``): a trainable copy per adapter."""

from __future__ import annotations

import copy
from typing import Optional

from torch import nn


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

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.original_module, name)

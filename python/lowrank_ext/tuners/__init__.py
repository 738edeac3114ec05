"""Model wrappers: configs, target matching, LoRA/QLoRA/AdaLoRA injection, PEFT-format save/load."""

from .adalora import AdaLoRAConfig, AdaLoRAModule
from .config import LoRAConfig, QLoRAConfig
from .kbit import prepare_for_kbit_training
from .model import AdapterModel, LoRAModule, QLoRAModule
from .modules_to_save import ModulesToSave
from .serialization import load_adapter, read_adapter_config, register_adapter_type, save_adapter
from .targets import match_targets

__all__ = [
    "AdaLoRAConfig",
    "AdaLoRAModule",
    "AdapterModel",
    "LoRAConfig",
    "LoRAModule",
    "ModulesToSave",
    "QLoRAConfig",
    "QLoRAModule",
    "load_adapter",
    "match_targets",
    "prepare_for_kbit_training",
    "read_adapter_config",
    "register_adapter_type",
    "save_adapter",
]

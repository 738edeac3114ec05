"""Layers: LoRA on Linear/Conv/Embedding/Conv1D, the NF4 4-bit linear base and QLoRA."""

from .adapter_layer import AdapterLayer
from .lora import LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear, is_transformers_conv1d
from .nf4_linear import NF4Linear
from .qlora import QLoRALinear

LoRAConv1d = LoRAConv
LoRAConv2d = LoRAConv

__all__ = [
    "AdapterLayer",
    "LoRAConv",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "NF4Linear",
    "QLoRALinear",
    "is_transformers_conv1d",
]

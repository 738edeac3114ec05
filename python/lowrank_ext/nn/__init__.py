"""Layers: LoRA on Linear/Conv/Embedding/Conv1D, the NF4 4-bit linear base, QLoRA and AdaLoRA."""

from .adalora import AdaLoRAConv2d, AdaLoRALayer, AdaLoRALinear, RankAllocator
from .adapter_layer import AdapterLayer
from .dropout import HashDropout, use_hash_dropout
from .lora import LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear, is_transformers_conv1d
from .nf4_linear import NF4Linear, is_bnb_linear4bit
from .qlora import QLoRALinear

LoRAConv1d = LoRAConv
LoRAConv2d = LoRAConv

__all__ = [
    "AdaLoRAConv2d",
    "AdaLoRALayer",
    "AdaLoRALinear",
    "AdapterLayer",
    "HashDropout",
    "LoRAConv",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "NF4Linear",
    "QLoRALinear",
    "RankAllocator",
    "is_bnb_linear4bit",
    "is_transformers_conv1d",
    "use_hash_dropout",
]

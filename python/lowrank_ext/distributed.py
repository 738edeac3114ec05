"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for lowrank_ext models.

FSDP2 shards parameters only. :class:`~lowrank_ext.nn.NF4Linear` keeps its
4-bit codes and scales as buffers, which FSDP2 would replicate on every rank;
:func:`make_nf4_shardable` turns them into frozen parameters
(``requires_grad=False``; fp32 scales as their int32 bits, so mixed precision
never rounds them), and from then on ``fully_shard`` treats them like any
other parameter: each rank keeps a 1/world slice of dim 0, FSDP all-gathers
the whole layer group before its forward and again before its backward and
frees the gathered copy after each (``reshard_after_forward``). The gathered
codes and scales go to the fused NF4 kernels as they are: no dense weight is
ever built. Frozen parameters get no gradients, so the reduce-scatter carries
only the adapters' gradients.

Typical use (every rank, after ``init_process_group``)::

    model = QLoRAModule(hf_model, QLoRAConfig(...))
    fully_shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    ... train: optimizer over the parameters that require grad ...
    save_adapter_sharded(model, "adapter")              # PEFT format, rank 0 writes
    dcp.save(model.state_dict(), checkpoint_id="ckpt")  # sharded base + adapters

``model.state_dict()`` of a sharded model holds DTensors under bitsandbytes'
keys; :func:`full_state_dict` gathers it into ordinary tensors (the
bitsandbytes ``Linear4bit`` format for the 4-bit layers).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .nn.nf4_linear import NF4Linear, _is_dtensor

__all__ = ["make_nf4_shardable", "decoder_layers", "fully_shard_model", "nf4_resident_bytes",
           "full_state_dict", "save_adapter_sharded"]


def make_nf4_shardable(model: nn.Module) -> int:
    """Call :meth:`NF4Linear.make_shardable` on every 4-bit layer of ``model``
    (before ``fully_shard``); returns how many there are."""
    layers = [module for module in model.modules() if isinstance(module, NF4Linear)]
    for layer in layers:
        layer.make_shardable()
    return len(layers)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one FSDP group each: modules whose class a
    Hugging Face model names in ``_no_split_modules`` (``LlamaDecoderLayer``,
    ...), else the entries of every ``nn.ModuleList``."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    if names:
        found = [module for module in model.modules() if type(module).__name__ in names]
        if found:
            return found
    return [entry for module in model.modules() if isinstance(module, nn.ModuleList)
            for entry in module]


def _embedding_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The input embedding and the output head of the (first) Hugging Face model
    inside ``model``, as FSDP groups of their own: one group for both when
    their weights are tied."""
    for module in model.modules():
        get_input = getattr(module, "get_input_embeddings", None)
        get_output = getattr(module, "get_output_embeddings", None)
        if not (callable(get_input) and callable(get_output)):
            continue
        try:
            found = [get_input(), get_output()]
        except (AttributeError, NotImplementedError):
            continue
        found = [entry for entry in found if isinstance(entry, nn.Module)]
        weights = [getattr(entry, "weight", None) for entry in found]
        if len(found) == 2 and weights[0] is not None and weights[0] is weights[1]:
            return [found]
        return [[entry] for entry in found]
    return []


def fully_shard_model(model: nn.Module, layers: Optional[Iterable[nn.Module]] = None,
                      shard_embeddings: bool = True, **fsdp_options) -> nn.Module:
    """Make the 4-bit layers shardable, then ``fully_shard`` each of ``layers``
    (default :func:`decoder_layers`), the input embedding and the output head
    (``shard_embeddings``; each its own group, so that at most one of these
    large tensors is gathered at a time; the head keeps its gathered copy
    from its forward to its backward, which follows at once), and the root
    ``model``, with ``fsdp_options`` (``mesh``, ``mp_policy``,
    ``reshard_after_forward``, ...).

    Returns ``model`` (now also an ``FSDPModule``). Call on every rank, with
    the process group initialized and the model on its device.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    make_nf4_shardable(model)
    for layer in (decoder_layers(model) if layers is None else layers):
        fully_shard(layer, **fsdp_options)
    if shard_embeddings:
        groups = _embedding_groups(model)
        for index, group in enumerate(groups):
            if any(isinstance(module, FSDPModule) for module in group):
                continue
            options = dict(fsdp_options)
            if index == len(groups) - 1 and len(groups) > 1:  # the output head
                options["reshard_after_forward"] = False
            fully_shard(group if len(group) > 1 else group[0], **options)
    fully_shard(model, **fsdp_options)
    return model


def _storage_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if _is_dtensor(tensor) else tensor
    # The storage, not the view: FSDP's padded shard, or a tensor's whole buffer.
    return local.untyped_storage().nbytes()


def nf4_resident_bytes(model: nn.Module) -> tuple[int, int]:
    """``(resident, whole)``: bytes of 4-bit codes and scales this rank holds
    (the storage of its shards, FSDP's padding included) and bytes of the
    whole quantized weights (their global sizes). Between steps (resharded)
    ``resident`` is about ``whole / world_size``."""
    resident = whole = 0
    for module in model.modules():
        if not isinstance(module, NF4Linear):
            continue
        for name in ("weight", "weight_absmax", "weight_nested_absmax", "weight_nested_code"):
            tensor = getattr(module, name)
            if tensor is not None:
                resident += _storage_bytes(tensor)
                whole += tensor.numel() * tensor.element_size()
    return resident, whole


def full_state_dict(model: nn.Module, cpu: bool = True) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded tensor gathered (a collective:
    every rank calls it and gets the whole state), on the CPU when ``cpu``.

    NF4 layers appear in bitsandbytes' ``Linear4bit`` format (``weight``,
    ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
    ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``).
    The tensors are gathered one at a time, so the peak is one tensor above
    the whole state.
    """
    state = {}
    for key, value in model.state_dict().items():
        if _is_dtensor(value):
            value = value.full_tensor()
        state[key] = value.detach().cpu() if cpu else value.detach()
    return state


class _GatheredAdapters:
    """A stand-in for an adapter wrapper whose adapter tensors are gathered."""

    def __init__(self, wrapper, tensors_by_adapter):
        self._wrapper = wrapper
        self._tensors_by_adapter = tensors_by_adapter

    def adapter_state_dict(self, adapter_name=None):
        return self._tensors_by_adapter[adapter_name or self._wrapper.active_adapter]

    def __getattr__(self, name):
        return getattr(self._wrapper, name)


def save_adapter_sharded(wrapper, directory: str, adapter_name: Optional[str] = None,
                         rank: Optional[int] = None) -> None:
    """Save one adapter of an FSDP-sharded :class:`~lowrank_ext.LoRAModule` /
    :class:`~lowrank_ext.QLoRAModule` in PEFT's format
    (``adapter_config.json`` + ``adapter_model.safetensors``, as
    :func:`lowrank_ext.save_adapter` writes them).

    Every rank must call it (the adapter tensors are all-gathered, one at a
    time: only the adapter, never the base); rank 0 (or the rank whose
    ``rank`` argument is 0) writes the files.
    """
    import torch.distributed as distributed

    from .tuners.serialization import save_adapter

    adapter_name = adapter_name or wrapper.active_adapter
    tensors = {}
    for key, value in wrapper.adapter_state_dict(adapter_name).items():
        if _is_dtensor(value):
            value = value.full_tensor()
        tensors[key] = value.detach().cpu()
    if rank is None:
        rank = distributed.get_rank() if distributed.is_initialized() else 0
    if rank == 0:
        save_adapter(_GatheredAdapters(wrapper, {adapter_name: tensors}), directory, adapter_name)

"""PEFT as a front end: ``peft.get_peft_model`` running lowrank_ext's fused LoRA kernels.

Code written for PEFT keeps working; one call on the config switches the
layers it builds::

    import lowrank_ext, peft

    config = lowrank_ext.use_fused_kernels(peft.LoraConfig(r=16, target_modules=[...]))
    model = peft.get_peft_model(model, config)
    # loading: PeftModel.from_pretrained(model, path,
    #                                    config=lowrank_ext.use_fused_kernels(
    #                                        peft.LoraConfig.from_pretrained(path)))

:func:`use_fused_kernels` registers two layer classes through PEFT's
custom-module mapping (``LoraConfig._register_custom_module``):

* dense ``nn.Linear`` bases (plain float weights; bitsandbytes' and other
  quantized ``nn.Linear`` subclasses are left to PEFT's own layers) get
  :class:`FusedLoraLinear`, whose forward is :func:`lowrank_ext.ops.lora_linear`;
* :class:`~lowrank_ext.nn.NF4Linear` bases (a model whose linear layers were
  stored in 4 bits by lowrank_ext) get :class:`FusedLoraNF4Linear`, whose
  forward is :func:`lowrank_ext.ops.qlora_linear`.

Both subclass PEFT's LoRA ``Linear``, so state-dict names, saving, loading,
multiple adapters, merging and PEFT's model methods are PEFT's own; files
they save load in plain PEFT and in lowrank_ext's wrappers. The fused forward
serves the common training and inference case (one active adapter of plain
LoRA, not merged, no mixed-adapter batch, no autocast, no hooks on the
layer's parts); everything else runs PEFT's forward. Like lowrank_ext's own
layers, the fused path differs from PEFT's forward in two ways: with a
bfloat16/float16 input of more than 16 rows the low-rank term is computed in
that dtype (PEFT computes it in the factors' float32), and dropout on CPU
draws its mask from :func:`lowrank_ext.ops.dropout` (the same distribution
as ``nn.Dropout``, not the same mask for a given seed).

The config must be registered before PEFT builds the layers: a registration
is not saved in ``adapter_config.json``, so a loaded config is registered again.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft import AdaLoraConfig, LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from . import ops
from .nn.adapter_layer import adapter_dropout
from .nn.lora import FEW_ROWS
from .nn.nf4_linear import NF4Linear
from .quant import NF4Weight

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Devices the compiled ops are registered for.
_FUSED_DEVICES = ("cpu", "cuda")


class _DenseLinearType(type):
    def __instancecheck__(cls, module: Any) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        weight = module.weight
        # Quantized nn.Linear subclasses (bitsandbytes' Linear4bit / Linear8bitLt,
        # torchao) hold tensor subclasses or integer codes; PEFT has layers for them.
        return type(weight) in (nn.Parameter, torch.Tensor) and weight.dtype.is_floating_point


class DenseLinear(metaclass=_DenseLinearType):
    """The key under which :class:`FusedLoraLinear` is registered: ``isinstance(m,
    DenseLinear)`` holds for ``nn.Linear`` layers whose weight is a plain float
    tensor (PEFT matches its custom-module keys with ``isinstance``)."""


def _has_hooks(module: nn.Module) -> bool:
    # The fused op computes a module's output without calling it, so hooks
    # (an offloading hook that brings the weight in, a user's probe) would not run.
    return bool(module._forward_hooks or module._forward_pre_hooks)


class _FusedLora(PeftLoraLinear):
    """PEFT's LoRA ``Linear`` whose forward runs a fused lowrank_ext op when it can
    (see the module docstring); subclasses say which op and which bases."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig,
                 parameter_name: Optional[str] = None, **kwargs) -> None:
        if parameter_name is not None:
            raise ValueError("target_parameters cannot be used with lowrank_ext's fused kernels; "
                             "build this config without use_fused_kernels")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = None if args or kwargs else self._fused_adapter(x)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        return self._fused_forward(x, adapter)

    def _fused_adapter(self, x: torch.Tensor) -> Optional[str]:
        """The adapter the fused op can compute this call with, or None for PEFT's forward."""
        if self.disable_adapters or self.merged or torch.is_autocast_enabled(x.device.type):
            return None
        if x.dtype not in _FUSED_DTYPES or x.device.type not in _FUSED_DEVICES:
            return None
        present = [name for name in self.active_adapters if name in self.lora_A]
        if len(present) != 1:
            return None
        name = present[0]
        dropout = self.lora_dropout[name]
        if (name in self.lora_variant or self.lora_bias.get(name)
                or type(dropout) not in (nn.Identity, nn.Dropout)):
            return None
        parts = (self.get_base_layer(), self.lora_A[name], self.lora_B[name], dropout)
        if any(_has_hooks(part) for part in parts):
            return None
        return name if self._base_accepts(x) else None

    def _base_accepts(self, x: torch.Tensor) -> bool:
        return True

    def _fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _op_factors(self, name: str, inputs: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A, lora_B) in ``dtype``, except that float32 factors stay float32 for a
        bfloat16/float16 input of at most ``FEW_ROWS`` rows, as in lowrank_ext's own
        layers (the op then computes the low-rank term in float32, faster at a few rows)."""
        factor_A, factor_B = self.lora_A[name].weight, self.lora_B[name].weight
        if (factor_A.dtype == torch.float32 and factor_B.dtype == torch.float32
                and dtype in (torch.bfloat16, torch.float16)
                and inputs.numel() <= FEW_ROWS * inputs.shape[-1]):
            return factor_A, factor_B
        return factor_A.to(dtype), factor_B.to(dtype)

    def _branch_input(self, name: str, inputs: torch.Tensor) -> Optional[torch.Tensor]:
        """The adapter branch's input (None: ``inputs`` itself, no copy)."""
        dropout = self.lora_dropout[name]
        probability = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        return adapter_dropout(inputs, probability, dropout.training)

    def __repr__(self) -> str:
        return "lowrank_ext." + super().__repr__()


class FusedLoraLinear(_FusedLora):
    """PEFT's LoRA ``Linear`` on a dense ``nn.Linear``, forward fused by
    :func:`lowrank_ext.ops.lora_linear`.

    Built by PEFT's dispatcher as ``FusedLoraLinear(target, adapter_name,
    config=config, **kwargs)``. Raises ``ValueError`` for ``target_parameters``
    targets (PEFT's ``ParamWrapper`` serves those).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig,
                 **kwargs) -> None:
        if config.fan_in_fan_out:
            # As PEFT's own dispatch does for nn.Linear (whose weight is [out, in]).
            warnings.warn("fan_in_fan_out is set to True but the target module is "
                          "`torch.nn.Linear`. Setting fan_in_fan_out to False.")
            config.fan_in_fan_out = False
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _base_accepts(self, x: torch.Tensor) -> bool:
        # PEFT's forward raises for an input of another dtype than the weight's; it keeps doing so.
        return x.dtype == self.get_base_layer().weight.dtype

    def _fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.get_base_layer()
        return ops.lora_linear(x, base.weight, base.bias, *self._op_factors(name, x, x.dtype),
                               self.scaling[name], self._branch_input(name, x))


class FusedLoraNF4Linear(_FusedLora):
    """PEFT's LoRA ``Linear`` on an :class:`~lowrank_ext.nn.NF4Linear` base, forward
    fused by :func:`lowrank_ext.ops.qlora_linear`.

    Plain LoRA only: ``use_dora`` and PEFT's other variants, ``lora_bias`` and
    initializations other than ``True``/``False``/``"gaussian"`` raise
    ``ValueError`` (they need a dense base weight). :meth:`merge` adds the
    adapters to the dequantized weight in float32 and quantizes once, as PEFT
    does for bitsandbytes' 4-bit layers; :meth:`unmerge` restores the 4-bit data
    held before the first merge exactly (PEFT's subtracts and quantizes again).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig,
                 **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        # NF4Linear stores [out, in] whatever it was quantized from (GPT-2's
        # Conv1D included), so the delta is never transposed.
        self.fan_in_fan_out = False
        self._nf4_before_merge: Optional[NF4Weight] = None

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig,
                     **kwargs) -> None:
        if self.resolve_lora_variant(config=config) is not None:
            raise ValueError("NF4Linear bases take plain LoRA only: use_dora and PEFT's other "
                             "LoRA variants need a dense base weight")
        if config.lora_bias:
            raise ValueError("lora_bias is not available on NF4Linear bases")
        init = config.init_lora_weights
        if not (init is True or init is False or init == "gaussian"):
            raise ValueError(f"init_lora_weights={init!r} needs a dense base weight; NF4Linear "
                             "bases take True, False or 'gaussian'")
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)

    def _fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.get_base_layer()
        dtype = base.compute_dtype_for(x)
        inputs = x.to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        result = ops.qlora_linear(inputs, *base.linear_args(), bias,
                                  *self._op_factors(name, inputs, dtype), self.scaling[name],
                                  self._branch_input(name, inputs))
        return result.to(x.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold ``adapter_names`` (default the active adapters) into the 4-bit base.

        With ``safe_merge`` a non-finite result raises ``ValueError`` and the
        layer is left unchanged.
        """
        names = [name for name in check_adapters_to_merge(self, adapter_names)
                 if name in self.lora_A]
        if not names:
            return
        base = self.get_base_layer()
        weight = base.dequantize(torch.float32)
        for name in names:
            weight = weight + self.get_delta_weight(name).float()
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapters {names} seem "
                             "to be broken")
        previous, _ = base.requantize(weight)
        if self._nf4_before_merge is None:
            self._nf4_before_merge = previous
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Restore the 4-bit base held before the first merge."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.get_base_layer().set_quantized_weight(self._nf4_before_merge)
        self._nf4_before_merge = None
        self.merged_adapters.clear()


def use_fused_kernels(config: LoraConfig) -> LoraConfig:
    """Make PEFT build lowrank_ext's fused layers from ``config``; returns ``config``.

    Registers :class:`FusedLoraLinear` for dense ``nn.Linear`` targets and
    :class:`FusedLoraNF4Linear` for :class:`~lowrank_ext.nn.NF4Linear` targets
    in ``config``'s custom-module mapping; other targets (embeddings,
    convolutions, Conv1D, quantized layers of other libraries) keep PEFT's
    layers. Call it before ``get_peft_model`` / ``PeftModel.from_pretrained(...,
    config=config)``. Raises ``TypeError`` for anything but a ``LoraConfig``
    (AdaLoRA builds its own layers).
    """
    if not isinstance(config, LoraConfig) or isinstance(config, AdaLoraConfig):
        raise TypeError(f"use_fused_kernels takes a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({DenseLinear: FusedLoraLinear, NF4Linear: FusedLoraNF4Linear})
    return config


__all__ = ["DenseLinear", "FusedLoraLinear", "FusedLoraNF4Linear", "use_fused_kernels"]

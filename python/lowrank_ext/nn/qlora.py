"""QLoRA: trainable LoRA factors over a frozen NF4 base (Dettmers et al. 2023)."""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
from torch import nn

from .. import ops
from .bases import NF4, linear_forward
from .dora import _tensor_key, nf4_row_sq_norms
from .lora import Init, LoRALayer, validate_adapter_arguments
from .nf4_linear import NF4Linear


class QLoRALinear(LoRALayer):
    """LoRA on an :class:`NF4Linear` base, fused by :func:`lowrank_ext.ops.qlora_linear`.

    ``forward(x)``: ``x`` ``[..., in_features]`` -> ``[..., out_features]``,
    computed in the base's compute dtype (default x's dtype) and returned in x's.

    Merging (:meth:`merge`) dequantizes the base, adds the adapters' delta in
    fp32 and quantizes once; it returns the rounding error that introduced.
    The original 4-bit data is kept while merged, so :meth:`unmerge` restores
    it exactly. With ``keep_merged_weight=True`` a dense merged weight (in
    ``merged_dtype``) is used instead and the 4-bit base is left untouched
    (:class:`~lowrank_ext.nn.bases.NF4Base`, shared with AdaLoRA on NF4).
    Unlike bitsandbytes on CPU, train/eval switches never repack the base.
    """

    base_kind = NF4

    def __init__(self, base_layer: NF4Linear, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, init: Init = True, adapter_name: str = "default",
                 use_dora: bool = False):
        if not isinstance(base_layer, NF4Linear):
            raise TypeError(f"QLoRALinear wraps NF4Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        NF4.attach(self)
        self.update_layer(adapter_name, r, alpha, dropout, use_rslora, init, use_dora)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                    blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None, use_rslora: bool = False,
                    init: Init = True, adapter_name: str = "default",
                    loftq_config=None) -> "QLoRALinear":
        """Quantize ``linear`` (``nn.Linear`` or ``Conv1D``) to NF4 and add an adapter.

        With ``init="pissa"`` the principal components are taken from the
        dense weight and only the residual is quantized. With ``init="loftq"``
        the 4-bit base and the factors are chosen together by LoftQ
        (:func:`lowrank_ext.loftq.loftq_init`, ``loftq_config`` a
        :class:`~lowrank_ext.LoftQConfig`, PEFT's ``LoftQConfig`` or a dict;
        default ``LoftQConfig()``), so that the layer starts close to
        ``linear``. Raises like :meth:`NF4Linear.from_linear` and
        :meth:`LoRALayer.update_layer`; ``loftq_config`` without
        ``init="loftq"`` raises ``ValueError``.
        """
        validate_adapter_arguments(r, alpha, dropout)
        if loftq_config is not None and init != "loftq":
            raise ValueError(f"loftq_config is only read with init='loftq', got init={init!r}")
        if init == "loftq":
            scaling = float(alpha) / (math.sqrt(r) if use_rslora else r)
            base, lora_A, lora_B = loftq_quantize(linear, r, scaling, loftq_config, blocksize,
                                                  double_quant, compute_dtype)
            layer = cls(base, r, alpha, dropout, use_rslora, True, adapter_name)
            layer.set_loftq_factors(adapter_name, lora_A, lora_B)
            return layer
        if init != "pissa":
            base = NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype)
            return cls(base, r, alpha, dropout, use_rslora, init, adapter_name)
        from .lora import LoRALinear

        dense = LoRALinear(copy.deepcopy(linear), r, alpha, dropout, use_rslora, "pissa",
                           adapter_name)
        base = NF4Linear.from_linear(dense.base_layer, blocksize, double_quant, compute_dtype)
        layer = cls(base, r, alpha, dropout, use_rslora, False, adapter_name)
        with torch.no_grad():
            layer.lora_A[adapter_name].weight.copy_(dense.lora_A[adapter_name].weight)
            layer.lora_B[adapter_name].weight.copy_(dense.lora_B[adapter_name].weight)
        return layer

    def update_layer(self, adapter_name, r, alpha, dropout=0.0, use_rslora=False, init=True,
                     use_dora=False):
        if isinstance(init, str) and init == "loftq":
            raise ValueError("init 'loftq' chooses the 4-bit base together with the factors, so "
                             "it cannot run on an existing 4-bit base; use "
                             "QLoRALinear.from_linear(linear, init='loftq') on the dense layer "
                             "(or QLoRAModule(..., init_lora_weights='loftq'))")
        super().update_layer(adapter_name, r, alpha, dropout, use_rslora, init, use_dora)

    def set_loftq_factors(self, adapter_name: str, lora_A: torch.Tensor,
                          lora_B: torch.Tensor) -> None:
        """Set adapter ``adapter_name``'s factors to LoftQ's (cast to the adapter dtype).

        A DoRA magnitude is recomputed from the new factors (PEFT's order:
        LoftQ first, then the DoRA init from ``Q + scaling * B @ A``).
        Raises ``ValueError`` for factors of the wrong shape.
        """
        self._check_known([adapter_name])
        factor_A, factor_B = self._factor_tensors(adapter_name)
        if tuple(lora_A.shape) != tuple(factor_A.shape) or tuple(lora_B.shape) != tuple(
                factor_B.shape):
            raise ValueError(f"LoftQ factors of shapes {tuple(lora_A.shape)} / "
                             f"{tuple(lora_B.shape)} do not fit adapter {adapter_name!r} "
                             f"({tuple(factor_A.shape)} / {tuple(factor_B.shape)})")
        with torch.no_grad():
            factor_A.copy_(lora_A)
            factor_B.copy_(lora_B)
        variant = self.lora_variant.get(adapter_name)
        if variant is not None:
            variant.forget(self, adapter_name)
            variant.init(self, adapter_name)

    def _initialize_pissa(self, adapter_name):
        raise ValueError("init 'pissa' on an existing 4-bit base would quantize twice; use "
                         "QLoRALinear.from_linear(linear, init='pissa') on the dense layer")

    # QDoRA: the DoRA norm from the 4-bit weight without ever forming it densely.
    def _dora_row_sq_norms(self):
        base = self.base_layer
        return nf4_row_sq_norms(base.quantized_weight(), base.out_features, base.in_features)

    def _dora_apply_weight(self, factor_A):
        # A @ W.T ([r, out]) through the 4-bit GEMM (fp32 rows: exact decoded values).
        dtype = torch.float64 if factor_A.dtype == torch.float64 else torch.float32
        return ops.nf4_linear(factor_A.to(dtype).contiguous(), *self.base_layer.linear_args(),
                              None)

    def _dora_base_key(self):
        args = self.base_layer.linear_args()
        return (_tensor_key(args[0]), _tensor_key(args[1]))

    supports_row_adapters = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(self, x)


def loftq_quantize(linear: nn.Module, r: int, scaling: float, loftq_config: Any = None,
                   blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: Optional[torch.dtype] = None
                   ) -> tuple[NF4Linear, torch.Tensor, torch.Tensor]:
    """LoftQ on a dense ``nn.Linear`` / ``Conv1D``: ``(NF4Linear, lora_A, lora_B)``.

    The NF4Linear holds LoftQ's ``Q`` (the layer's bias, blocksize, double
    quantization and compute dtype as :meth:`NF4Linear.from_linear` would
    give); ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` satisfy
    ``Q + scaling * lora_B @ lora_A ~= W``. ``loftq_config``: see
    :meth:`lowrank_ext.loftq.LoftQConfig.from_any` (None: the defaults).
    Raises ``ValueError`` for a 4-bit layer (LoftQ needs the dense weight)
    and as :func:`~lowrank_ext.loftq.loftq_init` does.
    """
    from ..loftq import LoftQConfig, loftq_init
    from .lora import is_transformers_conv1d
    from .nf4_linear import is_bnb_linear4bit

    config = LoftQConfig.from_any({} if loftq_config is None else loftq_config)
    if isinstance(linear, NF4Linear) or is_bnb_linear4bit(linear):
        raise ValueError(f"LoftQ needs the unquantized weight, got a 4-bit "
                         f"{type(linear).__name__}; start from the dense model")
    if isinstance(linear, nn.Linear):
        dense = linear.weight.detach()
    elif is_transformers_conv1d(linear):
        dense = linear.weight.detach().t()
    else:
        raise TypeError(f"LoftQ needs an nn.Linear or Conv1D, got {type(linear).__name__}")
    quantized, lora_A, lora_B = loftq_init(
        dense.contiguous(), r, scaling=scaling, num_iter=config.loftq_iter,
        blocksize=blocksize, double_quant=double_quant)
    base = NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype)
    base.set_quantized_weight(quantized)
    return base, lora_A, lora_B

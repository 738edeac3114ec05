"""QLoRA: trainable LoRA factors over a frozen NF4 base (Dettmers et al. 2023)."""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..quant import NF4Weight
from .adapter_layer import autocast_enabled
from .dora import _tensor_key, nf4_row_sq_norms
from .lora import Init, LoRALayer, _adapter_dtype, _linear_adapters, validate_adapter_arguments
from .nf4_linear import NF4Linear


class QLoRALinear(LoRALayer):
    """LoRA on an :class:`NF4Linear` base, fused by :func:`lowrank_ext.ops.qlora_linear`.

    ``forward(x)``: ``x`` ``[..., in_features]`` -> ``[..., out_features]``,
    computed in the base's compute dtype (default x's dtype) and returned in x's.

    Merging (:meth:`merge`) dequantizes the base, adds the adapters' delta in
    fp32 and quantizes once; it returns the rounding error that introduced.
    The original 4-bit data is kept while merged, so :meth:`unmerge` restores
    it exactly. With ``keep_merged_weight=True`` a dense merged weight (in
    ``merged_dtype``) is used instead and the 4-bit base is left untouched.
    Unlike bitsandbytes on CPU, train/eval switches never repack the base.
    """

    def __init__(self, base_layer: NF4Linear, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, init: Init = True, adapter_name: str = "default",
                 use_dora: bool = False):
        if not isinstance(base_layer, NF4Linear):
            raise TypeError(f"QLoRALinear wraps NF4Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.register_buffer("merged_weight", None, persistent=False)
        self._unmerged_base: Optional[NF4Weight] = None
        self._keep_merged_weight = False
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

    def _create_factors(self, adapter_name, r):
        device = self.base_layer.weight.device
        dtype = _adapter_dtype(self.base_layer.weight_dtype)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=device,
                                              dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=device,
                                              dtype=dtype)

    def _initialize_pissa(self, adapter_name):
        raise ValueError("init 'pissa' on an existing 4-bit base would quantize twice; use "
                         "QLoRALinear.from_linear(linear, init='pissa') on the dense layer")

    def delta_weight(self, adapter_name):
        factor_A, factor_B = self._factor_tensors(adapter_name)
        return (factor_B.detach().float() @ factor_A.detach().float()) * self.scaling[adapter_name]

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
        active = self._unmerged_active()
        base = self.base_layer
        # Under autocast the ops cast to the autocast dtype and the result keeps it.
        autocast = autocast_enabled(x)
        dtype = base.compute_dtype_for(x)
        inputs = x.to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        if self.row_adapter_names is not None and not self.adapters_disabled:
            if self.lora_variant:  # DoRA rows scale W x + s B A x, then the bias is added
                base_output = ops.nf4_linear(inputs, *base.linear_args(), None)
                result = self._dora_rows(self._row_adapter_forward(inputs, base_output), bias)
            else:
                base_output = ops.nf4_linear(inputs, *base.linear_args(), bias)
                result = self._row_adapter_forward(inputs, base_output)
            return result if autocast else result.to(x.dtype)
        if self.merged_weight is not None and not self.adapters_disabled:
            if any(name in self.lora_variant for name in active):
                raise ValueError(f"DoRA adapters {[n for n in active if n in self.lora_variant]} "
                                 "cannot run on top of a dense merged weight "
                                 "(keep_merged_weight=True); merge them too or unmerge first")
            result = F.linear(inputs, self.merged_weight.to(dtype), bias)
            if not active:
                return result if autocast else result.to(x.dtype)
            for name in active:
                branch = self._lora_input(inputs, name)
                branch = inputs if branch is None else branch
                down = branch @ self.lora_A[name].weight.to(dtype).T
                result = result + (down @ self.lora_B[name].weight.to(dtype).T) * self.scaling[name]
            return result if autocast else result.to(x.dtype)
        if not active:
            return base(x)
        args = base.linear_args()

        def plain(rows, bias):
            return ops.nf4_linear(rows, *args, bias)

        def fused(name):
            return lambda rows, bias, lora_input: ops.qlora_linear(
                rows, *args, bias, *self._op_factors(name, rows, dtype), self.scaling[name],
                lora_input)

        result = _linear_adapters(self, active, inputs, bias, dtype, fused, plain)
        return result if autocast else result.to(x.dtype)

    # ------------------------------------------------------------------ merge

    def merge(self, adapter_names=None, safe_merge: bool = False,
              keep_merged_weight: Optional[bool] = None,
              merged_dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Fold adapters into the base; see the class docstring.

        All requested adapters are added in fp32 and the result is quantized
        once (not once per adapter).

        Args:
            adapter_names: default the active adapters; merged ones are skipped.
            safe_merge: raise ``ValueError`` (layer unchanged) on non-finite results.
            keep_merged_weight: keep a dense merged weight in ``merged_dtype``
                instead of requantizing (no 4-bit rounding, more memory).
                Default: as the last merge did (initially False). Switching
                modes while merged raises ``ValueError``.

        Returns ``{adapter name: max abs error introduced}`` (0 for a dense fp32 merge).
        """
        requested = self.active_adapters if adapter_names is None else adapter_names
        names = [n for n in self._check_known(requested) if n not in self.merged_adapters]
        keep = self._keep_merged_weight if keep_merged_weight is None else keep_merged_weight
        if self.merged and keep != (self.merged_weight is not None):
            raise ValueError("this layer is already merged the other way "
                             "(keep_merged_weight differs); unmerge it first")
        if not names:
            return {}
        base = self.base_layer
        current = (self.merged_weight.float() if self.merged_weight is not None
                   else base.dequantize(torch.float32))
        exact = self._merged_dense(current, names)
        if safe_merge and not torch.isfinite(exact).all():
            raise ValueError(f"merging adapters {names} into a 4-bit base gives non-finite "
                             "weights; the layer was left unchanged")
        self._keep_merged_weight = keep
        if keep:
            self.merged_weight = exact.to(merged_dtype)
            error = (self.merged_weight.float() - exact).abs().max().item()
        else:
            previous, error = base.requantize(exact)
            if self._unmerged_base is None:
                self._unmerged_base = previous
        self.merged_adapters.extend(names)
        return {name: error for name in names}

    def dense_merged_layer(self, adapter_names=None, safe_merge: bool = False) -> nn.Module:
        """The dense layer that takes this one's place when a model is unloaded.

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
        original = (self.base_layer.quantized_weight() if self._unmerged_base is None
                    else self._unmerged_base)
        weight = self._merged_dense(original.dequantize(torch.float32), names, original)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"merging adapters {names} into a 4-bit base gives non-finite "
                             "weights")
        return self.base_layer.to_dense(weight)

    def _merged_dense(self, current: torch.Tensor, names: list[str],
                      original: Optional[NF4Weight] = None) -> torch.Tensor:
        """``current`` (fp32 ``[out, in]``) with adapters ``names`` added in turn
        (DoRA adapters scale by ``m / ||W0 + s B A||``, W0 the weight before any
        merge, as PEFT), in fp32."""
        unmerged = None
        for name in names:
            delta = self.delta_weight(name)
            variant = self.lora_variant.get(name)
            if variant is None:
                current = current + delta
                continue
            if unmerged is None:
                if original is None:
                    original = (self.base_layer.quantized_weight() if self._unmerged_base is None
                                else self._unmerged_base)
                unmerged = original.dequantize(torch.float32)
            current = variant.merged_weight(self, name, current, unmerged, delta)
        return current

    def unmerge(self) -> None:
        """Restore the base exactly as before the first merge (the saved 4-bit data)."""
        self.merged_adapters.clear()
        self.merged_weight = None
        if self._unmerged_base is not None:
            self.base_layer.set_quantized_weight(self._unmerged_base)
            self._unmerged_base = None


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

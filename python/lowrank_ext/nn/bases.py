"""Base kinds: how an adapter layer runs and merges into the layer it wraps.

A layer holds its kind as ``base_kind`` (one stateless object per kind, as
DoRA's variant is; per-layer state stays on the layer): :data:`DENSE`,
:data:`DENSE_LINEAR` (also runs the fused op) or :data:`NF4`. The linear
forward (:func:`linear_forward`) and the 4-bit merge (:class:`NF4Base`) are
written here once for every adapter family. See docs/architecture.md,
"Layers: base x variant".
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


def autocast_enabled(x: torch.Tensor) -> bool:
    """True inside ``torch.autocast`` for ``x``'s device.

    The layers then leave dtypes to autocast: the fused ops' Autocast kernels
    cast activations, base weight and factors to the autocast dtype (the
    factors differentiably, so they and their gradients stay fp32) and the
    output keeps that dtype, as ``nn.Linear``'s does; the layers skip their
    own casts of the input to the weight's dtype and of the result back.
    Outside autocast this costs one flag read.
    """
    return torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(x.device.type)


def is_transformers_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's GPT-2 style ``Conv1D`` (a linear layer with weight ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # Adapter factors are trained, so they are kept in fp32 whatever the base
    # dtype (Adam on bf16 parameters loses small updates); forward casts them
    # to the compute dtype, which is cheap at rank r. A float64 base keeps
    # float64 factors (as PEFT does), so gradcheck can perturb them too.
    if weight_dtype == torch.float64:
        return weight_dtype
    return torch.float32 if weight_dtype.is_floating_point else weight_dtype


class DenseBase:
    """A base whose weight is a dense tensor (Linear, Conv1D, ConvNd, Embedding),
    merged into in place, one adapter at a time (``layer._merge_adapter``)."""

    quantized = False

    def factor_options(self, layer) -> dict:
        """Device and dtype of new adapter factors: the base weight's (fp32 below 32 bits)."""
        weight = layer.base_layer.weight
        return dict(device=weight.device, dtype=_adapter_dtype(weight.dtype))

    def merge(self, layer, names: list[str], safe_merge: bool, keep_merged_weight,
              merged_dtype) -> dict[str, float]:
        if keep_merged_weight is not None or merged_dtype is not None:
            raise TypeError(f"{type(layer).__name__}.merge() takes keep_merged_weight and "
                            "merged_dtype on a 4-bit base only; this one is dense")
        errors = {}
        for name in names:
            errors[name] = layer._merge_adapter(name, safe_merge)
            layer.merged_adapters.append(name)
        return errors

    def unmerge(self, layer) -> None:
        while layer.merged_adapters:
            layer._unmerge_adapter(layer.merged_adapters.pop())

    def dense_merged_layer(self, layer, adapter_names, safe_merge):
        raise TypeError(f"dense_merged_layer is for 4-bit bases; {type(layer).__name__} "
                        "wraps a dense one (merge it instead)")


class DenseLinearBase(DenseBase):
    """``nn.Linear``, or Hugging Face's ``Conv1D`` (``layer.fan_in_fan_out``:
    the weight stored ``[in, out]``), run by ``F.linear`` / :func:`ops.lora_linear`."""

    def attach(self, layer, fan_in_fan_out: Optional[bool] = None) -> None:
        """Set ``layer.fan_in_fan_out`` (default: True for ``Conv1D``) and its
        ``in_features`` / ``out_features``; ``ValueError`` for ``fan_in_fan_out=True``
        on an ``nn.Linear``."""
        base = layer.base_layer
        conv1d = is_transformers_conv1d(base)
        # Conv1D stores its weight as [in, out], the transpose of nn.Linear's.
        layer.fan_in_fan_out = conv1d if fan_in_fan_out is None else bool(fan_in_fan_out)
        if layer.fan_in_fan_out and not conv1d:
            raise ValueError("fan_in_fan_out=True needs a weight stored as [in, out] (Conv1D); "
                             f"this {type(base).__name__} stores [out, in]")
        in_out = tuple(base.weight.shape)
        layer.out_features, layer.in_features = in_out[::-1] if layer.fan_in_fan_out else in_out

    def setup(self, layer, x: torch.Tensor, autocast: bool, rows: bool = False) -> tuple:
        """``(inputs, dtype, bias, plain, fused)`` for one call: ``inputs`` cast to the
        compute dtype (left to autocast under it), ``plain(rows, bias)`` = ``W rows +
        bias``, ``fused(rows, bias, A, B, scaling, lora_input)`` = that plus
        ``scaling * B A lora_input``."""
        weight = layer.base_layer.weight
        return _dense_setup(weight.t() if layer.fan_in_fan_out else weight, layer.base_layer.bias,
                            x, autocast)


def _dense_setup(weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor,
                 autocast: bool) -> tuple:
    dtype = weight.dtype
    inputs = x if autocast else x.to(dtype)
    bias = None if bias is None else bias.to(dtype)

    def plain(rows, bias):
        return F.linear(rows, weight, bias)

    def fused(rows, bias, factor_A, factor_B, scaling, lora_input):
        return ops.lora_linear(rows, weight, bias, factor_A, factor_B, scaling, lora_input)

    return inputs, dtype, bias, plain, fused


class NF4Base:
    """An :class:`~lowrank_ext.nn.NF4Linear` base, run by :func:`ops.nf4_linear` /
    :func:`ops.qlora_linear` in its compute dtype (default the input's).

    Merging dequantizes the base, adds every requested adapter in fp32 and
    quantizes once, returning the rounding error of that one quantization for
    each adapter. The 4-bit data from before the first merge is kept, so
    unmerging restores it exactly. With ``keep_merged_weight=True`` a dense
    merged weight (``merged_dtype``, default float32) is used instead and the
    4-bit base is left untouched; the mode sticks until every adapter is
    unmerged. Per-layer state: ``merged_weight`` (a non-persistent buffer),
    ``_unmerged_base`` and ``_keep_merged_weight``.
    """

    quantized = True

    def attach(self, layer, fan_in_fan_out: Optional[bool] = None) -> None:
        # NF4Linear stores [out, in] whatever it was quantized from (Conv1D included).
        if fan_in_fan_out:
            raise ValueError("fan_in_fan_out=True needs a weight stored as [in, out] (Conv1D); "
                             "NF4Linear stores [out, in]")
        base = layer.base_layer
        layer.fan_in_fan_out = False
        layer.in_features, layer.out_features = base.in_features, base.out_features
        layer.register_buffer("merged_weight", None, persistent=False)
        layer._unmerged_base = None
        layer._keep_merged_weight = False

    def factor_options(self, layer) -> dict:
        base = layer.base_layer
        return dict(device=base.weight.device, dtype=_adapter_dtype(base.weight_dtype))

    @staticmethod
    def uses_merged_weight(layer) -> bool:
        return layer.merged_weight is not None and not layer.adapters_disabled

    def setup(self, layer, x: torch.Tensor, autocast: bool, rows: bool = False) -> tuple:
        """As :meth:`DenseLinearBase.setup`; over the dense merged weight when there is
        one (except for mixed-adapter rows, which refuse merged adapters anyway)."""
        base = layer.base_layer
        dtype = base.compute_dtype_for(x)
        # The input goes to the compute dtype even under autocast (the 4-bit
        # GEMM's dtype is the layer's choice, not autocast's).
        inputs = x.to(dtype)
        if not rows and self.uses_merged_weight(layer):
            return _dense_setup(layer.merged_weight.to(dtype), base.bias, inputs, True)
        bias = None if base.bias is None else base.bias.to(dtype)
        args = base.linear_args()

        def plain(rows, bias):
            return ops.nf4_linear(rows, *args, bias)

        def fused(rows, bias, factor_A, factor_B, scaling, lora_input):
            return ops.qlora_linear(rows, *args, bias, factor_A, factor_B, scaling, lora_input)

        return inputs, dtype, bias, plain, fused

    def merge(self, layer, names: list[str], safe_merge: bool,
              keep_merged_weight: Optional[bool],
              merged_dtype: Optional[torch.dtype]) -> dict[str, float]:
        keep = layer._keep_merged_weight if keep_merged_weight is None else keep_merged_weight
        if layer.merged and keep != (layer.merged_weight is not None):
            raise ValueError("this layer is already merged the other way "
                             "(keep_merged_weight differs); unmerge it first")
        if not names:
            return {}
        base = layer.base_layer
        current = (layer.merged_weight.float() if layer.merged_weight is not None
                   else base.dequantize(torch.float32))
        exact = layer._merged_dense(current, names, lambda: self.original(layer).dequantize(
            torch.float32))
        if safe_merge and not torch.isfinite(exact).all():
            raise ValueError(f"merging adapters {names} into a 4-bit base gives non-finite "
                             "weights; the layer was left unchanged")
        layer._keep_merged_weight = keep
        if keep:
            layer.merged_weight = exact.to(torch.float32 if merged_dtype is None
                                           else merged_dtype)
            error = (layer.merged_weight.float() - exact).abs().max().item()
        else:
            previous, error = base.requantize(exact)
            if layer._unmerged_base is None:
                layer._unmerged_base = previous
        layer.merged_adapters.extend(names)
        return {name: error for name in names}

    def unmerge(self, layer) -> None:
        layer.merged_adapters.clear()
        layer.merged_weight = None
        if layer._unmerged_base is not None:
            layer.base_layer.set_quantized_weight(layer._unmerged_base)
            layer._unmerged_base = None

    @staticmethod
    def original(layer):
        """The 4-bit weight from before any merge (an :class:`NF4Weight`)."""
        return (layer.base_layer.quantized_weight() if layer._unmerged_base is None
                else layer._unmerged_base)

    def dense_merged_layer(self, layer, names: list[str], safe_merge: bool) -> nn.Module:
        original = self.original(layer).dequantize(torch.float32)
        weight = layer._merged_dense(original, names, lambda: original)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"merging adapters {names} into a 4-bit base gives non-finite "
                             "weights")
        return layer.base_layer.to_dense(weight)


DENSE = DenseBase()
DENSE_LINEAR = DenseLinearBase()
NF4 = NF4Base()


def linear_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The forward of a linear-kind adapter layer, whatever its base kind and family.

    ``x`` ``[..., in]`` -> ``[..., out]``: the base output plus every active,
    unmerged adapter, computed in the base's compute dtype and returned in
    ``x``'s (under autocast: the autocast dtype). A mixed-adapter batch
    (``layer.row_adapter_names``) goes through the layer's multi-adapter op.
    """
    autocast = autocast_enabled(x)
    kind = layer.base_kind
    if layer.row_adapter_names is not None and not layer.adapters_disabled:
        inputs, _, bias, plain, _ = kind.setup(layer, x, autocast, rows=True)
        if layer.lora_variant:  # DoRA rows scale W x + s B A x, then the bias is added
            result = layer._dora_rows(layer._row_adapter_forward(inputs, plain(inputs, None)),
                                      bias)
        else:
            result = layer._row_adapter_forward(inputs, plain(inputs, bias))
        return result if autocast else result.to(x.dtype)
    active = layer._unmerged_active()
    merged_weight = kind.quantized and kind.uses_merged_weight(layer)
    if not active and not merged_weight:
        return layer.base_layer(x)
    if merged_weight and any(name in layer.lora_variant for name in active):
        raise ValueError(f"DoRA adapters {[n for n in active if n in layer.lora_variant]} "
                         "cannot run on top of a dense merged weight "
                         "(keep_merged_weight=True); merge them too or unmerge first")
    inputs, dtype, bias, plain, fused = kind.setup(layer, x, autocast)
    if active:
        result = adapters_forward(layer, active, inputs, bias, dtype, fused, plain)
    else:
        result = plain(inputs, bias)
    return result if autocast else result.to(x.dtype)


def adapters_forward(layer, active: list[str], inputs: torch.Tensor,
                     bias: Optional[torch.Tensor], dtype: torch.dtype, fused: Callable,
                     plain: Callable) -> torch.Tensor:
    """``W inputs + bias`` plus the ``active`` adapters: the first rides on the
    base's fused op (a variant such as DoRA builds its output from it), the
    others are added on top in Python.

    The family gives each adapter's factors: ``layer._op_factors(name, rows,
    dtype)`` for the fused op, ``layer._tail_factors(name, dtype)`` for the rest.
    """
    def fused_for(name):
        return lambda rows, bias, lora_input: fused(
            rows, bias, *layer._op_factors(name, rows, dtype), layer.scaling[name], lora_input)

    first = active[0]
    variant = layer.lora_variant.get(first)
    if variant is None:
        result = fused_for(first)(inputs, bias, layer._lora_input(inputs, first))
    else:
        result = variant.linear_forward(layer, first, inputs, bias,
                                        layer._lora_input(inputs, first), fused_for(first),
                                        plain, dtype)
    for name in active[1:]:
        branch = layer._lora_input(inputs, name)
        branch = inputs if branch is None else branch
        variant = layer.lora_variant.get(name)
        if variant is not None:
            result = variant.extra_linear_term(layer, name, result, branch, fused_for(name),
                                               plain)
            continue
        factor_A, factor_B = layer._tail_factors(name, dtype)
        result = result + ((branch @ factor_A.T) @ factor_B.T) * layer.scaling[name]
    return result

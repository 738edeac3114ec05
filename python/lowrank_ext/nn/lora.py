"""LoRA layers: a frozen base layer plus ``scaling * B @ A`` per named adapter.

Layouts follow PEFT so adapters move between the two libraries unchanged:
``lora_A[name]`` is a layer mapping ``in -> r`` and ``lora_B[name]`` one
mapping ``r -> out`` (for linear layers their weights are ``[r, in]`` and
``[out, r]``); embeddings use raw ``lora_embedding_A[name]`` ``[r, num_embeddings]``
and ``lora_embedding_B[name]`` ``[embedding_dim, r]``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_layer import AdapterLayer
from .bases import DENSE_LINEAR, is_transformers_conv1d, linear_forward
from .dora import DORA, _tensor_key, dense_row_sq_norms
from .mixed_batch import RowAdapterLayer

Init = Union[bool, str]
_INIT_CHOICES = (True, False, "default", "gaussian", "pissa")
# Up to this many rows a bfloat16/float16 call computes the low-rank term in
# float32 (see LoRALayer._op_factors); it matches the NF4 GEMV's row limit.
FEW_ROWS = 16


def validate_adapter_arguments(r, alpha, dropout) -> None:
    """Raise ``ValueError`` unless ``r`` is a positive int, ``alpha`` > 0 and 0 <= ``dropout`` < 1."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r (the adapter rank) must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 \
            or not math.isfinite(alpha):
        raise ValueError(f"alpha (lora_alpha) must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout (lora_dropout) must be in [0, 1), got {dropout!r}")


def check_conv_mergeable(base: nn.Module, what: str) -> None:
    """Refuse to merge ``what`` into a padded convolution whose ``padding_mode`` is not zeros.

    Adapters on convolutions pad with zeros, as PEFT's do, whatever the base's
    ``padding_mode``; a merged kernel would be padded the base's way instead,
    which computes another function wherever the padding is read.
    """
    padded = (any(k > 1 for k in base.kernel_size) if base.padding == "same"
              else base.padding != "valid" and any(base.padding))
    if base.padding_mode != "zeros" and padded:
        raise ValueError(f"{what} on a convolution with padding_mode={base.padding_mode!r} pads "
                         "with zeros (as PEFT's does) and cannot be merged: the merged kernel "
                         "would be padded the base's way")


class LoRALayer(RowAdapterLayer, AdapterLayer):
    """LoRA bookkeeping shared by every LoRA layer kind.

    Per adapter: ``r``, ``lora_alpha``, ``scaling`` (``alpha / r``, or
    ``alpha / sqrt(r)`` with rsLoRA) and ``lora_dropout`` (probability applied
    to the adapter branch's input only, in training).
    """

    adapter_dict_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        # DoRA magnitudes (PEFT's name and file key), for adapters with use_dora.
        self.lora_magnitude_vector = nn.ParameterDict()
        # {adapter name: variant object} for adapters that are not plain LoRA
        # (PEFT's lora_variant); the variant computes their forward and merge.
        self.lora_variant: dict[str, object] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self._init_row_adapters()

    def update_layer(self, adapter_name: str, r: int, alpha: float, dropout: float = 0.0,
                     use_rslora: bool = False, init: Init = True, use_dora: bool = False) -> None:
        """Add (or replace) adapter ``adapter_name`` and make it active.

        Args:
            r: rank, a positive int.
            alpha: scale numerator, > 0.
            dropout: probability in [0, 1) for the adapter branch's input.
            use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
            init: ``True``/``"default"`` (A Kaiming-uniform with a=sqrt(5), B zero:
                the adapter starts as the identity), ``"gaussian"`` (A ~ N(0, 1/r)),
                ``"pissa"`` (principal singular directions of the base weight;
                rewrites the base as ``W - scaling * B @ A``) or ``False``
                (both factors random: the adapter changes the output at once).
            use_dora: DoRA (weight-decomposed LoRA, see :mod:`lowrank_ext.nn.dora`):
                adds the magnitude ``lora_magnitude_vector[adapter_name]``,
                initialized to the norm of the adapted weight per output unit.

        Raises ``ValueError`` for out-of-range arguments or an init this layer kind lacks.
        """
        validate_adapter_arguments(r, alpha, dropout)
        if isinstance(init, str) and init == "loftq":
            raise ValueError(f"init 'loftq' is not available for {type(self).__name__}: LoftQ "
                             "quantizes the base with the factors; use "
                             "QLoRALinear.from_linear(linear, init='loftq') or QLoRAModule")
        if init not in _INIT_CHOICES:
            raise ValueError(f"init_lora_weights must be one of {_INIT_CHOICES}, got {init!r}")
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {use_dora!r}")
        if use_dora:
            self._check_dora_supported()
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before replacing it")
        self._forget_variant(adapter_name)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(alpha)
        self.scaling[adapter_name] = float(alpha) / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = float(dropout)
        self._create_factors(adapter_name, r)
        self._initialize(adapter_name, init)
        if use_dora:
            DORA.init(self, adapter_name)
        if adapter_name not in self.active_adapters:
            self.set_adapter(self.active_adapters + [adapter_name])
        else:
            self.set_adapter(self.active_adapters)

    def _create_factors(self, adapter_name: str, r: int) -> None:
        # Linear kinds (any base): lora_A maps in -> r, lora_B r -> out.
        options = self.base_kind.factor_options(self)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **options)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **options)

    def _factor_tensors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as the parameters that hold them (layout depends on the layer kind)."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def _initialize(self, adapter_name: str, init: Init) -> None:
        factor_A, factor_B = self._factor_tensors(adapter_name)
        with torch.no_grad():
            if init == "pissa":
                self._initialize_pissa(adapter_name)
            elif init is False:
                # Both random (nn.Linear's default init), so the adapter is not a no-op.
                nn.init.kaiming_uniform_(factor_A, a=math.sqrt(5))
                nn.init.kaiming_uniform_(factor_B, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(factor_A, std=1.0 / self.r[adapter_name])
                nn.init.zeros_(factor_B)
            else:
                nn.init.kaiming_uniform_(factor_A, a=math.sqrt(5))
                nn.init.zeros_(factor_B)

    def _initialize_pissa(self, adapter_name: str) -> None:
        raise ValueError(f"init 'pissa' is not available for {type(self).__name__}")

    def _forget_adapter(self, adapter_name: str) -> None:
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout):
            table.pop(adapter_name, None)
        self._forget_variant(adapter_name)

    def _forget_variant(self, adapter_name: str) -> None:
        variant = self.lora_variant.pop(adapter_name, None)
        if variant is not None:
            variant.forget(self, adapter_name)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]

    # ------------------------------------------------------------------ DoRA
    # How this layer kind's weight looks to the DoRA variant (see
    # lowrank_ext.nn.dora): here a dense weight whose first dimension is the
    # output unit; kinds with another layout override these.

    def _check_dora_supported(self) -> None:
        """Raise ``ValueError`` when DoRA cannot run on this layer."""

    def _dora_units(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def _dora_from_units(self, units: torch.Tensor) -> torch.Tensor:
        return units

    def _dora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._factor_tensors(adapter_name)

    def _dora_row_sq_norms(self) -> torch.Tensor:
        return dense_row_sq_norms(self._dora_units(self._dense_base_weight()))

    def _dora_apply_weight(self, factor_A: torch.Tensor) -> torch.Tensor:
        units = self._dora_units(self._dense_base_weight().detach())
        return F.linear(factor_A.to(units.dtype), units)

    def _dora_base_key(self) -> tuple:
        return _tensor_key(self._dense_base_weight())

    def _dora_magnitude_shape(self, units: int) -> tuple[int, ...]:
        return (units,)

    def _op_factors(self, adapter_name: str, inputs: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A, lora_B) for the fused ops: cast to ``dtype``, except that
        float32 factors stay float32 with a bfloat16/float16 input of at most
        ``FEW_ROWS`` rows (decoding): the op then computes the low-rank term in
        float32, which at a few rows is several times faster than ATen's
        bfloat16 GEMMs, needs no cast per call and is more accurate."""
        factor_A, factor_B = self._factor_tensors(adapter_name)
        if (factor_A.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)
                and inputs.numel() <= FEW_ROWS * inputs.shape[-1]):
            return factor_A, factor_B
        return factor_A.to(dtype), factor_B.to(dtype)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, laid out like the base weight (linear kinds:
        ``[out, in]``, or ``[in, out]`` with ``fan_in_fan_out``)."""
        factor_A, factor_B = self._factor_tensors(adapter_name)
        delta = (factor_B.detach().float() @ factor_A.detach().float()) * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

    def _tail_factors(self, adapter_name: str,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in ``dtype``, for an adapter added on top of the fused op's output."""
        factor_A, factor_B = self._factor_tensors(adapter_name)
        return factor_A.to(dtype), factor_B.to(dtype)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: r={self.r[name]}, alpha={self.lora_alpha[name]:g}"
                         for name in self.adapter_names)


class LoRALinear(LoRALayer):
    """LoRA on ``nn.Linear`` or Hugging Face's ``Conv1D`` (``fan_in_fan_out``).

    ``forward(x)``: ``x`` is ``[..., in_features]``; returns ``[..., out_features]``
    = ``base(x) + sum_a scaling_a * dropout_a(x) @ A_a.T @ B_a.T`` over the
    active, unmerged adapters, computed by the fused :func:`lowrank_ext.ops.lora_linear`
    in the base weight's dtype (``x`` is cast to it and the result cast back).
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, init: Init = True, adapter_name: str = "default",
                 fan_in_fan_out: Optional[bool] = None, use_dora: bool = False):
        if not isinstance(base_layer, nn.Linear) and not is_transformers_conv1d(base_layer):
            raise TypeError(f"LoRALinear wraps nn.Linear or transformers Conv1D, got "
                            f"{type(base_layer).__name__}")
        super().__init__(base_layer)
        self.base_kind = DENSE_LINEAR
        self.base_kind.attach(self, fan_in_fan_out)
        self.update_layer(adapter_name, r, alpha, dropout, use_rslora, init, use_dora)

    def _initialize_pissa(self, adapter_name):
        factor_A, factor_B = self._factor_tensors(adapter_name)
        weight = self._oriented_weight().detach().float()
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        left, singular, right_t = torch.linalg.svd(weight, full_matrices=False)
        root = (singular[:r] / scaling).sqrt()
        factor_A.copy_(root[:, None] * right_t[:r])
        factor_B.copy_(left[:, :r] * root[None, :])
        residual = weight - scaling * factor_B @ factor_A
        self._dense_base_weight().copy_(residual.T if self.fan_in_fan_out else residual)

    def _oriented_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a view for Conv1D)."""
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    # DoRA sees the weight as [out, in] (Conv1D's [in, out] transposed).
    def _dora_units(self, tensor):
        return tensor.t() if self.fan_in_fan_out else tensor

    _dora_from_units = _dora_units

    supports_row_adapters = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(self, x)


class LoRAConv(LoRALayer):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

    ``lora_A`` is a convolution ``in -> r`` with the base layer's kernel, stride
    and padding, as PEFT builds it: zero-padded whatever the base's
    ``padding_mode``, so a file means the same function in both libraries.
    Merging such an adapter into a padded base of another ``padding_mode``
    is refused (the merged kernel would be padded the base's way). A dilated
    base (dilation > 1 along a kernel wider than 1) is refused: PEFT has no
    dilated ``lora_A``. ``lora_B`` is a 1x1 convolution ``r -> out``.
    ``forward(x)`` = ``base(x) + scaling * B(A(dropout(x)))``, shaped like ``base(x)``.
    On a grouped convolution (``groups > 1``), as in PEFT, ``lora_B`` has the
    base's groups (so ``r`` must be a multiple of them) and ``lora_A`` does
    not; the update then mixes channels across groups, which the base kernel
    cannot hold, so such adapters cannot be merged.
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False, init: Init = True, adapter_name: str = "default",
                 use_dora: bool = False):
        if not isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"LoRAConv wraps nn.Conv1d/2d/3d, got {type(base_layer).__name__}")
        if any(d != 1 and k != 1 for d, k in zip(base_layer.dilation, base_layer.kernel_size)):
            raise ValueError(f"LoRA on a dilated convolution (dilation={base_layer.dilation}) is "
                             "not supported: PEFT builds lora_A without the dilation, so the "
                             "same adapter file would compute another function there (or fail)")
        super().__init__(base_layer)
        self.update_layer(adapter_name, r, alpha, dropout, use_rslora, init, use_dora)

    def update_layer(self, adapter_name, r, alpha, dropout=0.0, use_rslora=False, init=True,
                     use_dora=False):
        groups = self.base_layer.groups
        if groups > 1 and isinstance(r, int) and r % groups:
            raise ValueError(f"r (the adapter rank) must be a multiple of the convolution's "
                             f"groups={groups} on a grouped convolution, got {r}")
        super().update_layer(adapter_name, r, alpha, dropout, use_rslora, init, use_dora)

    def _check_dora_supported(self):
        if self.base_layer.groups > 1:
            raise ValueError(f"use_dora on a grouped convolution (groups="
                             f"{self.base_layer.groups}) is not supported: the grouped update "
                             "mixes channels across groups, so the adapted kernel whose norm "
                             "DoRA takes does not exist (PEFT's norm there is not that of the "
                             "function it computes)")

    # DoRA's units are output channels: the kernel seen as [out, in * k...].
    def _dora_units(self, tensor):
        return tensor.flatten(1)

    def _dora_from_units(self, units):
        return units.reshape(self.base_layer.weight.shape)

    def _dora_factors(self, adapter_name):
        factor_A, factor_B = self._factor_tensors(adapter_name)
        return factor_A.flatten(1), factor_B.flatten(1)

    def _dora_magnitude_shape(self, units):
        return (1, units) + (1,) * (self.base_layer.weight.dim() - 2)

    def _create_factors(self, adapter_name, r):
        base = self.base_layer
        conv = type(base)
        options = self.base_kind.factor_options(self)
        self.lora_A[adapter_name] = conv(
            base.in_channels, r, base.kernel_size, stride=base.stride, padding=base.padding,
            bias=False, **options)
        self.lora_B[adapter_name] = conv(r, base.out_channels, 1, groups=base.groups, bias=False,
                                         **options)

    def delta_weight(self, adapter_name):
        if self.base_layer.groups > 1:
            raise ValueError(f"an adapter on a grouped convolution (groups="
                             f"{self.base_layer.groups}) mixes channels across groups and "
                             "cannot be merged into its weight")
        factor_A, factor_B = self._factor_tensors(adapter_name)
        # B is 1x1, so the composed kernel is B's channel mix applied to A's kernel.
        mix = factor_B.detach().float().flatten(1)
        delta = torch.einsum("or,ri...->oi...", mix, factor_A.detach().float())
        return delta * self.scaling[adapter_name]

    def _merge_adapter(self, adapter_name, safe_merge):
        check_conv_mergeable(self.base_layer, "a LoRA adapter")
        return super()._merge_adapter(adapter_name, safe_merge)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_output = result = self.base_layer(x)
        for name in self._unmerged_active():
            dropped = self._lora_input(x, name)
            branch = x if dropped is None else dropped
            factor_A, factor_B = self.lora_A[name], self.lora_B[name]
            update = factor_B(factor_A(branch.to(factor_A.weight.dtype))) * self.scaling[name]
            variant = self.lora_variant.get(name)
            if variant is None:
                result = result + update.to(result.dtype)
                continue
            # DoRA as PEFT: (g - 1) * W xd + g * s * B A xd, W xd from the base
            # output less its bias without dropout, else by a zero-padded convolution.
            view = (1, -1) + (1,) * (result.dim() - 2)
            scale = variant.scale(self, name, result.dtype).view(view)
            base = self.base_layer
            if dropped is None:
                plain = base_output if base.bias is None else base_output - base.bias.view(view)
            else:
                convolution = (F.conv1d, F.conv2d, F.conv3d)[base.weight.dim() - 3]
                plain = convolution(dropped.to(base.weight.dtype), base.weight, None, base.stride,
                                    base.padding, base.dilation, base.groups).to(result.dtype)
            result = result + (scale - 1) * plain + scale * update.to(result.dtype)
        return result


class LoRAEmbedding(LoRALayer):
    """LoRA on ``nn.Embedding``: ``base(ids) + scaling * embed(ids, A.T) @ B.T``.

    ``lora_embedding_A[name]`` is ``[r, num_embeddings]``, ``lora_embedding_B[name]``
    ``[embedding_dim, r]`` (raw parameters, as PEFT stores them). Dropout does
    not apply to integer ids.
    """

    adapter_dict_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Embedding, r: int = 8, alpha: float = 8,
                 dropout: float = 0.0, use_rslora: bool = False, init: Init = True,
                 adapter_name: str = "default", use_dora: bool = False):
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        del self.lora_A, self.lora_B
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.update_layer(adapter_name, r, alpha, dropout, use_rslora, init, use_dora)

    def _create_factors(self, adapter_name, r):
        options = self.base_kind.factor_options(self)
        count, dim = self.base_layer.weight.shape
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, count, **options))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(dim, r, **options))

    def _factor_tensors(self, adapter_name):
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def _initialize(self, adapter_name, init):
        factor_A, factor_B = self._factor_tensors(adapter_name)
        if init is True or init == "default" or init == "gaussian":
            # A zero and B normal: the adapter starts as the identity (PEFT's choice).
            with torch.no_grad():
                nn.init.zeros_(factor_A)
                nn.init.normal_(factor_B)
        else:
            super()._initialize(adapter_name, init)

    def delta_weight(self, adapter_name):
        factor_A, factor_B = self._factor_tensors(adapter_name)
        delta = factor_B.detach().float() @ factor_A.detach().float()
        return delta.T * self.scaling[adapter_name]

    # DoRA's units are embedding dimensions (PEFT's): columns of the [num, dim] table.
    def _dora_units(self, tensor):
        return tensor.t()

    _dora_from_units = _dora_units

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(ids)
        base = self.base_layer
        for name in self._unmerged_active():
            factor_A, factor_B = self._factor_tensors(name)
            rows = F.embedding(ids, factor_A.T, base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)
            update = ((rows @ factor_B.T) * self.scaling[name]).to(result.dtype)
            variant = self.lora_variant.get(name)
            if variant is None:
                result = result + update
            else:  # DoRA as PEFT: g * (running output + s * B A at the ids)
                result = variant.scale(self, name, result.dtype) * (result + update)
        return result

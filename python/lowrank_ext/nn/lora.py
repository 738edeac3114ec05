"""LoRA layers: a frozen base layer plus ``scaling * B @ A`` per named adapter.

Layouts follow PEFT so adapters move between the two libraries unchanged:
``lora_A[name]`` is a layer mapping ``in -> r`` and ``lora_B[name]`` one
mapping ``r -> out`` (for linear layers their weights are ``[r, in]`` and
``[out, r]``); embeddings use raw ``lora_embedding_A[name]`` ``[r, num_embeddings]``
and ``lora_embedding_B[name]`` ``[embedding_dim, r]``.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _C, ops
from .adapter_layer import AdapterLayer, adapter_dropout
from .bases import DENSE_LINEAR, linear_forward
from .dora import DORA, _tensor_key, dense_row_sq_norms

Init = Union[bool, str]
_INIT_CHOICES = (True, False, "default", "gaussian", "pissa")
# Up to this many rows a bfloat16/float16 call computes the low-rank term in
# float32 (see LoRALayer._op_factors); it matches the NF4 GEMV's row limit.
FEW_ROWS = 16
# Per-row adapter name meaning "no adapter" in mixed-adapter batches (PEFT's name).
BASE_ROW = "__base__"
# Key of the per-row adapter names a mixed-adapter call records in the metadata
# of the autograd nodes it created (see record_row_adapters).
ROW_NAMES_KEY = "lowrank_ext.adapter_names"
# A leaf whose views number the autograd nodes created from here on.
_NODE_PROBE = torch.zeros((), requires_grad=True)


def row_adapters_in_use(names: Optional[tuple[str, ...]]) -> Optional[tuple[str, ...]]:
    """The per-row adapter names a layer call uses: ``names`` (those set on the
    layer) in a forward. Inside backward, where activation checkpointing runs a
    block's forward again after the call that set the names has returned (and
    reset them), the names recorded on the node being run by the forward that
    created it (None: that forward had none)."""
    node = torch._C._current_autograd_node()
    if node is None:
        return names
    return node.metadata.get(ROW_NAMES_KEY)


@torch.compiler.disable
def next_node_number() -> int:
    """Sequence number of the next autograd node created in this thread."""
    return _NODE_PROBE.view(()).grad_fn._sequence_nr() + 1


@torch.compiler.disable
def record_row_adapters(outputs, names: tuple[str, ...], first: int) -> None:
    """Record ``names`` on every autograd node behind ``outputs`` numbered ``first``
    or later (those the call created), for :func:`row_adapters_in_use`.

    Any of them may be the one running when a checkpointed block is
    recomputed: the checkpoint's own node (reentrant checkpointing) or whichever
    node of the block first needs a dropped tensor (non-reentrant). Nodes of
    earlier calls keep their own names.
    """
    pending = [tensor.grad_fn for tensor in _output_tensors(outputs)
               if tensor.grad_fn is not None]
    seen = set()
    while pending:
        node = pending.pop()
        if node is None or node in seen or node._sequence_nr() < first:
            continue
        seen.add(node)
        node.metadata[ROW_NAMES_KEY] = names
        pending.extend(child for child, _ in node.next_functions)


def _output_tensors(value) -> list[torch.Tensor]:
    """The tensors in a model output: a tensor, or nested mappings (Hugging Face's
    ModelOutput), lists and tuples of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _output_tensors(item)]
    return []


# Parameters registered (or replaced) on any module since the first
# mixed-adapter batch, counted by one global hook installed then; the LoRA
# layers' stacked-factor caches compare it instead of visiting every factor.
_registrations = [0]
_registration_hook = None


def _parameter_registrations() -> int:
    global _registration_hook
    if _registration_hook is None:
        def count(module, name, parameter):
            _registrations[0] += 1

        _registration_hook = torch.nn.modules.module.register_module_parameter_registration_hook(
            count)
    return _registrations[0]


def is_transformers_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's GPT-2 style ``Conv1D`` (a linear layer with weight ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


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


def _adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # Adapter factors are trained, so they are kept in fp32 whatever the base
    # dtype (Adam on bf16 parameters loses small updates); forward casts them
    # to the compute dtype, which is cheap at rank r. A float64 base keeps
    # float64 factors (as PEFT does), so gradcheck can perturb them too.
    if weight_dtype == torch.float64:
        return weight_dtype
    return torch.float32 if weight_dtype.is_floating_point else weight_dtype


class RowAdapterLayer:
    """Mixed-adapter batches for an adapter layer (mixed into an :class:`AdapterLayer`).

    Row ``i`` of the input gets ``scaling[name] * x_i @ A.T @ B.T`` for adapter
    ``name = names[i]``, where ``(A, B)`` (``[r, in]``, ``[out, r]``, any ``r``
    per adapter) come from :meth:`_held_factors`. Hosts call
    :meth:`_init_row_adapters` in ``__init__``, set ``supports_row_adapters``
    and call :meth:`_row_adapter_forward` from ``forward`` when
    :attr:`row_adapter_names` is set. With ``reuse_row_stack`` the stacked
    factors are kept between calls without autograd (the factors must then
    be the parameters themselves, held in ``lora_A`` / ``lora_B`` module dicts).
    """

    supports_row_adapters = False
    reuse_row_stack = True

    def _init_row_adapters(self) -> None:
        # Plain attributes (not parameters or modules): skip nn.Module.__setattr__'s checks.
        self.__dict__["_row_names"] = None
        self.__dict__["_row_indices"] = None
        self.__dict__["_row_stack"] = None

    def set_row_adapters(self, names: Optional[Sequence[str]]) -> None:
        """Use adapter ``names[i]`` for row ``i`` of the next inputs (None: back to normal).

        A row named :data:`BASE_ROW` (``"__base__"``) or an adapter this layer
        does not hold gets the base output. Only layers with
        ``supports_row_adapters`` accept this.
        """
        if names is not None and not self.supports_row_adapters:
            raise NotImplementedError(
                f"per-row adapter names are supported on linear LoRA and AdaLoRA layers, not on "
                f"{type(self).__name__}")
        self.__dict__["_row_names"] = (
            None if names is None else names if isinstance(names, tuple) else tuple(names))

    @property
    def row_adapter_names(self) -> Optional[tuple[str, ...]]:
        """The per-row adapter names this call uses (see :func:`row_adapters_in_use`)."""
        return row_adapters_in_use(self.__dict__.get("_row_names"))

    def _row_adapter_forward(self, inputs: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """``base_output`` plus each row's own adapter, in one multi-adapter op.

        Every held adapter's factors are stacked in one buffer kept between
        calls (refreshed in one copy, see :meth:`_stacked`), and the row ->
        adapter indices computed once per batch of names, so the per-call work
        does not grow with a per-adapter loop. Dropout does not
        apply here. Raises ``ValueError`` when the number of names differs from
        the batch size or an adapter is merged.
        """
        names = self.row_adapter_names
        if len(names) != inputs.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has "
                             f"{inputs.shape[0]} rows")
        if self.merged_adapters:
            raise ValueError(f"unmerge adapters {self.merged_adapters} before running "
                             f"mixed-adapter batches")
        # The stack and indices are host-side cache bookkeeping (Python objects,
        # a C++ fingerprint): under torch.compile they run outside the graph.
        prepare = (_prepare_rows_outside_graph if torch.compiler.is_compiling()
                   else RowAdapterLayer._prepare_rows)
        operands = prepare(self, names, inputs.dtype, inputs.device)
        if operands is None:
            return base_output
        return ops.multi_lora_linear(inputs, base_output, *operands)

    def _prepare_rows(self, names: tuple[str, ...], dtype: torch.dtype,
                      device: torch.device) -> Optional[tuple]:
        """(lora_A, lora_B, ranks, scalings, indices) for multi_lora_linear; None if no row
        has an adapter."""
        if torch.is_grad_enabled() or not self.reuse_row_stack:
            # Part of this call's graph (training, or gradients for the inputs), or
            # factors computed per call: built anew.
            held, lora_A, lora_B, ranks, scalings = self._stack_factors(
                self._held_factors(), dtype, device)
            indices, _ = self._indices(names, held, device)
        else:
            (held, lora_A, lora_B, ranks, scalings), fresh = self._stacked(dtype, device)
            indices, used = self._indices(names, held, device)
            if indices is not None and not fresh:
                self._refresh_stack(used)
        return None if indices is None else (lora_A, lora_B, ranks, scalings, indices)

    def _indices(self, names: tuple[str, ...], held: tuple[str, ...],
                 device: torch.device) -> tuple[Optional[torch.Tensor], tuple[int, ...]]:
        """(int64 index of each row's adapter in ``held`` (-1: none), or None when no row
        has one; the positions in ``held`` that some row uses).

        Remembered for the last (names, held, device): a model's layers share
        one names tuple per call, and a server often repeats a batch's names.
        """
        cached = self._row_indices
        if (cached is not None and (cached[0] is names or cached[0] == names)
                and cached[1] == held and cached[2] == device):
            return cached[3]
        position = {name: index for index, name in enumerate(held)}
        values = [position.get(name, -1) for name in names]
        used = tuple(sorted({value for value in values if value >= 0}))
        indices = torch.tensor(values, dtype=torch.int64, device=device) if used else None
        self.__dict__["_row_indices"] = (names, held, device, (indices, used))
        return indices, used

    def _stacked(self, dtype: torch.dtype, device: torch.device) -> tuple[tuple, bool]:
        """((held names, lora_A, lora_B, ranks, scalings) of every held adapter, stacked;
        whether the stack was built by this call), for calls without autograd.

        The stack's buffers are reused while the factors they were built from
        are the same tensors of the same shapes, checked in two cheap steps (a
        walk over the factors' Python objects right after a large GEMM, with
        them out of the caches, cost a third of the multi-adapter op): the
        structure, by identity (the factor modules, names and scale objects,
        and the count of parameter registrations anywhere, which moves when a
        factor parameter is replaced); then the factors' version counters and
        data addresses in one C++ pass (``p.data = ...`` moves the address).
        Replacements that bypass both (``_apply``) drop the cache explicitly.
        Writes through ``p.data`` (EMA, hot-swapped weights) move neither, so
        a reused stack is refreshed from the factors the batch uses on every
        call (:meth:`_refresh_stack`).
        """
        # A stack made in inference mode cannot be written outside it.
        structure = (_parameter_registrations(), tuple(self.lora_A._modules.items()),
                     tuple(self.lora_B._modules.values()), tuple(self.scaling.values()),
                     dtype, device, torch.is_inference_mode_enabled())
        cached = self._row_stack
        if cached is not None and cached[0] == structure and \
                _C.tensor_fingerprint(cached[1]) == cached[2]:
            return cached[3], False
        held_factors = self._held_factors()
        stacked = self._stack_factors(held_factors, dtype, device)
        factors = [factor for pair in held_factors.values() for factor in pair]
        _, lora_A, lora_B, ranks, _ = stacked
        # (stack slice, factor) pairs per held adapter, for the refresh.
        copies = [((lora_A[index, :a.shape[0]], a), (lora_B[index, :, :b.shape[1]], b))
                  for index, (a, b) in enumerate(held_factors.values())]
        self.__dict__["_row_stack"] = (structure, factors, _C.tensor_fingerprint(factors),
                                       stacked, copies)
        return stacked, True

    def _refresh_stack(self, used: tuple[int, ...]) -> None:
        """Copy the used adapters' factors into the reused stack, in one foreach op.

        In-place writes through ``p.data`` bump no version counter (``p.data``
        is a new tensor with its own) and keep the address, so no cheap check
        sees them; rereading the factors the op is about to read anyway costs
        about as much as the op reads and never serves stale values.
        """
        copies = self._row_stack[4]
        pairs = [pair for index in used for pair in copies[index]]
        torch._foreach_copy_([target for target, _ in pairs], [factor for _, factor in pairs])

    def _held_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (A, B)} of every held adapter, in lora_A's order (what the rows use)."""
        return {name: self._factor_tensors(name) for name in self.lora_A.keys()}

    def _stack_factors(self, held_factors: dict, dtype: torch.dtype,
                       device: torch.device) -> tuple:
        held = tuple(held_factors)
        factors = list(held_factors.values())
        lora_A, lora_B, ranks = ops.stack_lora_factors([a.to(dtype) for a, _ in factors],
                                                       [b.to(dtype) for _, b in factors])
        scalings = torch.tensor([self.scaling[name] for name in held], dtype=torch.float32,
                                device=device)
        return held, lora_A, lora_B, ranks, scalings

    def _apply(self, *args, **kwargs):
        # .to() / .half() / to_empty() may swap parameters in place of the
        # module's (bypassing the registration count): forget the stack.
        self.__dict__["_row_stack"] = None
        return super()._apply(*args, **kwargs)


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
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)
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
        raise NotImplementedError

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

    def _dora_rows(self, result: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """A mixed-adapter batch with DoRA adapters: ``result`` holds each row's
        ``W x + s B A x`` (no bias); scale every row by its adapter's
        ``m / ||W + s B A||`` (1 for plain LoRA and base rows) and add the bias."""
        names = self.row_adapter_names
        position: dict[str, int] = {}
        scales: list[Optional[torch.Tensor]] = []
        index = []
        for name in names:
            if name not in position:
                position[name] = len(scales)
                variant = self.lora_variant.get(name)
                scales.append(None if variant is None else variant.scale(self, name, result.dtype))
            index.append(position[name])
        units = result.shape[-1]
        ones = result.new_ones(units)
        table = torch.stack([ones if scale is None else scale for scale in scales])
        rows = table[torch.tensor(index, device=result.device)]
        result = result * rows.view(rows.shape[0], *([1] * (result.dim() - 2)), units)
        return result if bias is None else result + bias.to(result.dtype)

    def _lora_input(self, x: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        return adapter_dropout(x, self.lora_dropout[adapter_name], self.training)

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

    def _tail_factors(self, adapter_name: str,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in ``dtype``, for an adapter added on top of the fused op's output."""
        factor_A, factor_B = self._factor_tensors(adapter_name)
        return factor_A.to(dtype), factor_B.to(dtype)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: r={self.r[name]}, alpha={self.lora_alpha[name]:g}"
                         for name in self.adapter_names)


_prepare_rows_outside_graph = torch.compiler.disable(RowAdapterLayer._prepare_rows)


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
        conv1d = is_transformers_conv1d(base_layer)
        if not isinstance(base_layer, nn.Linear) and not conv1d:
            raise TypeError(f"LoRALinear wraps nn.Linear or transformers Conv1D, got "
                            f"{type(base_layer).__name__}")
        super().__init__(base_layer)
        self.base_kind = DENSE_LINEAR
        # Conv1D stores its weight as [in, out], the transpose of nn.Linear's.
        self.fan_in_fan_out = conv1d if fan_in_fan_out is None else bool(fan_in_fan_out)
        if self.fan_in_fan_out and not conv1d:
            raise ValueError("fan_in_fan_out=True needs a weight stored as [in, out] (Conv1D); "
                             "this nn.Linear stores [out, in]")
        in_out = tuple(base_layer.weight.shape)
        self.out_features, self.in_features = in_out[::-1] if self.fan_in_fan_out else in_out
        self.update_layer(adapter_name, r, alpha, dropout, use_rslora, init, use_dora)

    def _create_factors(self, adapter_name, r):
        weight = self.base_layer.weight
        options = dict(device=weight.device, dtype=_adapter_dtype(weight.dtype))
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **options)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **options)

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

    def delta_weight(self, adapter_name):
        factor_A, factor_B = self._factor_tensors(adapter_name)
        delta = (factor_B.detach().float() @ factor_A.detach().float()) * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

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
        options = dict(device=base.weight.device, dtype=_adapter_dtype(base.weight.dtype))
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
        weight = self.base_layer.weight
        options = dict(device=weight.device, dtype=_adapter_dtype(weight.dtype))
        count, dim = weight.shape
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

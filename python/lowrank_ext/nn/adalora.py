"""AdaLoRA (Zhang et al., ICLR 2023): an SVD-shaped adapter whose rank is allocated globally.

Each adapted weight gets ``W + scaling * P diag(lambda) Q``. The layout is
PEFT's, so adapters move both ways between the two libraries: per adapter the
raw parameters ``lora_B[name]`` = P ``[out, r]``, ``lora_E[name]`` = lambda
``[r, 1]`` and ``lora_A[name]`` = Q ``[r, in]`` (on ``nn.Conv2d``, ``in`` is
``in_channels * kh * kw``: the kernel seen as a matrix). One (P column, lambda entry,
Q row) is a *triplet*. :class:`RankAllocator` scores triplets by smoothed
sensitivity and keeps the globally best ``b(t)`` of them, so the total rank
shrinks from ``sum(init_r)`` to ``target_r * layers`` over training.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .adapter_layer import AdapterLayer
from .bases import DENSE_LINEAR, NF4, linear_forward
from .lora import check_conv_mergeable, is_transformers_conv1d, validate_adapter_arguments
from .mixed_batch import RowAdapterLayer
from .nf4_linear import NF4Linear

# (parameter container, dimension that indexes triplets) for each factor.
_TRIPLET_DIMENSIONS = (("lora_A", 0), ("lora_E", 0), ("lora_B", 1))
# The Gaussian std PEFT initializes P and Q with; kept so inits are comparable.
_FACTOR_STD = 0.02
_INIT_CHOICES = (True, False, "default")

# {parameter: (triplet dimension, kept indices, shape before shrinking)}
Resized = dict[nn.Parameter, tuple[int, torch.Tensor, torch.Size]]


class TripletSlots(nn.Module):
    """Which triplets of one adapter are in the budget, and where they came from.

    Buffers (non-persistent, they move with the layer):
        slots: ``long [r]``; ``slots[k]`` is the index, among the ``init_r``
            triplets the adapter was created with, of physical triplet ``k``
            (they differ once the factors are shrunk).
        keep: ``float [r, 1]``; 1.0 for a triplet in the budget, 0.0 for a
            masked one. Forward multiplies lambda by it, so a masked triplet
            contributes nothing whatever the optimizer does to its lambda.
    """

    def __init__(self, slots: torch.Tensor):
        super().__init__()
        self.register_buffer("slots", slots, persistent=False)
        self.register_buffer("keep", torch.ones(len(slots), 1, device=slots.device),
                             persistent=False)
        # Mirrors "keep is all ones" on the host, so forward can skip the mask
        # without a device sync (and torch.compile sees a plain bool).
        self.fully_active = True

    def set_keep(self, kept: torch.Tensor) -> None:
        """Replace the mask by ``kept`` (``bool [r]``)."""
        self.keep = kept.to(device=self.keep.device, dtype=self.keep.dtype).view(-1, 1)
        self.fully_active = bool(kept.all())

    def select(self, index: torch.Tensor) -> None:
        """Keep only the physical triplets at ``index`` (after shrinking)."""
        self.slots = self.slots[index]
        self.set_keep(self.keep.view(-1)[index] > 0)


class AdaLoRALayer(AdapterLayer):
    """The triplet machinery of an AdaLoRA layer, whatever its base.

    Per adapter: ``lora_A`` (Q ``[r, in_features]``), ``lora_E`` (lambda
    ``[r, 1]``), ``lora_B`` (P ``[out_features, r]``) and their
    :class:`TripletSlots`; rank queries, masking, shrinking, the effective
    factors, the orthogonality residuals, merging into a dense base weight
    and PEFT's state-dict layout. :class:`RankAllocator` and
    :class:`~lowrank_ext.AdaLoRAModule` treat every subclass alike.

    Subclasses set ``in_features`` / ``out_features`` (the base weight seen
    as an ``[out, in]`` matrix) before :meth:`update_layer`, and implement
    ``forward`` and :meth:`_as_weight`.

    Scale: ``scaling = lora_alpha / init_r``, fixed when the adapter is
    created and never recomputed from the current rank, so masking or
    shrinking triplets never rescales the ones kept (PEFT has the same
    value, with ``1e-5`` added to its denominator: a relative difference
    below ``1e-6``). A rank of 0 is valid: forward is then the base layer.

    Masked triplets keep their lambda at zero (see :meth:`set_kept`);
    :meth:`shrink` drops them physically once the allocation is final.
    """

    adapter_dict_names = ("lora_A", "lora_E", "lora_B")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.triplets = nn.ModuleDict()
        self.init_r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}

    # ----------------------------------------------------------------- adapters

    def update_layer(self, adapter_name: str, init_r: int, alpha: float, dropout: float = 0.0,
                     init: Union[bool, str] = True,
                     rank_pattern: Optional[Sequence[bool]] = None) -> None:
        """Add (or replace) adapter ``adapter_name`` and make it active.

        Args:
            init_r: the rank the adapter is created with (positive int); also
                the constant in ``scaling = alpha / init_r``.
            alpha: scale numerator, > 0.
            dropout: probability in [0, 1) on the adapter branch's input.
            init: ``True``/``"default"`` (lambda zero, P and Q ~ N(0, 0.02^2):
                the adapter starts as the identity) or ``False`` (lambda ~
                N(0, 1) too, so the adapter changes the output at once).
            rank_pattern: an allocation already made (``init_r`` booleans,
                True = kept): only the kept triplets are created, as when
                loading a pruned adapter.

        Raises ``ValueError`` for out-of-range arguments or a pattern whose
        length is not ``init_r``.
        """
        validate_adapter_arguments(init_r, alpha, dropout)
        if init not in _INIT_CHOICES:
            raise ValueError(f"init_lora_weights must be one of {_INIT_CHOICES} for AdaLoRA, "
                             f"got {init!r}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before replacing it")
        if rank_pattern is None:
            slots = list(range(init_r))
        else:
            rank_pattern = [bool(kept) for kept in rank_pattern]
            if len(rank_pattern) != init_r:
                raise ValueError(f"rank_pattern has {len(rank_pattern)} entries; the adapter "
                                 f"was created with init_r={init_r}")
            slots = [slot for slot, kept in enumerate(rank_pattern) if kept]
        rank = len(slots)
        options = self.base_kind.factor_options(self)
        device = options["device"]
        self.init_r[adapter_name] = init_r
        self.lora_alpha[adapter_name] = float(alpha)
        self.scaling[adapter_name] = float(alpha) / init_r
        self.lora_dropout[adapter_name] = float(dropout)
        self.lora_A[adapter_name] = nn.Parameter(torch.empty(rank, self.in_features, **options))
        self.lora_E[adapter_name] = nn.Parameter(torch.empty(rank, 1, **options))
        self.lora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, rank, **options))
        self.triplets[adapter_name] = TripletSlots(torch.tensor(slots, dtype=torch.long,
                                                                device=device))
        with torch.no_grad():
            nn.init.normal_(self.lora_A[adapter_name], std=_FACTOR_STD)
            nn.init.normal_(self.lora_B[adapter_name], std=_FACTOR_STD)
            if init is False:
                nn.init.normal_(self.lora_E[adapter_name])
            else:
                nn.init.zeros_(self.lora_E[adapter_name])
        names = self.active_adapters if adapter_name in self.active_adapters \
            else self.active_adapters + [adapter_name]
        self.set_adapter(names)

    def _forget_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.triplets:
            del self.triplets[adapter_name]
        for table in (self.init_r, self.lora_alpha, self.scaling, self.lora_dropout):
            table.pop(adapter_name, None)

    # ------------------------------------------------------------ rank queries

    def rank(self, adapter_name: str) -> int:
        """The physical rank: triplets stored, masked ones included."""
        return self.lora_E[adapter_name].shape[0]

    def kept(self, adapter_name: str) -> torch.Tensor:
        """``bool [rank]``: which stored triplets are in the budget."""
        return self.triplets[adapter_name].keep.view(-1) > 0

    def active_rank(self, adapter_name: str) -> int:
        """How many triplets are in the budget (what the adapter's rank effectively is)."""
        return int(self.kept(adapter_name).sum().item())

    def rank_pattern(self, adapter_name: str) -> list[bool]:
        """``init_r`` booleans, True for each original triplet still kept (PEFT's format)."""
        pattern = [False] * self.init_r[adapter_name]
        kept = self.kept(adapter_name).tolist()
        for slot, is_kept in zip(self.triplets[adapter_name].slots.tolist(), kept):
            pattern[slot] = is_kept
        return pattern

    # ----------------------------------------------------------------- masking

    def set_kept(self, adapter_name: str, kept: torch.Tensor) -> None:
        """Put exactly the triplets where ``kept`` (``bool [rank]``) is True in the budget.

        The lambda of every masked triplet is set to zero (a triplet that
        comes back later restarts from lambda = 0, as in the paper).
        Raises ``ValueError`` for a wrong length.
        """
        if kept.shape != (self.rank(adapter_name),):
            raise ValueError(f"kept must be a bool tensor of shape ({self.rank(adapter_name)},), "
                             f"got {tuple(kept.shape)}")
        self.triplets[adapter_name].set_keep(kept)
        self.zero_masked(adapter_name)

    def zero_masked(self, adapter_name: str) -> None:
        """Set lambda of the masked triplets back to zero (the optimizer may have moved it)."""
        slots = self.triplets[adapter_name]
        if slots.fully_active:
            return
        keep = slots.keep
        with torch.no_grad():
            self.lora_E[adapter_name].mul_(keep.to(self.lora_E[adapter_name].dtype))

    def shrink(self, adapter_name: str) -> Resized:
        """Drop the masked triplets physically; outputs are unchanged.

        ``lora_A``/``lora_E``/``lora_B`` keep their :class:`~torch.nn.Parameter`
        objects (their contents, ``.grad`` included, are swapped for the kept
        rows/columns with :func:`torch.utils.swap_tensors`), so optimizers
        still hold them; only optimizer *state* of the old shape must be
        sliced the same way (the returned map says how;
        :meth:`lowrank_ext.AdaLoRAModule.refresh_optimizer` does it). Graphs
        built before the shrink can no longer be backpropagated.

        Returns ``{parameter: (triplet dimension, kept indices, old shape)}``
        (empty when nothing was masked).
        """
        if self.triplets[adapter_name].fully_active:
            return {}
        index = self.kept(adapter_name).nonzero().view(-1)
        resized: Resized = {}
        for dict_name, dimension in _TRIPLET_DIMENSIONS:
            parameter = getattr(self, dict_name)[adapter_name]
            old_shape = parameter.shape
            smaller = nn.Parameter(parameter.detach().index_select(dimension, index),
                                   requires_grad=parameter.requires_grad)
            if parameter.grad is not None:
                smaller.grad = parameter.grad.index_select(dimension, index)
            # Swapping (rather than assigning .data) also gives the parameter a
            # fresh autograd accumulator, which would otherwise keep the old shape.
            torch.utils.swap_tensors(parameter, smaller)
            resized[parameter] = (dimension, index, old_shape)
        self.triplets[adapter_name].select(index)
        return resized

    # ------------------------------------------------------------------ compute

    def _masked_values(self, adapter_name: str) -> torch.Tensor:
        values = self.lora_E[adapter_name]
        slots = self.triplets[adapter_name]
        return values if slots.fully_active else values * slots.keep.to(values.dtype)

    def effective_factors(self, adapter_name: str,
                          dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q * masked lambda, P)``: ``[r, in]`` and ``[out, r]``, differentiable.

        The update is ``scaling * P @ (Q * lambda)``, so these are the plain
        LoRA ``(A, B)`` of the same update.
        """
        factor_A = self.lora_A[adapter_name] * self._masked_values(adapter_name)
        factor_B = self.lora_B[adapter_name]
        if dtype is not None:
            factor_A, factor_B = factor_A.to(dtype), factor_B.to(dtype)
        return factor_A, factor_B

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * P @ (Q * masked lambda)`` in fp32, laid out like the base weight."""
        with torch.no_grad():
            factor_A, factor_B = self.effective_factors(adapter_name, torch.float32)
            delta = (factor_B @ factor_A) * self.scaling[adapter_name]
        return self._as_weight(delta)

    def _as_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """The ``[out_features, in_features]`` update in the base weight's layout."""
        raise NotImplementedError

    def orthogonality_residuals(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q Q^T - I, P^T P - I)``, both ``[r, r]`` in fp32, differentiable.

        Every stored triplet counts, masked ones too (they stay orthonormal
        so that they can come back).
        """
        factor_A = self.lora_A[adapter_name].float()
        factor_B = self.lora_B[adapter_name].float()
        identity = torch.eye(factor_A.shape[0], device=factor_A.device)
        return factor_A @ factor_A.T - identity, factor_B.T @ factor_B - identity

    # The family's factors for the linear forward (lowrank_ext.nn.bases): the
    # fused op takes Q scaled row-wise by the masked lambda as its lora_A.
    def _op_factors(self, adapter_name: str, inputs: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.effective_factors(adapter_name, dtype)

    def _tail_factors(self, adapter_name: str,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.effective_factors(adapter_name, dtype)

    # ------------------------------------------------------------ serialization

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """``lora_A`` / ``lora_E`` / ``lora_B`` of the kept triplets only (PEFT's layout).

        While triplets are masked these are copies (sliced by the mask);
        once every stored triplet is kept they share the parameters' storage.
        """
        state = super().adapter_state_dict(adapter_name)
        if self.triplets[adapter_name].fully_active:
            return state
        index = self.kept(adapter_name).nonzero().view(-1)
        return {key: value.index_select(dict(_TRIPLET_DIMENSIONS)[key], index)
                for key, value in state.items()}

    def load_adapter_state(self, adapter_name: str, state: dict[str, torch.Tensor],
                           where: str = "") -> None:
        """Copy saved tensors in; see :meth:`AdapterLayer.load_adapter_state`.

        Raises ``ValueError`` while triplets are masked but not yet shrunk
        (the file holds fewer triplets than the layer stores).
        """
        if not self.triplets[adapter_name].fully_active:
            raise ValueError(f"{where or type(self).__name__}: adapter {adapter_name!r} is in "
                             "the middle of a rank allocation; load into a fresh layer instead")
        super().load_adapter_state(adapter_name, state, where)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: rank={self.active_rank(name)}/{self.init_r[name]}, "
                         f"alpha={self.lora_alpha[name]:g}" for name in self.adapter_names)


class AdaLoRALinear(RowAdapterLayer, AdaLoRALayer):
    """AdaLoRA on ``nn.Linear``, Hugging Face ``Conv1D`` or a 4-bit :class:`NF4Linear` base.

    ``forward(x)``: ``x`` ``[..., in_features]`` -> ``[..., out_features]`` =
    ``base(x) + scaling * dropout(x) @ (Q * (lambda * keep)).T @ P.T``, one
    fused :func:`lowrank_ext.ops.lora_linear` (dense base) or
    :func:`lowrank_ext.ops.qlora_linear` (NF4 base) call for the first active
    adapter: Q scaled row-wise by the masked lambda is passed as the fused
    op's ``lora_A``. It runs in the base weight's dtype (NF4: its compute
    dtype) and returns ``x``'s dtype. Triplets, scale and allocation: see
    :class:`AdaLoRALayer`. On an NF4 base, merging works as QLoRA's
    (:class:`~lowrank_ext.nn.bases.NF4Base`: one requantization for all the
    adapters merged, or ``keep_merged_weight=True``).

    Mixed-adapter batches (``set_row_adapters``) give each row its adapter's
    update, whatever the adapters' ranks, in one multi-adapter op over the
    effective factors ``(Q * masked lambda, P)``.
    """

    def __init__(self, base_layer: nn.Module, init_r: int = 12, alpha: float = 8,
                 dropout: float = 0.0, init: Union[bool, str] = True,
                 adapter_name: str = "default", rank_pattern: Optional[Sequence[bool]] = None,
                 fan_in_fan_out: Optional[bool] = None):
        quantized = isinstance(base_layer, NF4Linear)
        if not (isinstance(base_layer, nn.Linear) or is_transformers_conv1d(base_layer)
                or quantized):
            raise TypeError(f"AdaLoRALinear wraps nn.Linear, transformers Conv1D or NF4Linear, "
                            f"got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.base_kind = NF4 if quantized else DENSE_LINEAR
        self.base_kind.attach(self, fan_in_fan_out)
        self._init_row_adapters()
        self.update_layer(adapter_name, init_r, alpha, dropout, init, rank_pattern)

    def _as_weight(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.fan_in_fan_out else delta

    supports_row_adapters = True
    # The rows' factors are products (Q * masked lambda) made per call: nothing to keep.
    reuse_row_stack = False

    def _held_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: self.effective_factors(name) for name in self.lora_A.keys()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(self, x)


class AdaLoRAConv2d(AdaLoRALayer):
    """AdaLoRA on ``nn.Conv2d``, as PEFT's ``SVDConv2d`` computes it.

    The kernel ``[out, in, kh, kw]`` is seen as the matrix
    ``[out, in * kh * kw]`` (so ``in_features = in_channels * kh * kw``):
    ``lora_A`` (Q) is ``[r, in_channels * kh * kw]``, ``lora_B`` (P)
    ``[out_channels, r]``, ``lora_E`` ``[r, 1]``, PEFT's names and shapes,
    so files move both ways. ``forward(x)`` = ``base(x) + scaling *
    conv2d(dropout(x), (P @ (Q * masked lambda)).view(kernel shape))``
    with the base's stride, padding and dilation, padded with zeros whatever
    the base's ``padding_mode`` (PEFT's function). It is computed as an
    ``r``-channel convolution by ``Q * lambda`` followed by a 1x1 one by
    ``P`` (``r * (in * kh * kw + out)`` multiply-adds per output pixel
    instead of ``out * in * kh * kw``), in the factors' dtype, and returned
    in the base output's dtype.

    Merging adds that kernel to the base's (unmerging subtracts it); it is
    refused on a padded base whose ``padding_mode`` is not ``"zeros"`` (the
    merged kernel would be padded the base's way). Grouped convolutions are
    refused: the factors span every input channel, which a grouped kernel
    cannot hold (PEFT's forward fails on them).
    """

    def __init__(self, base_layer: nn.Conv2d, init_r: int = 12, alpha: float = 8,
                 dropout: float = 0.0, init: Union[bool, str] = True,
                 adapter_name: str = "default", rank_pattern: Optional[Sequence[bool]] = None):
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"AdaLoRAConv2d wraps nn.Conv2d, got {type(base_layer).__name__}")
        if base_layer.groups != 1:
            raise ValueError(f"AdaLoRA on a grouped convolution (groups={base_layer.groups}) is "
                             "not supported: its factors span every input channel, which the "
                             "grouped kernel cannot hold (PEFT's forward fails on it too)")
        super().__init__(base_layer)
        self.out_features = base_layer.out_channels
        self.in_features = base_layer.in_channels * math.prod(base_layer.kernel_size)
        self.update_layer(adapter_name, init_r, alpha, dropout, init, rank_pattern)

    def _as_weight(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.view(self.base_layer.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        result = base(x)
        for name in self._unmerged_active():
            if self.rank(name) == 0:
                continue
            branch = self._lora_input(x, name)
            branch = x if branch is None else branch
            factor_A, factor_B = self.effective_factors(name)
            kernel = factor_A.view(-1, base.in_channels, *base.kernel_size)
            hidden = nn.functional.conv2d(branch.to(kernel.dtype), kernel, stride=base.stride,
                                          padding=base.padding, dilation=base.dilation)
            update = nn.functional.conv2d(hidden, factor_B[:, :, None, None])
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> float:
        check_conv_mergeable(self.base_layer, "an AdaLoRA adapter")
        return super()._merge_adapter(adapter_name, safe_merge)


class RankAllocator:
    """Global triplet budget of one AdaLoRA adapter over a set of layers (paper §3).

    Importance, per entry ``w`` of P, lambda and Q, after each backward:
    sensitivity ``I = |w * dL/dw|``; smoothed ``I_bar = beta1 * I_bar +
    (1 - beta1) * I``; uncertainty ``U_bar = beta2 * U_bar + (1 - beta2) *
    |I - I_bar|`` (with the new ``I_bar``); score ``s = I_bar * U_bar``. A
    triplet's score is ``s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)``.

    Budget (total kept rank) at step ``t``, with ``T = total_step``:
    ``init = sum(initial ranks)`` while ``t <= tinit``; then
    ``b(t) = floor(target + (init - target) * (1 - (t - tinit) /
    (T - tfinal - tinit))**3)`` with ``target = target_r * layers``; every
    ``deltaT`` steps the ``b(t)`` best triplets over all layers are kept
    (ties go to the earlier layer / lower index) and the rest masked, until
    at ``t >= T - tfinal`` the target budget is allocated one last time and
    the pattern is frozen; :meth:`shrink` then drops the masked triplets
    physically (the caller decides when: it reshapes the factors under any
    optimizer that holds them). Between reallocations
    the kept set, and so the total active rank, does not change. Budgets are
    clamped to ``[0, stored triplets]``.

    Attributes:
        initial_budget, target_budget: the two ends of the schedule.
        budget: the budget in force (of the last allocation).
        allocations: how many times triplets were (re)selected.
        frozen: True once the final allocation is made.
        resized: after :meth:`shrink`, what :meth:`AdaLoRALayer.shrink`
            changed, for refreshing optimizer state.
    """

    def __init__(self, layers: Iterable[tuple[str, AdaLoRALayer]], adapter_name: str,
                 target_r: int, total_step: int, tinit: int = 0, tfinal: int = 0,
                 deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                 frozen: bool = False):
        self.layers = [(path, layer) for path, layer in layers]
        self.adapter_name = adapter_name
        self.total_step, self.tinit, self.tfinal, self.deltaT = total_step, tinit, tfinal, deltaT
        self.beta1, self.beta2 = beta1, beta2
        self.initial_budget = sum(layer.rank(adapter_name) for _, layer in self.layers)
        self.target_budget = min(target_r * len(self.layers), self.initial_budget)
        self.budget = sum(layer.active_rank(adapter_name) for _, layer in self.layers)
        self.frozen = frozen
        self.resized: Resized = {}
        # {(path, factor name): (smoothed sensitivity, uncertainty)}
        self.importance: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.importance_updates = 0
        self.allocations = 0

    @property
    def final_step(self) -> int:
        """The step at which the allocation is made final: ``total_step - tfinal``."""
        return self.total_step - self.tfinal

    def scheduled_budget(self, step: int) -> int:
        """``b(step)`` of the schedule (see the class docstring), clamped to ``[0, total]``."""
        if step <= self.tinit:
            budget = self.initial_budget
        elif step >= self.final_step:
            budget = self.target_budget
        else:
            remaining = 1.0 - (step - self.tinit) / (self.final_step - self.tinit)
            budget = math.floor(self.target_budget
                                + (self.initial_budget - self.target_budget) * remaining ** 3)
        total = sum(layer.rank(self.adapter_name) for _, layer in self.layers)
        return max(0, min(int(budget), total))

    def active_rank(self) -> int:
        """Triplets currently in the budget, over all layers."""
        return sum(layer.active_rank(self.adapter_name) for _, layer in self.layers)

    def rank_pattern(self) -> dict[str, list[bool]]:
        """``{"<module path>.lora_E": init_r booleans}``, as PEFT stores the allocation."""
        return {f"{path}.lora_E": layer.rank_pattern(self.adapter_name)
                for path, layer in self.layers}

    # --------------------------------------------------------------- importance

    def update_importance(self) -> None:
        """Fold the current gradients into the smoothed scores.

        Call after backward, while the gradients are there. A factor without
        a gradient (its layer took no part in the loss) counts as zero
        sensitivity. Does nothing once frozen.

        Raises ``RuntimeError`` when no factor has a gradient (called after
        ``zero_grad()`` or before ``backward()``).
        """
        if self.frozen:
            return
        name = self.adapter_name
        found = False
        with torch.no_grad():
            for path, layer in self.layers:
                for dict_name, _ in _TRIPLET_DIMENSIONS:
                    parameter = getattr(layer, dict_name)[name]
                    if parameter.grad is None:
                        sensitivity = torch.zeros_like(parameter, dtype=torch.float32)
                    else:
                        found = True
                        sensitivity = (parameter.float() * parameter.grad.float()).abs()
                    key = (path, dict_name)
                    smoothed, uncertainty = self.importance.get(
                        key, (torch.zeros_like(sensitivity), torch.zeros_like(sensitivity)))
                    smoothed = self.beta1 * smoothed + (1 - self.beta1) * sensitivity
                    uncertainty = (self.beta2 * uncertainty
                                   + (1 - self.beta2) * (sensitivity - smoothed).abs())
                    self.importance[key] = (smoothed, uncertainty)
        if not found:
            raise RuntimeError("AdaLoRA importance needs gradients, but no adapter factor has "
                               "one: call it after loss.backward() and before zero_grad()")
        self.importance_updates += 1

    def triplet_scores(self) -> list[torch.Tensor]:
        """Per layer (in order), the ``[rank]`` triplet scores ``S_i`` (fp32)."""
        scores = []
        for path, layer in self.layers:
            parts = {}
            for dict_name, _ in _TRIPLET_DIMENSIONS:
                smoothed, uncertainty = self.importance[(path, dict_name)]
                parts[dict_name] = smoothed * uncertainty
            scores.append(parts["lora_E"].view(-1) + parts["lora_A"].mean(dim=1)
                          + parts["lora_B"].mean(dim=0))
        return scores

    # --------------------------------------------------------------- allocation

    def allocate(self, step: int) -> bool:
        """Apply the schedule at ``step``; call once per optimizer step, after it.

        Reallocates when ``tinit < step < T - tfinal`` and ``step % deltaT ==
        0``; at the first call with ``step >= T - tfinal`` allocates the
        target budget and freezes the pattern (masked, not shrunk: see
        :meth:`shrink`). On every call before that the lambda of masked
        triplets is zeroed again; afterwards the mask alone keeps them out.

        Returns True when this call froze the pattern. Raises
        ``RuntimeError`` if an allocation is due but importance was never
        updated.
        """
        if self.frozen:
            return False
        final = step >= self.final_step
        if final or (step > self.tinit and step % self.deltaT == 0):
            self._mask_to_budget(self.scheduled_budget(step))
        for _, layer in self.layers:
            layer.zero_masked(self.adapter_name)
        if not final:
            return False
        self.frozen = True
        self.importance.clear()
        return True

    @property
    def shrunk(self) -> bool:
        """True when no layer stores a masked triplet (nothing left to shrink)."""
        return all(layer.triplets[self.adapter_name].fully_active for _, layer in self.layers)

    def shrink(self) -> Resized:
        """Drop the masked triplets of every layer once the pattern is frozen.

        Returns what changed (also merged into ``resized``), empty when
        already shrunk. Raises ``RuntimeError`` before the final allocation:
        a masked triplet may still come back then.
        """
        if not self.frozen:
            raise RuntimeError(f"the AdaLoRA allocation is not final yet (it is at step "
                               f"total_step - tfinal = {self.final_step}); masked triplets "
                               "may still come back, so they cannot be dropped")
        resized: Resized = {}
        for _, layer in self.layers:
            resized.update(layer.shrink(self.adapter_name))
        self.resized.update(resized)
        return resized

    def _mask_to_budget(self, budget: int) -> None:
        if self.importance_updates == 0:
            raise RuntimeError("an AdaLoRA allocation is due but importance was never updated; "
                               "call update_importance() after each backward (or "
                               "update_and_allocate / attach_optimizer on the wrapper)")
        scores = self.triplet_scores()
        flat = torch.cat([score.cpu() for score in scores]) if scores else torch.zeros(0)
        order = torch.sort(flat, descending=True, stable=True).indices
        kept = torch.zeros(flat.numel(), dtype=torch.bool)
        kept[order[:budget]] = True
        start = 0
        for (_, layer), score in zip(self.layers, scores):
            layer.set_kept(self.adapter_name, kept[start:start + score.numel()])
            start += score.numel()
        self.budget = budget
        self.allocations += 1

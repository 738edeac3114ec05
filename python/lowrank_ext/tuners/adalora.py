"""AdaLoRA: its configuration (PEFT's field names) and the model wrapper that runs the allocation.

Unlike PEFT, the allocation cannot be forgotten: :meth:`AdaLoRAModule.attach_optimizer`
runs it from optimizer hooks, :meth:`AdaLoRAModule.update_and_allocate` does
the same from a custom loop, and backward passes that pile up with neither
raise an error. When the pattern is final the factors are physically shrunk
where that cannot break the caller's optimizer (see :class:`AdaLoRAModule`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

from ..nn import NF4Linear, is_transformers_conv1d
from ..nn.adalora import AdaLoRALinear, RankAllocator
from ..nn.lora import validate_adapter_arguments
from .config import (_BIAS_MODES, LoRAConfig, TargetSpec, check_peft_options,
                     check_flags, normalized_target_modules, with_task_heads)
from .model import AdapterModel
from .serialization import register_adapter_type

_ORTH_REG_FORMS = ("paper", "peft")
_INIT_CHOICES = (True, False, "default")
# The training-only option PEFT's AdaLoraConfig lacks; left out of adapter_config.json.
_NOT_IN_PEFT = ("orth_reg_form",)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class AdaLoRAConfig:
    """Settings of one AdaLoRA adapter (field names and defaults as PEFT's ``AdaLoraConfig``).

    Attributes:
        init_r: rank every targeted layer starts with (positive int).
        target_r: average rank at the end: the final budget is
            ``target_r * number of layers`` (0 <= target_r <= init_r).
        total_step: number of optimizer steps of the training (required).
        tinit: warm-up steps with the full budget (importance is gathered).
        tfinal: final steps with the pattern frozen (and factors shrunk);
            the budget decreases cubically in between, so
            ``tinit < total_step - tfinal`` is required.
        deltaT: reallocate every ``deltaT`` steps (>= 1).
        beta1, beta2: smoothing of sensitivity and of its uncertainty, in [0, 1).
        orth_reg_weight: weight gamma (>= 0) of the orthogonality penalty.
        orth_reg_form: ``"peft"`` (default): the mean, over all P and Q, of
            ``||P^T P - I||_F`` and ``||Q Q^T - I||_F``, PEFT's penalty, so a
            PEFT recipe's ``orth_reg_weight`` means the same objective here;
            ``"paper"``: ``sum over layers of ||P^T P - I||_F^2 +
            ||Q Q^T - I||_F^2`` (the paper's form; tens of times larger on a
            small model, so tune ``orth_reg_weight`` for it). Not stored in
            ``adapter_config.json`` (PEFT has no such field).
        rank_pattern: an allocation already made,
            ``{"<module path>.lora_E": init_r booleans}`` as PEFT stores it;
            layers named there are built with the kept triplets only, and the
            allocation counts as finished. Kept up to date during training.
        lora_alpha: scale numerator (> 0); the scale is ``lora_alpha / init_r``
            and never changes when ranks are pruned.
        lora_dropout: dropout probability in [0, 1) on the adapter input.
        target_modules, bias, modules_to_save, fan_in_fan_out,
            base_model_name_or_path, task_type: as in :class:`LoRAConfig`.
        init_lora_weights: True (lambda zero, P and Q ~ N(0, 0.02^2)) or False
            (lambda random too).
        r: PEFT's LoRA rank field; AdaLoRA ignores it (use ``init_r``).

    Raises ``ValueError`` naming the field for a missing ``total_step``, an
    impossible schedule, ``target_r > init_r`` or any out-of-range value.
    """

    peft_type: ClassVar[str] = "ADALORA"

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict[str, list[bool]]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: TargetSpec = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    fan_in_fan_out: bool = False
    orth_reg_form: str = "peft"
    r: int = 8
    base_model_name_or_path: Optional[str] = None
    task_type: Optional[str] = None

    # Same keyword handling (aliases alpha/dropout/init, unknown names raise).
    from_kwargs = classmethod(LoRAConfig.from_kwargs.__func__)

    def __post_init__(self):
        if self.total_step is None:
            raise ValueError("total_step is required for AdaLoRA: the number of optimizer "
                             "steps the budget schedule spans")
        if not _is_int(self.total_step) or self.total_step <= 0:
            raise ValueError(f"total_step must be a positive integer, got {self.total_step!r}")
        if not _is_int(self.init_r) or self.init_r <= 0:
            raise ValueError(f"init_r (the initial rank) must be a positive integer, "
                             f"got {self.init_r!r}")
        validate_adapter_arguments(self.init_r, self.lora_alpha, self.lora_dropout)
        if not _is_int(self.target_r) or not 0 <= self.target_r <= self.init_r:
            raise ValueError(f"target_r must be an integer in [0, init_r={self.init_r}], "
                             f"got {self.target_r!r}")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit ({self.tinit}) must be < total_step - tfinal "
                             f"({self.total_step} - {self.tfinal}): the schedule leaves no "
                             "steps to reduce the budget")
        if not _is_int(self.deltaT) or self.deltaT < 1:
            raise ValueError(f"deltaT must be an integer >= 1, got {self.deltaT!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if isinstance(self.orth_reg_weight, bool) or not isinstance(
                self.orth_reg_weight, (int, float)) or not self.orth_reg_weight >= 0 \
                or not math.isfinite(self.orth_reg_weight):
            raise ValueError(f"orth_reg_weight must be a finite number >= 0, "
                             f"got {self.orth_reg_weight!r}")
        if self.orth_reg_form not in _ORTH_REG_FORMS:
            raise ValueError(f"orth_reg_form must be one of {_ORTH_REG_FORMS}, "
                             f"got {self.orth_reg_form!r}")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"bias must be one of {_BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in _INIT_CHOICES:
            raise ValueError(f"init_lora_weights must be one of {_INIT_CHOICES} for AdaLoRA, "
                             f"got {self.init_lora_weights!r}")
        self.target_modules = normalized_target_modules(self.target_modules)
        self.modules_to_save = with_task_heads(self.task_type, self.modules_to_save)
        check_flags(self, "fan_in_fan_out")
        if self.rank_pattern == {}:
            self.rank_pattern = None
        for key, pattern in (self.rank_pattern or {}).items():
            if not isinstance(pattern, (list, tuple)) or len(pattern) != self.init_r \
                    or not all(isinstance(kept, bool) or kept in (0, 1) for kept in pattern):
                raise ValueError(f"rank_pattern[{key!r}] must be {self.init_r} (init_r) "
                                 f"booleans, got {pattern!r}")
        if self.r != 8:
            warnings.warn("AdaLoRA ignores r; the initial rank is init_r", UserWarning,
                          stacklevel=3)

    # ------------------------------------------------------------ PEFT format

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT's ``AdaLoraConfig`` reads."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in _NOT_IN_PEFT}
        if values["rank_pattern"] is not None:
            values["rank_pattern"] = {key: [bool(kept) for kept in pattern]
                                      for key, pattern in values["rank_pattern"].items()}
        if values["init_lora_weights"] == "default":
            values["init_lora_weights"] = True
        values["peft_type"] = self.peft_type
        values["inference_mode"] = True
        return values

    @classmethod
    def from_peft_dict(cls, values: dict[str, Any]) -> "AdaLoRAConfig":
        """Parse an ``adapter_config.json`` dict written by PEFT or by this library.

        PEFT fields AdaLoRA does not use are ignored unless they change the
        computation, which raises ``ValueError``.
        """
        peft_type = values.get("peft_type")
        if peft_type != cls.peft_type:
            raise ValueError(f"adapter_config.json has peft_type {peft_type!r}; "
                             f"{cls.__name__} loads {cls.peft_type!r}")
        names = {f.name for f in dataclasses.fields(cls)} - set(_NOT_IN_PEFT)
        check_peft_options(values, names)
        kept = {key: value for key, value in values.items() if key in names}
        with warnings.catch_warnings():
            # PEFT writes its (ignored) r whatever it is; no need to warn on load.
            warnings.simplefilter("ignore", UserWarning)
            return cls(**kept)


class _CountBackward:
    """Post-accumulate-grad hook on one factor of an adapter: tells the wrapper
    that a backward pass ran (a class, not a closure, so it is named by module)."""

    def __init__(self, wrapper: "AdaLoRAModule", adapter_name: str):
        self.wrapper, self.adapter_name = wrapper, adapter_name

    def __call__(self, parameter: torch.Tensor) -> None:
        self.wrapper._count_backward(self.adapter_name)


class _AllocationHooks:
    """Handle returned by :meth:`AdaLoRAModule.attach_optimizer`; ``remove()`` detaches."""

    def __init__(self, wrapper: "AdaLoRAModule", optimizer: torch.optim.Optimizer, handles):
        self.wrapper, self.optimizer, self.handles = wrapper, optimizer, handles

    def remove(self) -> None:
        """Stop running the allocation from this optimizer's steps."""
        for handle in self.handles:
            handle.remove()
        if self.optimizer in self.wrapper._attached_optimizers:
            self.wrapper._attached_optimizers.remove(self.optimizer)


class AdaLoRAModule(AdapterModel):
    """AdaLoRA on any torch model: ``AdaLoRAModule(model, config=None, **overrides)``.

    ``config`` is an :class:`AdaLoRAConfig` (``total_step`` is required);
    keyword overrides use its field names. Targeted ``nn.Linear`` / ``Conv1D``
    / :class:`~lowrank_ext.nn.NF4Linear` layers become
    :class:`~lowrank_ext.nn.AdaLoRALinear` (4-bit bases give QLoRA-style
    AdaLoRA). Only adapter parameters (and the biases / modules the config
    names) train.

    Training, either way (``step`` counts optimizer steps from 0):

    * ``model.attach_optimizer(optimizer)`` once: before each
      ``optimizer.step()`` the importance is read from the gradients, after
      it the schedule is applied (``model.allocation_step`` counts the
      steps);
    * or, in a custom loop, ``model.update_and_allocate(step)`` after
      ``optimizer.step()`` and before ``zero_grad()`` (PEFT's place; the
      importance then sees the updated weights). Calling
      ``model.update_importance()`` between ``backward()`` and
      ``optimizer.step()`` as well gives exactly the hook path.

    If neither runs, the ``unallocated_backward_limit``-th (default 50)
    backward pass without an allocation raises ``RuntimeError`` (never while
    an optimizer is attached: its steps allocate, whatever the gradient
    accumulation).

    When the pattern is final (step ``total_step - tfinal``) the masked
    triplets stay masked (exactly zero in the output, whatever an optimizer
    does to them) and the layers can be *shrunk* to their kept triplets:
    fewer parameters, less compute. Shrinking keeps the parameter objects
    but changes their shapes, so every optimizer state of the old shape must
    be sliced with them, and it happens only where the wrapper knows the
    optimizers: at the final allocation when an optimizer is attached or
    passed to :meth:`update_and_allocate` / :meth:`allocate` (those are
    refreshed), or when the caller calls :meth:`shrink`. PEFT's loop, with
    an optimizer the wrapper never saw, therefore runs on at the target
    budget without shrinking, as PEFT's does. Saving needs no shrink: the
    file holds the kept triplets only.

    The wrapper pickles (``torch.save``, ``copy.deepcopy``) whole, allocation
    state included; attached optimizers are not part of the copy: attach the
    copy's optimizer to it again.

    In training mode, ``forward`` adds :meth:`orthogonal_regularization` to
    the output's ``loss`` when it has one (a Hugging Face model given labels).

    Raises ``ValueError`` for unknown targets, out-of-range values, module
    kinds AdaLoRA does not support or a ``rank_pattern`` that does not fit.
    """

    config_class = AdaLoRAConfig
    layer_class = AdaLoRALinear

    def _setup(self, model: nn.Module) -> None:
        super()._setup(model)
        self.allocators: dict[str, RankAllocator] = {}
        self.allocation_step = 0
        self.unallocated_backward_limit: Optional[int] = 50
        self._attached_optimizers: list[torch.optim.Optimizer] = []
        # {adapter name: handle of its _CountBackward hook}; not named
        # _backward_hooks, which is nn.Module's own.
        self._backward_watchers: dict[str, Any] = {}
        self._backward_passes = 0
        # True between update_importance() and the allocate() that consumes it.
        self._importance_pending = False

    # ----------------------------------------------------------------- layers

    def _prepare_model(self, config, targets, replaced):
        known = {f"{path}.lora_E" for path in targets}
        unknown = sorted(set(config.rank_pattern or {}) - known)
        if unknown:
            raise ValueError(f"rank_pattern names modules that are not targeted: {unknown}")

    def _layer_options(self, path: str, adapter_name: str, config) -> dict[str, Any]:
        return dict(init_r=config.init_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                    init=config.init_lora_weights,
                    rank_pattern=(config.rank_pattern or {}).get(f"{path}.lora_E"))

    def _create_layer(self, module, path, adapter_name, config):
        if not (isinstance(module, (nn.Linear, NF4Linear)) or is_transformers_conv1d(module)):
            raise ValueError(f"target module {path!r} is a {type(module).__name__}; AdaLoRA "
                             "supports nn.Linear, Conv1D and NF4Linear")
        return AdaLoRALinear(module, adapter_name=adapter_name,
                             **self._layer_options(path, adapter_name, config))

    def _add_to_layer(self, layer, path, adapter_name, config):
        if not isinstance(layer, AdaLoRALinear):
            raise ValueError(f"module {path!r} already holds a {type(layer).__name__} adapter; "
                             "AdaLoRA cannot be added to it")
        layer.update_layer(adapter_name, **self._layer_options(path, adapter_name, config))

    def _adapter_layers_of(self, adapter_name: str) -> list[tuple[str, AdaLoRALinear]]:
        return [(path, layer) for path, layer in self.adapter_layers()
                if adapter_name in layer.adapter_names]

    def add_adapter(self, adapter_name: str, config=None, **kwargs: Any) -> None:
        """Inject a new AdaLoRA adapter and activate it; see :meth:`AdapterModel.add_adapter`.

        Its :class:`~lowrank_ext.nn.RankAllocator` starts at the full budget,
        or finished when the config carries a ``rank_pattern``.
        """
        super().add_adapter(adapter_name, config, **kwargs)

    def _add_adapter(self, adapter_name: str, config, strict: bool) -> None:
        super()._add_adapter(adapter_name, config, strict)
        layers = self._adapter_layers_of(adapter_name)
        self.allocators[adapter_name] = RankAllocator(
            layers, adapter_name, config.target_r, config.total_step, config.tinit,
            config.tfinal, config.deltaT, config.beta1, config.beta2,
            frozen=config.rank_pattern is not None)
        self._watch_backward(adapter_name)

    def _watch_backward(self, adapter_name: str) -> None:
        """Count the adapter's backward passes until its allocation is final."""
        allocator = self.allocators[adapter_name]
        if allocator.layers and not allocator.frozen:
            # One factor is enough to count backward passes.
            sentinel = allocator.layers[0][1].lora_E[adapter_name]
            self._backward_watchers[adapter_name] = sentinel.register_post_accumulate_grad_hook(
                _CountBackward(self, adapter_name))

    # Pickling, torch.save and deepcopy: tensor hooks and optimizer hooks are
    # not part of a copy, so the copy leaves out what refers to them (hook
    # handles, attached optimizers) and registers its own counting hooks.
    # An optimizer for the copy is attached anew.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_backward_watchers"] = {}
        state["_attached_optimizers"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for adapter_name in self.allocators:
            self._watch_backward(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its allocator; see :meth:`AdapterModel.delete_adapter`."""
        super().delete_adapter(adapter_name)
        self.allocators.pop(adapter_name, None)
        handle = self._backward_watchers.pop(adapter_name, None)
        if handle is not None:
            handle.remove()

    def _count_backward(self, adapter_name: str) -> None:
        allocator = self.allocators.get(adapter_name)
        # An attached optimizer allocates at each of its steps, however many
        # backward passes (gradient accumulation) come in between.
        if allocator is None or allocator.frozen or adapter_name != self.active_adapter \
                or self._attached_optimizers:
            return
        self._backward_passes += 1
        limit = self.unallocated_backward_limit
        if limit is not None and self._backward_passes >= limit:
            raise RuntimeError(
                f"{self._backward_passes} backward passes ran without an AdaLoRA allocation: "
                "call model.attach_optimizer(optimizer) once, or model.update_and_allocate(step) "
                "after every optimizer.step(); otherwise the ranks are never pruned. (Set "
                "model.unallocated_backward_limit higher for long gradient accumulation, or "
                "None to disable this check.)")

    # ------------------------------------------------------------- allocation

    @property
    def allocator(self) -> RankAllocator:
        """The :class:`~lowrank_ext.nn.RankAllocator` of the active adapter."""
        return self.allocators[self.active_adapter]

    def update_importance(self) -> None:
        """Fold the current gradients into the active adapter's importance scores.

        Call after ``backward()``, ideally before ``optimizer.step()`` (the
        sensitivity ``|w * grad|`` is then taken at the weights the gradient
        belongs to). Raises ``RuntimeError`` when no adapter factor has a gradient.
        """
        self.allocator.update_importance()
        self._backward_passes = 0
        self._importance_pending = True

    def allocate(self, step: int, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """Apply the budget schedule at ``step`` (after ``optimizer.step()``).

        Masks to the scheduled budget when a reallocation is due, keeps the
        masked lambdas at zero and, once the pattern is final, shrinks the
        layers if ``optimizer`` is given or one is attached (refreshing
        those; without either they stay masked, see :meth:`shrink`).
        Updates the config's ``rank_pattern``. Returns the total active rank.
        Raises ``RuntimeError`` if an allocation is due before any importance update.
        """
        allocator = self.allocator
        allocations = allocator.allocations
        froze = allocator.allocate(step)
        self.allocation_step = step + 1
        self._backward_passes = 0
        self._importance_pending = False
        if allocator.allocations != allocations:
            self.peft_config[self.active_adapter].rank_pattern = allocator.rank_pattern()
        if froze:
            handle = self._backward_watchers.pop(self.active_adapter, None)
            if handle is not None:
                handle.remove()
        optimizers = list(self._attached_optimizers)
        if optimizer is not None and optimizer not in optimizers:
            optimizers.append(optimizer)
        if allocator.frozen and optimizers and not allocator.shrunk:
            self.shrink(*optimizers)
        # Exactly `budget` triplets are kept after every allocation, so this
        # needs no device sync (unlike counting the masks).
        return allocator.budget

    def update_and_allocate(self, step: int,
                            optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """:meth:`update_importance` (unless already called since the last
        allocation) then :meth:`allocate`; the one call a custom loop needs,
        after ``optimizer.step()`` and before ``zero_grad()``.

        Pass ``optimizer`` to let the final allocation shrink the factors
        and slice its state along; without it (PEFT's loop) the pattern is
        frozen masked. Returns the total active rank.
        """
        if not self.allocator.frozen and not self._importance_pending:
            self.update_importance()
        return self.allocate(step, optimizer)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> _AllocationHooks:
        """Run the allocation from ``optimizer``'s steps; returns a handle with ``remove()``.

        A pre-step hook reads the importance from the gradients (before the
        weights change), a post-step hook applies the schedule at
        ``self.allocation_step`` (then incremented) and, at the final step,
        shrinks the factors and slices this optimizer's state along. Steps the
        optimizer skips (e.g. by a gradient scaler) are not counted.
        Raises ``ValueError`` if ``optimizer`` is already attached.
        """
        if optimizer in self._attached_optimizers:
            raise ValueError("this optimizer is already attached; attaching it twice would "
                             "allocate twice per step")

        def before_step(optimizer, args, kwargs):
            if not self.allocator.frozen:
                self.update_importance()

        def after_step(optimizer, args, kwargs):
            self.allocate(self.allocation_step, optimizer)

        handles = [optimizer.register_step_pre_hook(before_step),
                   optimizer.register_step_post_hook(after_step)]
        self._attached_optimizers.append(optimizer)
        return _AllocationHooks(self, optimizer, handles)

    def shrink(self, *optimizers: torch.optim.Optimizer) -> None:
        """Drop the masked triplets of the active adapter physically, once its
        allocation is final; outputs are unchanged.

        ``optimizers`` (and the attached ones) get their state sliced to the
        new shapes; any other optimizer holding the factors needs
        :meth:`refresh_optimizer` before its next step (until then it fails
        loudly, never silently). Does nothing when already shrunk. Raises
        ``RuntimeError`` before the final allocation.
        """
        self.allocator.shrink()
        for optimizer in list(self._attached_optimizers) + [
                each for each in optimizers if each not in self._attached_optimizers]:
            self.refresh_optimizer(optimizer)

    def refresh_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Slice ``optimizer``'s per-parameter state (momenta...) to the shrunk factors.

        Idempotent: state already of the new shape is left alone. Needed
        only for optimizers neither attached nor passed to :meth:`allocate`
        or :meth:`shrink`.
        """
        resized = {}
        for allocator in self.allocators.values():
            resized.update(allocator.resized)
        for parameter, (dimension, index, old_shape) in resized.items():
            state = optimizer.state.get(parameter)
            if not state:
                continue
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == old_shape:
                    state[key] = value.index_select(dimension, index.to(value.device))

    # --------------------------------------------------------- regularization

    def orthogonal_regularization(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """``orth_reg_weight * R``, the term to add to the loss (scalar fp32 tensor).

        ``R`` per ``orth_reg_form``: ``"peft"`` (default, equal to PEFT's
        penalty) averages ``||P^T P - I||_F`` and ``||Q Q^T - I||_F`` over all
        factors; ``"paper"`` sums ``||P^T P - I||_F^2 + ||Q Q^T - I||_F^2``
        over the adapter's layers. Zero when the adapter has no layers or the
        weight is 0.
        """
        adapter_name = adapter_name or self.active_adapter
        config = self.peft_config[adapter_name]
        terms = []
        device = None
        for _, layer in self._adapter_layers_of(adapter_name):
            for residual in layer.orthogonality_residuals(adapter_name):
                device = residual.device
                if config.orth_reg_form == "paper":
                    terms.append(residual.pow(2).sum())
                else:
                    terms.append(torch.linalg.matrix_norm(residual) if residual.numel()
                                 else residual.sum())
        if not terms or config.orth_reg_weight == 0:
            return torch.zeros((), device=device)
        total = torch.stack(terms)
        total = total.sum() if config.orth_reg_form == "paper" else total.mean()
        return config.orth_reg_weight * total

    def _enter_row_adapters(self, adapter_names):
        if self.training:
            raise ValueError("adapter_names (a mixed-adapter batch) cannot be used in training "
                             "mode with AdaLoRA: rank allocation and the orthogonal penalty "
                             "follow the active adapter only; call model.eval() first")
        return super()._enter_row_adapters(adapter_names)

    def forward(self, *args: Any, **kwargs: Any):
        """Call the wrapped model; in training, add the regularizer to ``output.loss``.

        ``adapter_names`` (a mixed-adapter batch, adapters of any ranks) is
        for evaluation mode, as in PEFT: raises ``ValueError`` in training,
        where the rank allocation and the penalty follow the active adapter only.
        """
        output = super().forward(*args, **kwargs)
        if not self.training or self.active_adapter is None:
            return output
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and self.peft_config[self.active_adapter].orth_reg_weight:
            total = loss + self.orthogonal_regularization().to(loss.dtype)
            # A Hugging Face ModelOutput is a dict that mirrors items as attributes.
            if isinstance(output, dict):
                output["loss"] = total
            else:
                output.loss = total
        return output

    # ---------------------------------------------------------- serialization

    def load_adapter_state_dict(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors into an adapter; see :meth:`AdapterModel.load_adapter_state_dict`.

        Raises ``ValueError`` if the adapter is mid-allocation (masked but
        not shrunk): saved tensors hold only kept triplets.
        """
        for path, layer in self._adapter_layers_of(adapter_name):
            if not layer.triplets[adapter_name].fully_active:
                raise ValueError(f"adapter {adapter_name!r} is in the middle of a rank "
                                 f"allocation ({path!r} has masked triplets); load into a "
                                 "fresh model instead")
        super().load_adapter_state_dict(adapter_name, state)


register_adapter_type(AdaLoRAConfig.peft_type, AdaLoRAConfig, AdaLoRAModule)

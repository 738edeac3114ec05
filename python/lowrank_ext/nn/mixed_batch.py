"""Mixed-adapter batches: row ``i`` of a batch runs adapter ``names[i]``.

Everything that mixes adapters per row lives here: the per-row names a
layer is given and their record on the autograd graph (so that blocks
recomputed in backward by activation checkpointing use the same rows), the
layer side (:class:`RowAdapterLayer`: the stacked-factor cache and the one
:func:`lowrank_ext.ops.multi_lora_linear` call per layer) and the wrapper
side (:class:`MixedBatchModel`: checking the names against the model's
layers, handing them to every layer, keeping them through ``generate``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from .. import _C, ops

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


class RowAdapterLayer:
    """Mixed-adapter batches for an adapter layer (mixed into an :class:`AdapterLayer`).

    Row ``i`` of the input gets ``scaling[name] * x_i @ A.T @ B.T`` for adapter
    ``name = names[i]``, where ``(A, B)`` (``[r, in]``, ``[out, r]``, any ``r``
    per adapter) come from :meth:`_held_factors`. Hosts call
    :meth:`_init_row_adapters` in ``__init__`` and set ``supports_row_adapters``;
    ``forward`` (:func:`lowrank_ext.nn.bases.linear_forward`) calls
    :meth:`_row_adapter_forward` when :attr:`row_adapter_names` is set, and
    :meth:`_dora_rows` after it when adapters have a variant. With ``reuse_row_stack`` the stacked
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

    def _apply(self, *args, **kwargs):
        # .to() / .half() / to_empty() may swap parameters in place of the
        # module's (bypassing the registration count): forget the stack.
        self.__dict__["_row_stack"] = None
        return super()._apply(*args, **kwargs)


_prepare_rows_outside_graph = torch.compiler.disable(RowAdapterLayer._prepare_rows)


class MixedBatchModel:
    """The wrapper side of mixed-adapter batches (mixed into a model wrapper).

    The host provides ``adapter_layers()`` (``(path, layer)`` pairs) and
    ``_modules_to_save()`` (``(path, wrapper)`` pairs), and calls
    :meth:`_enter_row_adapters` / :meth:`_leave_row_adapters` around a call
    with ``adapter_names`` (:meth:`_recorded_call` when it builds a graph).
    """

    @staticmethod
    def _recorded_call(model: nn.Module, names: tuple[str, ...], args: tuple, kwargs: dict):
        """``model(*args, **kwargs)`` with ``names`` recorded on the autograd graph it builds,
        so that blocks recomputed in backward (activation checkpointing) use the same rows."""
        first = next_node_number()
        output = model(*args, **kwargs)
        record_row_adapters(output, names, first)
        return output

    @contextlib.contextmanager
    def row_adapters(self, adapter_names: Sequence[str]) -> Iterator[None]:
        """Within the block, row ``i`` of every batch uses adapter ``adapter_names[i]``.

        Raises ``KeyError`` for a name no layer holds, ``NotImplementedError``
        when the model has adapter layers that cannot mix adapters per row
        (convolution, embedding), and ``ValueError`` (at call time)
        when the batch size differs from ``len(adapter_names)``. The adapter
        layers are looked up once and remembered (a model walk per call would
        cost more than the adapters themselves); this wrapper's own methods
        that add, remove or replace layers or adapters refresh that. With
        activation checkpointing, call the wrapper itself in the block (it
        records the rows for the recomputation in backward), not ``.model``.
        """
        layers, names = self._enter_row_adapters(adapter_names)
        outer = self.__dict__.get("_row_context")
        self.__dict__["_row_context"] = names
        try:
            yield
        finally:
            self.__dict__["_row_context"] = outer
            self._leave_row_adapters(layers)

    def _enter_row_adapters(self, adapter_names: Sequence[str]
                            ) -> tuple[list[nn.Module], tuple[str, ...]]:
        """Checks the names and hands them to every adapter layer; returns the layers
        and the names as the layers got them."""
        names = tuple(adapter_names)
        cached = self._row_layers()
        checked = self.__dict__.get("_row_names_checked")
        if checked is not None and checked[0] is cached and checked[1] == names:
            names = checked[1]  # checked before: the same tuple lets layers reuse their indices
        else:
            cached = self._check_row_names(names, cached)
            self.__dict__["_row_names_checked"] = (cached, names)
        layers = cached[0]
        for layer in layers:
            layer.set_row_adapters(names)
        return layers, names

    def _check_row_names(self, names: tuple[str, ...], cached: tuple) -> tuple:
        """Raises for names no layer holds or layers that cannot mix rows; returns the
        (possibly refreshed) _row_layers() entry."""
        layers, known, unsupported = cached
        unknown = {name for name in set(names) if name != BASE_ROW and name not in known}
        if unknown:  # maybe added to a layer directly: look again before refusing
            self._forget_row_layers()
            cached = self._row_layers()
            layers, known, unsupported = cached
            unknown = sorted(name for name in unknown if name not in known)
            if unknown:
                raise KeyError(f"adapter_names: no adapter named {unknown}; known: {sorted(known)}")
        if unsupported:
            raise NotImplementedError(f"per-row adapter_names need linear LoRA/QLoRA/AdaLoRA "
                                      f"layers; this model also has {unsupported}")
        return cached

    @staticmethod
    def _leave_row_adapters(layers: list[nn.Module]) -> None:
        for layer in layers:
            layer.set_row_adapters(None)

    def _row_layers(self) -> tuple[list[nn.Module], frozenset, list[str]]:
        """(adapter layers and modules_to_save wrappers, every adapter name they hold,
        kinds that cannot mix rows), remembered."""
        cached = self.__dict__.get("_row_layers_cache")
        if cached is None:
            layers = [layer for _, layer in self.adapter_layers()]
            known = frozenset(name for layer in layers for name in layer.adapter_names)
            # modules_to_save copies take their rows too (their own names).
            wrappers = [wrapper for _, wrapper in self._modules_to_save()]
            known |= frozenset(name for wrapper in wrappers for name in wrapper.modules_to_save)
            layers += wrappers
            unsupported = sorted({type(layer).__name__ for layer in layers
                                  if not getattr(layer, "supports_row_adapters", False)})
            cached = (layers, known, unsupported)
            self.__dict__["_row_layers_cache"] = cached
        return cached

    def _forget_row_layers(self) -> None:
        self.__dict__.pop("_row_layers_cache", None)

    @property
    def generate(self) -> Callable:
        """The wrapped model's ``generate``, which also takes ``adapter_names``.

        ``generate(..., adapter_names=[...])`` (one name per prompt,
        ``"__base__"`` for none) keeps every prompt's adapter for every step,
        including the rows generate repeats per prompt (``num_beams``,
        ``num_return_sequences``). Raises as :meth:`row_adapters` does, and
        ``ValueError`` when the names do not fit the prompts. A model without
        ``generate`` has none here either.
        """
        return functools.partial(self._generate, self._modules["model"].generate)

    def _generate(self, generate: Callable, *args: Any,
                  adapter_names: Optional[Sequence[str]] = None, **kwargs: Any):
        if adapter_names is None:
            return generate(*args, **kwargs)
        layers, names = self._enter_row_adapters(adapter_names)
        prompts = _batch_rows(args, kwargs, ("inputs", "input_ids", "inputs_embeds"))
        if prompts is not None and prompts != len(names):
            self._leave_row_adapters(layers)
            raise ValueError(f"adapter_names has {len(names)} entries but generate got "
                             f"{prompts} prompts")

        def each_step(module, step_args, step_kwargs):
            # generate repeats each prompt's row in place (repeat_interleave) for
            # beams and returned sequences; the encoder of an encoder-decoder model
            # runs before that, with the names as given.
            rows = _batch_rows(step_args, step_kwargs, (
                "decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds"))
            if rows is None or rows == len(names):
                return
            if rows % len(names):
                raise ValueError(f"adapter_names has {len(names)} entries but generate runs "
                                 f"{rows} rows")
            self._enter_row_adapters([name for name in names for _ in range(rows // len(names))])

        handle = self._modules["model"].register_forward_pre_hook(each_step, with_kwargs=True)
        try:
            return generate(*args, **kwargs)
        finally:
            handle.remove()
            self._leave_row_adapters(layers)


def _batch_rows(args: tuple, kwargs: dict, names: tuple[str, ...]) -> Optional[int]:
    """Rows of the batch a model call gets: the first of the keyword tensors
    ``names`` present, else the first positional argument if a tensor."""
    for name in names:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    return None

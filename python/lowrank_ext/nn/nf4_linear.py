"""A frozen linear layer whose weight is stored in NF4 (4-bit NormalFloat)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..quant import NF4Weight
from .adapter_layer import autocast_enabled
from .lora import is_transformers_conv1d

# Tensors of the quantized weight besides the packed codes (which are the
# ``weight`` buffer itself), as (buffer name, NF4Weight field).
_SCALE_BUFFERS = (("weight_absmax", "absmax"), ("weight_nested_absmax", "nested_absmax"),
                  ("weight_nested_code", "nested_code"))
# The codes and every scale tensor, as (attribute, NF4Weight field, state-dict suffix).
_QUANT_TENSORS = (("weight", "packed", ""),) + tuple(
    (name, field, "." + {"nested_code": "nested_quant_map"}.get(field, field))
    for name, field in _SCALE_BUFFERS)


_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
# A shardable layer's quant state (JSON bytes) is padded with spaces to a
# multiple of this width: torch.distributed.checkpoint loads into tensors of
# the saved size, and the JSON's length varies with the double-quantization
# offset's digits. JSON allows trailing whitespace; bitsandbytes and
# NF4Weight.from_state_dict parse it unchanged.
_STATE_WIDTH = 256


def _fixed_width(encoded: torch.Tensor) -> torch.Tensor:
    width = -(-encoded.numel() // _STATE_WIDTH) * _STATE_WIDTH
    return torch.cat([encoded, encoded.new_full((width - encoded.numel(),), ord(" "))])


def _is_dtensor(tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def _reinterpret(tensor: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``tensor`` viewed as ``dtype`` of the same element size (no copy); a DTensor
    stays a DTensor with the same mesh, placements and global shape."""
    if tensor is None or tensor.dtype == dtype:
        return tensor
    if not _is_dtensor(tensor):
        return tensor.view(dtype)
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(tensor.to_local().view(dtype), tensor.device_mesh,
                              tensor.placements, run_check=False, shape=tensor.shape,
                              stride=tensor.stride())


def _storage_form(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """How a shardable layer stores a quantized tensor: fp32 scales as their int32
    bits, so that neither ``Module.to(dtype)`` nor FSDP's mixed precision
    (``param_dtype``), which only touch floating-point parameters, can round them."""
    if tensor is not None and tensor.dtype == torch.float32:
        return _reinterpret(tensor, torch.int32)
    return tensor


def _value_form(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Inverse of :func:`_storage_form` (int32 bits back to the fp32 scales)."""
    return _reinterpret(tensor, torch.float32) if tensor is not None and \
        tensor.dtype == torch.int32 else tensor


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """True for bitsandbytes' 4-bit linear layers (``Linear4bit`` and its subclasses),
    without importing bitsandbytes."""
    return any(cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")
               for cls in type(module).__mro__)


class NF4Linear(nn.Module):
    """``y = x @ dequant(W).T + bias`` with ``W`` held as NF4 buffers (never a parameter).

    Buffers: ``weight`` (packed uint8 ``[ceil(out*in/2), 1]``, bitsandbytes'
    layout), ``weight_absmax`` (fp32 block scales, or uint8 codes when double
    quantized), ``weight_nested_absmax`` / ``weight_nested_code`` (double
    quantization only). ``bias`` stays a (frozen) parameter.

    ``state_dict`` uses bitsandbytes' ``Linear4bit`` keys (``weight``,
    ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
    ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``,
    ``bias``), so state loads both ways. ``.to(dtype)`` / ``.half()`` leave
    the quantized buffers' dtypes alone (they are codes, not values).

    ``forward(x)``: ``x`` ``[..., in_features]`` float; computed in
    ``compute_dtype`` (default: x's dtype) with fp32 accumulation and returned
    in x's dtype. Gradients flow to ``x`` (and ``bias`` if it requires grad).

    Sharding with FSDP2: :meth:`make_shardable` turns the codes and scales
    into frozen parameters (``requires_grad=False``), which
    ``torch.distributed.fsdp.fully_shard`` shards on dim 0 and all-gathers
    around forward and backward like any other parameter; the gathered
    tensors feed the fused kernels as they are. See
    :mod:`lowrank_ext.distributed`.
    """

    def __init__(self, weight: NF4Weight, bias: Optional[torch.Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.compute_dtype = compute_dtype
        self.shardable = False
        self.register_buffer("weight", weight.packed.reshape(-1, 1))
        for buffer_name, _ in _SCALE_BUFFERS:
            self.register_buffer(buffer_name, None, persistent=False)
        self._set_quantized(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        # The kind of layer the weight came from, which to_dense() rebuilds
        # (GPT-2's Conv1D stores its weight transposed).
        self.source_class: type = nn.Linear

    def _set_quantized(self, weight: NF4Weight) -> None:
        if self.shardable:
            if self.is_sharded():
                raise RuntimeError("this NF4Linear is sharded by FSDP: its 4-bit weight cannot "
                                   "be replaced in place (load a state dict instead)")
            for name, field, _ in _QUANT_TENSORS:
                tensor = getattr(weight, field)
                tensor = tensor.reshape(-1, 1) if name == "weight" else tensor
                self._parameters[name] = None if tensor is None else nn.Parameter(
                    _storage_form(tensor), requires_grad=False)
        else:
            self.weight = weight.packed.reshape(-1, 1)
            for buffer_name, field in _SCALE_BUFFERS:
                setattr(self, buffer_name, getattr(weight, field))
        self.blocksize = weight.blocksize
        self.offset = weight.offset
        self.weight_dtype = weight.dtype

    @classmethod
    def from_linear(cls, linear: nn.Module, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None) -> "NF4Linear":
        """Quantize an ``nn.Linear`` (or transformers ``Conv1D``) weight to NF4.

        The bias is copied unquantized. Raises ``TypeError`` for another layer
        kind and ``ValueError`` for a non-finite weight or a bad blocksize.
        """
        if isinstance(linear, nn.Linear):
            weight = linear.weight.detach()
        elif is_transformers_conv1d(linear):
            weight = linear.weight.detach().t()
        else:
            raise TypeError(f"NF4Linear.from_linear needs nn.Linear or Conv1D, got "
                            f"{type(linear).__name__}")
        quantized = NF4Weight.from_float(weight.contiguous(), blocksize, double_quant)
        layer = cls(quantized, linear.bias, compute_dtype)
        layer.source_class = type(linear)
        return layer

    @classmethod
    def from_bnb(cls, linear: nn.Module) -> "NF4Linear":
        """Take over a bitsandbytes ``Linear4bit`` (a model loaded with
        ``BitsAndBytesConfig(load_in_4bit=True)``) without requantizing: the
        same NF4 codes and scales (double quantization included), bias and
        compute dtype.

        Raises ``TypeError`` for another layer kind and ``ValueError`` for an
        FP4 layer or one whose weight is not quantized yet.
        """
        if not is_bnb_linear4bit(linear):
            raise TypeError(f"NF4Linear.from_bnb needs a bitsandbytes Linear4bit, got "
                            f"{type(linear).__name__}")
        quant_state = getattr(linear.weight, "quant_state", None)
        if quant_state is None:
            raise ValueError("this bitsandbytes Linear4bit holds no quantized weight yet "
                             "(quantized when moved to its device)")
        if quant_state.quant_type != "nf4":
            raise ValueError(f"this bitsandbytes layer uses quant_type={quant_state.quant_type!r}; "
                             "only NF4 can be taken over: load the model with "
                             "BitsAndBytesConfig(bnb_4bit_quant_type='nf4')")
        # Its state dict is bitsandbytes' checkpoint form (on CPU, eval-mode
        # forwards repack the codes in place; saving undoes that).
        weight = NF4Weight.from_state_dict(linear.state_dict(), "weight")
        return cls(weight, linear.bias, linear.compute_dtype)

    def make_shardable(self) -> "NF4Linear":
        """Hold the codes and scales as frozen ``nn.Parameter`` s (``requires_grad=False``)
        instead of buffers, so that FSDP2's ``fully_shard`` shards them; returns self.

        Same attribute names (``weight``, ``weight_absmax``, ...); fp32 scales
        are stored as their int32 bits (see :func:`_storage_form`), so read
        the weight through :meth:`quantized_weight` / :meth:`linear_args`,
        never through those attributes. The state dict keeps bitsandbytes'
        keys and dtypes (the quant state's JSON padded with spaces, see
        ``_STATE_WIDTH``). Idempotent; there is no way back.
        """
        if self.shardable:
            return self
        weight = self.quantized_weight()
        for name, _, _ in _QUANT_TENSORS:
            del self._buffers[name]
        self.shardable = True
        self._set_quantized(weight)
        return self

    def is_sharded(self) -> bool:
        """True while FSDP holds this layer's 4-bit weight as sharded DTensors."""
        return self.shardable and _is_dtensor(self._parameters.get("weight"))

    def _quant_tensor(self, name: str) -> Optional[torch.Tensor]:
        """A quantized tensor in its NF4Weight form (sharded ones gathered: a collective)."""
        tensor = getattr(self, name)
        if tensor is None or not self.shardable:
            return tensor
        if _is_dtensor(tensor):
            # Outside FSDP's forward/backward (there the module holds the
            # gathered tensors): every rank must make this call.
            tensor = tensor.full_tensor()
        return _value_form(tensor)

    def quantized_weight(self) -> NF4Weight:
        """The weight as an :class:`~lowrank_ext.NF4Weight` (sharing these buffers).

        On a layer that FSDP has sharded (:meth:`is_sharded`) this gathers the
        weight, a collective call that every rank must make.
        """
        return NF4Weight(self._quant_tensor("weight").reshape(-1),
                         self._quant_tensor("weight_absmax"),
                         torch.Size((self.out_features, self.in_features)), self.weight_dtype,
                         self.blocksize, self._quant_tensor("weight_nested_absmax"),
                         self._quant_tensor("weight_nested_code"), self.offset)

    def set_quantized_weight(self, weight: NF4Weight) -> None:
        """Replace the stored weight (same ``[out, in]`` shape; raises ``ValueError`` otherwise)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4 weight of shape {tuple(weight.shape)} does not fit a layer "
                             f"of shape {(self.out_features, self.in_features)}")
        self._set_quantized(weight.to(self.weight.device))

    def requantize(self, dense: torch.Tensor) -> tuple[NF4Weight, float]:
        """Store ``dense`` (fp32 ``[out, in]``) as the new 4-bit weight, with this
        layer's blocksize, double quantization and original dtype.

        Returns the weight it replaced and the largest absolute rounding error
        the quantization introduced.
        """
        quantized = NF4Weight.from_float(dense, self.blocksize,
                                         self.weight_nested_absmax is not None)
        quantized.dtype = self.weight_dtype
        previous = self.quantized_weight()
        self.set_quantized_weight(quantized)
        return previous, (quantized.dequantize(torch.float32) - dense).abs().max().item()

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight (default dtype: the original weight's)."""
        return self.quantized_weight().dequantize(dtype)

    def to_dense(self, weight: Optional[torch.Tensor] = None) -> nn.Module:
        """A dense layer of the kind this one was quantized from (``nn.Linear``
        or ``Conv1D``; ``source_class``) holding ``weight`` (``[out, in]``,
        default the dequantized weight) in the original weight dtype, and a
        copy of the bias. Raises ``ValueError`` for a weight of another shape.
        """
        if weight is None:
            weight = self.dequantize()
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a layer of "
                             f"shape {(self.out_features, self.in_features)}")
        weight = weight.detach().to(self.weight_dtype)
        bias = None if self.bias is None else self.bias.detach().clone()
        # Built on the meta device (no initialization work), then given real tensors.
        with torch.device("meta"):
            if self.source_class is nn.Linear:
                dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
            else:  # Conv1D(nf=out, nx=in): weight [in, out], always a bias
                dense = self.source_class(self.out_features, self.in_features)
        if self.source_class is not nn.Linear:
            weight = weight.t()
            bias = weight.new_zeros(self.out_features) if bias is None else bias
        dense.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias, requires_grad=False)
        dense.train(self.training)
        return dense

    def linear_args(self) -> tuple:
        """The NF4 weight argument group of :func:`lowrank_ext.ops.nf4_linear`."""
        if self.shardable:  # inside FSDP's forward: the gathered tensors, as they are
            return (self._quant_tensor("weight"), self._quant_tensor("weight_absmax"),
                    self._quant_tensor("weight_nested_absmax"),
                    self._quant_tensor("weight_nested_code"), self.offset, self.out_features,
                    self.in_features, self.blocksize)
        return (self.weight, self.weight_absmax, self.weight_nested_absmax,
                self.weight_nested_code, self.offset, self.out_features, self.in_features,
                self.blocksize)

    def compute_dtype_for(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the matmul runs in for input ``x``."""
        return self.compute_dtype or x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype_for(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        result = ops.nf4_linear(x.to(dtype), *self.linear_args(), bias)
        # Under autocast the op ran in the autocast dtype, and the result keeps
        # it, as nn.Linear's does.
        return result if autocast_enabled(x) else result.to(x.dtype)

    def nbytes(self) -> int:
        """Bytes of the quantized weight (codes and scales), not counting the bias."""
        return self.quantized_weight().nbytes()

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast floating-point buffers, but the fp32
        # scales here are part of the quantized format. Module casts leave
        # integer tensors' dtype alone, so the scales go through ``fn`` viewed
        # as int32 (same size): they move device but keep their exact bits.
        protected = {}
        for name in ("weight_absmax", "weight_nested_absmax", "weight_nested_code"):
            tensor = self._buffers.get(name)
            if tensor is not None and tensor.dtype == torch.float32:
                protected[name] = self._buffers.pop(name)
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in protected.items():
                self._buffers[name] = fn(tensor.view(torch.int32)).view(torch.float32)
        return self

    def _load_shards(self, weight: NF4Weight) -> None:
        """Copy ``weight`` (its tensors sharded DTensors, e.g. from
        ``torch.distributed.checkpoint.load``, or whole tensors on every rank)
        into this sharded layer's local shards. Raises ``ValueError`` when it
        does not fit (shape, blocksize, double quantization, dtypes)."""
        from torch.distributed.tensor import distribute_tensor

        if tuple(weight.shape) != (self.out_features, self.in_features) or \
                weight.blocksize != self.blocksize or \
                weight.double_quant != (self.weight_nested_absmax is not None):
            raise ValueError(
                f"NF4 weight (shape {tuple(weight.shape)}, blocksize {weight.blocksize}, "
                f"double_quant={weight.double_quant}) does not fit this sharded layer "
                f"{(self.out_features, self.in_features)}, blocksize {self.blocksize}, "
                f"double_quant={self.weight_nested_absmax is not None}; a sharded layer keeps "
                "its format")
        copies = []
        for name, field, _ in _QUANT_TENSORS:
            target = getattr(self, name)
            if target is None:
                continue
            source = getattr(weight, field)
            source = _storage_form(source.reshape(-1, 1) if name == "weight" else source)
            if source.dtype != target.dtype or source.shape != target.shape:
                raise ValueError(f"{name}: {source.dtype} {tuple(source.shape)} does not fit "
                                 f"{target.dtype} {tuple(target.shape)}")
            if not _is_dtensor(source):  # a whole tensor: this rank's part, no communication
                source = distribute_tensor(source.to(target.device), target.device_mesh,
                                           target.placements, src_data_rank=None)
            elif source.placements != target.placements:
                source = source.redistribute(target.device_mesh, target.placements)
            copies.append((target, source))
        with torch.no_grad():
            for target, source in copies:
                target.to_local().copy_(source.to_local())
        self.offset = weight.offset
        self.weight_dtype = weight.dtype

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.shardable:
            for key, value in self.quantized_weight().state_dict(prefix + "weight").items():
                if key != prefix + "weight":
                    destination[key] = value
            return
        # The same keys and dtypes as the buffer form. Sharded tensors stay
        # DTensors (no gathering: torch.distributed.checkpoint saves each
        # rank's shard; DTensor.full_tensor() on every value gives the
        # bitsandbytes-format state dict).
        values = {}
        for name, field, _ in _QUANT_TENSORS:
            destination.pop(prefix + name, None)
            tensor = getattr(self, name)
            if tensor is not None and not keep_vars:
                tensor = tensor.detach()
            values[field] = _value_form(tensor)
        metadata = NF4Weight(shape=torch.Size((self.out_features, self.in_features)),
                             dtype=self.weight_dtype, blocksize=self.blocksize,
                             offset=self.offset, **values)
        for key, value in metadata.state_dict(prefix + "weight").items():
            if key == prefix + "weight":
                value = values["packed"]
            elif key.endswith(_STATE_SUFFIX):
                value = _fixed_width(value)
            destination[key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if prefix + "weight" in state_dict:
            try:
                weight = NF4Weight.from_state_dict(state_dict, prefix + "weight")
                if self.is_sharded():
                    self._load_shards(weight)
                else:
                    self.set_quantized_weight(weight)
            except (KeyError, ValueError, RuntimeError) as error:
                error_msgs.append(f"{prefix}weight: {error}")
                return
            # The codes are in; the generic copy below must not see the file's
            # tensor, which bitsandbytes may store as another dtype
            # (quant_storage=bf16 for FSDP, a different shape). A shardable
            # layer's scales are parameters the generic copy looks for under
            # their attribute names: it finds them already in place.
            state_dict = dict(state_dict)
            names = [name for name, _, _ in _QUANT_TENSORS] if self.shardable else ["weight"]
            for name in names:
                if getattr(self, name) is not None:
                    state_dict[prefix + name] = getattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # torch reads dotted keys as submodule state; these belong to ``weight``.
        quant_keys = {key for key in state_dict if key.startswith(prefix + "weight.")}
        unexpected_keys[:] = [key for key in unexpected_keys if key not in quant_keys]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.weight_nested_absmax is not None}")

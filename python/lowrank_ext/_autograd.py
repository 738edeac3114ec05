"""Autograd of every differentiable op, registered in Python at the Autograd key.

The compiled library registers only schemas and backend kernels (it has no
C++ autograd: torch's stable ABI offers none), so each differentiable op gets
a Python kernel here, in the form ``torch.library.register_autograd`` uses
(a kernel taking the dispatch key set, redispatching below autograd), plus
what that helper cannot express: the gradient of arguments looked up by
schema name, forward-mode AD and nothing saved when nothing needs a gradient.

  dropout:           d input = dropout(grad_output, p, seed) (same mask)
  nf4_linear:        d input = nf4_linear_grad_input(...), d bias = sum of rows
  lora_linear:       d input, d lora_input, d lora_A, d lora_B from
                     lora_linear_backward; d weight = grad_output^T input;
                     d bias = sum of rows
  qlora_linear:      as lora_linear, from qlora_linear_backward; the NF4
                     weight gets no gradient
  multi_lora_linear: d input, d lora_A, d lora_B from
                     multi_lora_linear_backward; d base_output = grad_output
Codes, scales, seeds, ranks, scalings and indices get no gradient.

A Python autograd kernel costs microseconds on every call that reaches it,
under no_grad too, so the eager wrappers in ops.py call the ops below
autograd when no argument needs a gradient (:func:`below_autograd`); only
training calls and traced graphs come here.

Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd): the
Functions are backward-only, so when any argument carries a tangent the op is
computed instead by the same math in differentiable ATen ops (the NF4 weight
decoded exactly into a dense tensor), whose forward formulas carry the
tangents and whose backward still works. multi_lora_linear refuses tangents
with an error instead of dropping them.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

_ops = torch.ops.lowrank_ext
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset
_below_autograd_guard = torch._C._AutoDispatchBelowAutograd
_functorch_level = torch._C._functorch.maybe_current_level
# nf4::kNestedBlocksize: one fp32 scale per 256 double-quantized absmax codes.
_NESTED_BLOCKSIZE = 256

_library = torch.library.Library("lowrank_ext", "IMPL")


def forward_ad_active() -> bool:
    """Whether a forward-AD level (torch.autograd.forward_ad or a torch.func
    transform) is open, the only case in which an argument can carry a
    tangent. Cheap (well under a microsecond); reading the tangents is not."""
    return _forward_ad._current_level >= 0 or _functorch_level() is not None


def needs_graph(*tensors) -> bool:
    """Whether a call with these differentiable arguments must enter autograd:
    grad mode on and one of them requiring grad, or a forward-AD level open."""
    if torch.is_grad_enabled():
        for tensor in tensors:
            if tensor is not None and tensor.requires_grad:
                return True
    return forward_ad_active()


def below_autograd():
    """Context in which op calls skip the Autograd key (no node, no Python)."""
    return _below_autograd_guard()


def _has_tangent(*tensors) -> bool:
    if not forward_ad_active():
        return False
    for tensor in tensors:
        if tensor is not None and _forward_ad.unpack_dual(tensor, level=0).tangent is not None:
            return True
    return False


def _requires_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in tensors)


class _Arguments:
    """Positions of an op's arguments by schema name, for ctx.needs_input_grad
    (whose first slot is the dispatch key set every Function here takes)."""

    def __init__(self, op):
        self.names = [argument.name for argument in op._schema.arguments]
        self.index = {name: position + 1 for position, name in enumerate(self.names)}

    def needs(self, ctx, name: str) -> bool:
        return ctx.needs_input_grad[self.index[name]]

    def any(self, ctx, *names: str) -> bool:
        return any(ctx.needs_input_grad[self.index[name]] for name in names)

    def grads(self, **by_name):
        """One slot per apply() argument (the key set first), None where not named."""
        return (None,) + tuple(by_name.get(name) for name in self.names)


def _flatten_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1])


def _bias_grad(grad_output: torch.Tensor) -> torch.Tensor:
    return _flatten_rows(grad_output).sum(0)


def nf4_dense_weight(packed, absmax, nested_absmax, nested_code, offset, out_features,
                     in_features, blocksize, dtype) -> torch.Tensor:
    """The dense [out_features, in_features] NF4 weight decoded exactly (codebook
    value times fp32 block scale, in fp32), then cast to ``dtype``."""
    scales = absmax
    if nested_absmax is not None:
        scales = _ops.dequantize_blockwise_8bit(absmax, nested_absmax, nested_code,
                                                _NESTED_BLOCKSIZE).add(offset)
    return _ops.nf4_dequantize(packed, scales, [out_features, in_features], blocksize,
                               torch.float32).to(dtype)


def _nf4_linear_reference(input, packed, absmax, nested_absmax, nested_code, offset,
                          out_features, in_features, blocksize, bias):
    with torch.no_grad():  # the weight is a constant
        weight = nf4_dense_weight(packed, absmax, nested_absmax, nested_code, offset,
                                  out_features, in_features, blocksize, input.dtype)
    return F.linear(input, weight, bias)


def _lora_term(input, lora_input, lora_A, lora_B, scaling):
    """scaling * (rows @ A.T) @ B.T in differentiable ATen ops, in the factors'
    dtype and rounded once to input's (the fused ops' precision)."""
    rows = input if lora_input is None else lora_input
    return F.linear(F.linear(rows.to(lora_A.dtype), lora_A), lora_B).mul(scaling).to(input.dtype)


# ------------------------------------------------------------------ dropout --

_DROPOUT = _Arguments(_ops.dropout.default)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, input, p, seed):
        ctx.save_for_backward(seed)
        ctx.p = p
        with _below_autograd_guard():
            return _ops.dropout.default.redispatch(keyset & _AFTER_AUTOGRAD, input, p, seed)

    @staticmethod
    def backward(ctx, grad_output):
        # The mask is a function of (seed, index): the op applied to the
        # gradient multiplies it by exactly the forward's keep / (1 - p).
        (seed,) = ctx.saved_tensors
        return _DROPOUT.grads(input=_ops.dropout(grad_output.contiguous(), ctx.p, seed))


def _dropout_autograd(keyset, input, p, seed):
    if _has_tangent(input):
        # The op multiplies by a fixed keep / (1 - p) per element in fp32 and
        # rounds once: that factor, as an fp32 tensor, times input, the same way.
        with torch.no_grad():
            factor = _ops.dropout(torch.ones_like(input, dtype=torch.float32), p, seed)
        compute = torch.promote_types(input.dtype, torch.float32)
        return (input.to(compute) * factor.to(compute)).to(input.dtype)
    if not _requires_grad(input):
        with _below_autograd_guard():
            return _ops.dropout.default.redispatch(keyset & _AFTER_AUTOGRAD, input, p, seed)
    return _Dropout.apply(keyset, input, p, seed)


# --------------------------------------------------------------- nf4_linear --

_NF4_LINEAR = _Arguments(_ops.nf4_linear.default)


class _Nf4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, input, packed, absmax, nested_absmax, nested_code, offset,
                out_features, in_features, blocksize, bias):
        ctx.save_for_backward(packed, absmax, nested_absmax, nested_code)
        ctx.weight_args = (offset, out_features, in_features, blocksize)
        with _below_autograd_guard():
            return _ops.nf4_linear.default.redispatch(
                keyset & _AFTER_AUTOGRAD, input, packed, absmax, nested_absmax, nested_code,
                offset, out_features, in_features, blocksize, bias)

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = grad_bias = None
        if _NF4_LINEAR.needs(ctx, "input"):
            grad_input = _ops.nf4_linear_grad_input(grad_output, *ctx.saved_tensors,
                                                    *ctx.weight_args)
        if _NF4_LINEAR.needs(ctx, "bias"):
            grad_bias = _bias_grad(grad_output)
        return _NF4_LINEAR.grads(input=grad_input, bias=grad_bias)


def _nf4_linear_autograd(keyset, input, packed, absmax, nested_absmax, nested_code, offset,
                         out_features, in_features, blocksize, bias):
    if _has_tangent(input, bias):
        return _nf4_linear_reference(input, packed, absmax, nested_absmax, nested_code, offset,
                                     out_features, in_features, blocksize, bias)
    if not _requires_grad(input, bias):
        with _below_autograd_guard():
            return _ops.nf4_linear.default.redispatch(
                keyset & _AFTER_AUTOGRAD, input, packed, absmax, nested_absmax, nested_code,
                offset, out_features, in_features, blocksize, bias)
    return _Nf4Linear.apply(keyset, input, packed, absmax, nested_absmax, nested_code, offset,
                            out_features, in_features, blocksize, bias)


# -------------------------------------------------------------- lora_linear --

_LORA_LINEAR = _Arguments(_ops.lora_linear.default)
_ADAPTER_ARGUMENTS = ("input", "lora_input", "lora_A", "lora_B")


def _adapter_grads(arguments, ctx, grads):
    """Gradients of (input, lora_input, lora_A, lora_B) from a lora / qlora
    backward op, kept only where needed. With lora_input absent the op's
    grad_input already holds both paths."""
    return {name: grad if arguments.needs(ctx, name) else None
            for name, grad in zip(_ADAPTER_ARGUMENTS, grads)}


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, input, lora_input, weight, bias, lora_A, lora_B, scaling):
        ctx.save_for_backward(input, lora_input, weight, lora_A, lora_B)
        ctx.scaling = scaling
        with _below_autograd_guard():
            return _ops.lora_linear.default.redispatch(
                keyset & _AFTER_AUTOGRAD, input, lora_input, weight, bias, lora_A, lora_B,
                scaling)

    @staticmethod
    def backward(ctx, grad_output):
        input, lora_input, weight, lora_A, lora_B = ctx.saved_tensors
        grads = {}
        if _LORA_LINEAR.any(ctx, *_ADAPTER_ARGUMENTS):
            grads = _adapter_grads(_LORA_LINEAR, ctx, _ops.lora_linear_backward(
                grad_output, input, lora_input, weight, lora_A, lora_B, ctx.scaling))
        if _LORA_LINEAR.needs(ctx, "weight"):
            grads["weight"] = _flatten_rows(grad_output).t().mm(_flatten_rows(input))
        if _LORA_LINEAR.needs(ctx, "bias"):
            grads["bias"] = _bias_grad(grad_output)
        return _LORA_LINEAR.grads(**grads)


def _lora_linear_autograd(keyset, input, lora_input, weight, bias, lora_A, lora_B, scaling):
    if _has_tangent(input, lora_input, weight, bias, lora_A, lora_B):
        return (F.linear(input, weight, bias)
                + _lora_term(input, lora_input, lora_A, lora_B, scaling))
    if not _requires_grad(input, lora_input, weight, bias, lora_A, lora_B):
        with _below_autograd_guard():
            return _ops.lora_linear.default.redispatch(
                keyset & _AFTER_AUTOGRAD, input, lora_input, weight, bias, lora_A, lora_B,
                scaling)
    return _LoraLinear.apply(keyset, input, lora_input, weight, bias, lora_A, lora_B, scaling)


# ------------------------------------------------------------- qlora_linear --

_QLORA_LINEAR = _Arguments(_ops.qlora_linear.default)


class _QloraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, input, lora_input, packed, absmax, nested_absmax, nested_code,
                offset, out_features, in_features, blocksize, bias, lora_A, lora_B, scaling):
        ctx.save_for_backward(input, lora_input, packed, absmax, nested_absmax, nested_code,
                              lora_A, lora_B)
        ctx.scalars = (offset, out_features, in_features, blocksize, scaling)
        with _below_autograd_guard():
            return _ops.qlora_linear.default.redispatch(
                keyset & _AFTER_AUTOGRAD, input, lora_input, packed, absmax, nested_absmax,
                nested_code, offset, out_features, in_features, blocksize, bias, lora_A,
                lora_B, scaling)

    @staticmethod
    def backward(ctx, grad_output):
        input, lora_input, packed, absmax, nested_absmax, nested_code, lora_A, lora_B = (
            ctx.saved_tensors)
        offset, out_features, in_features, blocksize, scaling = ctx.scalars
        grads = {}
        if _QLORA_LINEAR.any(ctx, *_ADAPTER_ARGUMENTS):
            grads = _adapter_grads(_QLORA_LINEAR, ctx, _ops.qlora_linear_backward(
                grad_output, input, lora_input, packed, absmax, nested_absmax, nested_code,
                offset, out_features, in_features, blocksize, lora_A, lora_B, scaling))
        if _QLORA_LINEAR.needs(ctx, "bias"):
            grads["bias"] = _bias_grad(grad_output)
        return _QLORA_LINEAR.grads(**grads)


def _qlora_linear_autograd(keyset, input, lora_input, packed, absmax, nested_absmax,
                           nested_code, offset, out_features, in_features, blocksize, bias,
                           lora_A, lora_B, scaling):
    if _has_tangent(input, lora_input, bias, lora_A, lora_B):
        return (_nf4_linear_reference(input, packed, absmax, nested_absmax, nested_code, offset,
                                      out_features, in_features, blocksize, bias)
                + _lora_term(input, lora_input, lora_A, lora_B, scaling))
    if not _requires_grad(input, lora_input, bias, lora_A, lora_B):
        with _below_autograd_guard():
            return _ops.qlora_linear.default.redispatch(
                keyset & _AFTER_AUTOGRAD, input, lora_input, packed, absmax, nested_absmax,
                nested_code, offset, out_features, in_features, blocksize, bias, lora_A,
                lora_B, scaling)
    return _QloraLinear.apply(keyset, input, lora_input, packed, absmax, nested_absmax,
                              nested_code, offset, out_features, in_features, blocksize, bias,
                              lora_A, lora_B, scaling)


# -------------------------------------------------------- multi_lora_linear --

_MULTI_LORA_LINEAR = _Arguments(_ops.multi_lora_linear.default)


class _MultiLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, input, base_output, lora_A, lora_B, ranks, scalings,
                adapter_indices):
        ctx.save_for_backward(input, lora_A, lora_B, ranks, scalings, adapter_indices)
        with _below_autograd_guard():
            return _ops.multi_lora_linear.default.redispatch(
                keyset & _AFTER_AUTOGRAD, input, base_output, lora_A, lora_B, ranks, scalings,
                adapter_indices)

    @staticmethod
    def backward(ctx, grad_output):
        grads = {}
        if _MULTI_LORA_LINEAR.any(ctx, "input", "lora_A", "lora_B"):
            computed = _ops.multi_lora_linear_backward(grad_output, *ctx.saved_tensors)
            for name, grad in zip(("input", "lora_A", "lora_B"), computed):
                if _MULTI_LORA_LINEAR.needs(ctx, name):
                    grads[name] = grad
        if _MULTI_LORA_LINEAR.needs(ctx, "base_output"):
            grads["base_output"] = grad_output
        return _MULTI_LORA_LINEAR.grads(**grads)


def _multi_lora_linear_autograd(keyset, input, base_output, lora_A, lora_B, ranks, scalings,
                                adapter_indices):
    if _has_tangent(input, base_output, lora_A, lora_B):
        raise RuntimeError(
            "multi_lora_linear (mixed-adapter batches, adapter_names=...) does not support "
            "forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad); "
            "run one adapter at a time (set_adapter) to get tangents")
    if not _requires_grad(input, base_output, lora_A, lora_B):
        with _below_autograd_guard():
            return _ops.multi_lora_linear.default.redispatch(
                keyset & _AFTER_AUTOGRAD, input, base_output, lora_A, lora_B, ranks, scalings,
                adapter_indices)
    return _MultiLoraLinear.apply(keyset, input, base_output, lora_A, lora_B, ranks, scalings,
                                  adapter_indices)


for _name, _kernel in (
    ("dropout", _dropout_autograd),
    ("nf4_linear", _nf4_linear_autograd),
    ("lora_linear", _lora_linear_autograd),
    ("qlora_linear", _qlora_linear_autograd),
    ("multi_lora_linear", _multi_lora_linear_autograd),
):
    _library.impl(_name, _kernel, "Autograd", with_keyset=True)
del _name, _kernel

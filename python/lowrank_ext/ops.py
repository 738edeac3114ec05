"""Typed Python wrappers over ``torch.ops.lowrank_ext.*``.

Every op here is a torch custom op (schema in ``csrc/registration.cpp``) with a
fake kernel, so ``torch.compile(fullgraph=True)`` can trace it, and the
differentiable ones have autograd (registered in Python, ``_autograd.py``).
CPU and CUDA kernels register for the same names; the dispatcher picks the
backend from the tensors' device. Under ``torch.autocast`` the linear ops cast
their floating activation and weight arguments to the autocast dtype, as torch
does for ``F.linear`` (``_autocast.py``); given forward-mode tangents they
compute the same math in differentiable ATen ops (``_autograd.py``). In eager
mode the wrappers call an op below autograd when no argument needs a
gradient, so inference never pays for the Python autograd kernel.

NF4 weight arguments always come as one group (see :class:`lowrank_ext.NF4Weight`):
``packed`` (uint8, ``ceil(out*in/2)`` bytes, element 2i in the high nibble),
``absmax`` (fp32 per block, or uint8 codes when double-quantized),
``nested_absmax`` / ``nested_code`` (fp32, or both None), ``offset`` (float),
``out_features``, ``in_features``, ``blocksize``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional, Sequence

import torch

from . import _library  # noqa: F401  (loads the library that registers the ops)
from . import _autocast  # noqa: F401  (registers the ops' autocast kernels)
from . import _autograd  # registers the ops' autograd kernels

_ops = torch.ops.lowrank_ext
_needs_graph = _autograd.needs_graph
_below_autograd = _autograd.below_autograd
_is_compiling = torch.compiler.is_compiling


def _call(op, differentiable, *args):
    """op(*args), below autograd in eager mode when none of the
    ``differentiable`` arguments needs a gradient (nor a tangent): the Python
    autograd kernel would only redispatch, at several microseconds a call.
    Traced code always calls the op itself (autograd decides in the graph)."""
    if _is_compiling() or _needs_graph(*differentiable):
        return op(*args)
    with _below_autograd():
        return op(*args)

__all__ = [
    "nf4_quantize",
    "nf4_dequantize",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "nf4_linear",
    "nf4_linear_grad_input",
    "lora_linear",
    "qlora_linear",
    "multi_lora_linear",
    "stack_lora_factors",
    "dropout",
]


# The start of nf4_quantize's message for a NaN or Inf input (nf4_ops.cpp, cuda_ops.cpp).
_NON_FINITE_MESSAGE = "nf4_quantize: input contains NaN or Inf"


def _num_blocks(numel, blocksize: int):
    return (numel + blocksize - 1) // blocksize


# ----------------------------------------------------------------- wrappers --


def nf4_quantize(input: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float tensor to NF4, blockwise over the flattened tensor.

    Args:
        input: float32, bfloat16 or float16 tensor, any shape, not empty.
            Non-contiguous input is copied. NaN or Inf raises ``ValueError``.
        blocksize: power of two in [32, 4096].

    Returns:
        ``(packed, absmax)``: ``packed`` uint8 ``[ceil(numel/2)]`` (element 2i in
        the high nibble, a padding nibble of code 7 for odd sizes) and
        ``absmax`` float32 ``[ceil(numel/blocksize)]``. Bit-identical to
        bitsandbytes' ``quantize_4bit(..., quant_type="nf4")``.
    """
    try:
        return _ops.nf4_quantize(input, blocksize)
    except RuntimeError as error:
        # The stable ABI raises every kernel error as RuntimeError; a NaN or
        # Inf weight is a bad value, as it was before (ValueError).
        if _NON_FINITE_MESSAGE in str(error):
            raise ValueError(str(error)) from None
        raise


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`nf4_quantize`: ``codebook[code] * absmax`` in fp32, cast to ``dtype``.

    Args:
        packed: uint8 ``[ceil(prod(shape)/2)]``.
        absmax: float32 ``[ceil(prod(shape)/blocksize)]`` (decode double-quantized
            scales first, e.g. with :meth:`lowrank_ext.NF4Weight.block_absmax`).
        shape: shape of the result (non-empty).
        blocksize: the blocksize used to quantize.
        dtype: float32, bfloat16 or float16.
    """
    return _ops.nf4_dequantize(packed, absmax, list(shape), blocksize, dtype)


def quantize_blockwise_8bit(
    input: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization against a sorted 256-entry ``code`` map.

    Used for double quantization of NF4 absmax values; bit-identical to
    bitsandbytes' CPU ``quantize_blockwise``. ``input`` must be finite float32.
    Returns ``(codes uint8 like input, absmax float32 [nblocks])``.
    """
    return _ops.quantize_blockwise_8bit(input, code, blocksize)


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """``code[codes] * absmax[block]`` in float32, shaped like ``codes``."""
    return _ops.dequantize_blockwise_8bit(codes, absmax, code, blocksize)


def nf4_linear(
    input: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    out_features: int,
    in_features: int,
    blocksize: int = 64,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``input @ dequant(W).T + bias`` without materializing the dense weight.

    Args:
        input: ``[..., in_features]``, float32, bfloat16, float16 or float64
            (any leading shape, including no rows). float64 takes a reference
            path: the weight decoded exactly into float64 and ATen's GEMM.
        packed, absmax, nested_absmax, nested_code, offset, out_features,
            in_features, blocksize: the NF4 weight ``W`` ``[out_features,
            in_features]`` (see the module docstring; blocks run over the
            flattened weight and may straddle rows).
        bias: ``[out_features]`` in input's dtype, or None.

    Returns ``[..., out_features]`` in input's dtype; products are summed in
    fp32. On CPU, few rows (up to 16; 6 for bfloat16 on CPUs with
    AVX512-BF16) take a fused GEMV that reads the 4-bit weight directly with the exact
    fp32 dequantized values, except on CPUs with AVX512-BF16 for bfloat16
    input with ``in_features % 64 == 0``: that GEMV multiplies the bfloat16
    activations by the NF4 codebook rounded to bfloat16 (relative error up
    to 2^-9 per weight, within the output's bfloat16 rounding; products
    below fp32's normal range count as zero), then applies the fp32 block
    scales. More rows dequantize panels of W into input's dtype (float32 for
    float16 input, and for bfloat16 input on CPUs without AVX512-BF16) and
    multiply them with ATen's GEMM, so with AVX512-BF16 the weight is
    rounded to bfloat16 for bfloat16 input, as a dense bfloat16 layer would
    hold it.

    Differentiable with respect to ``input`` and ``bias`` (W is frozen).
    Raises ``RuntimeError`` naming the argument for wrong shapes, dtypes,
    devices or sizes of the weight group.
    """
    return _call(
        _ops.nf4_linear.default, (input, bias), input, packed, absmax, nested_absmax,
        nested_code, float(offset), out_features, in_features, blocksize, bias,
    )


def nf4_linear_grad_input(
    grad_output: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    out_features: int,
    in_features: int,
    blocksize: int = 64,
) -> torch.Tensor:
    """``grad_output @ dequant(W)``: ``[..., out_features]`` -> ``[..., in_features]``.

    The backward of :func:`nf4_linear` with respect to its input, in
    grad_output's dtype (float32, bfloat16, float16; float64 by the reference
    path of :func:`nf4_linear`) with fp32 sums. Like
    the forward it never materializes the dense weight: few rows use a fused
    transposed GEMV, more rows multiply dequantized column slabs of W with
    ATen's GEMM, each output element computed by a single GEMM. Raises
    ``RuntimeError`` naming the argument on invalid input.
    """
    return _ops.nf4_linear_grad_input(
        grad_output, packed, absmax, nested_absmax, nested_code, float(offset),
        out_features, in_features, blocksize,
    )


def lora_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    lora_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused ``input @ W.T + bias + scaling * (lora_input @ A.T) @ B.T``.

    Args:
        input: ``[..., in]``.
        weight: ``[out, in]`` dense base weight (may require grad).
        bias: ``[out]`` or None.
        lora_A: ``[r, in]``; lora_B: ``[out, r]`` (r may be 0).
        scaling: the adapter scale (alpha / r, or alpha / sqrt(r) for rsLoRA).
        lora_input: the adapter branch's input (``dropout(input)``), or None to
            use ``input`` itself (no dropout: no extra cost).
    All tensors share input's device and dtype (float32, bfloat16, float16 or
    float64), except that with a bfloat16 or float16 input both factors may
    be float32: the low-rank term is then computed in float32 and rounded
    once into the output (gradients of the factors come back in float32).
    """
    return _call(_ops.lora_linear.default, (input, lora_input, weight, bias, lora_A, lora_B),
                 input, lora_input, weight, bias, lora_A, lora_B, float(scaling))


def qlora_linear(
    input: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    out_features: int,
    in_features: int,
    blocksize: int,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    lora_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`lora_linear` with a frozen NF4 base weight (see :func:`nf4_linear`).

    The base product runs through the same GEMV / panel-GEMM paths as
    :func:`nf4_linear` (and its backward through :func:`nf4_linear_grad_input`),
    then the low-rank term is added in place. Gradients flow to ``input``,
    ``lora_input``, ``bias``, ``lora_A`` and ``lora_B``; never to the weight.
    """
    return _call(
        _ops.qlora_linear.default, (input, lora_input, bias, lora_A, lora_B), input, lora_input,
        packed, absmax, nested_absmax, nested_code, float(offset), out_features, in_features,
        blocksize, bias, lora_A, lora_B, float(scaling),
    )


def multi_lora_linear(
    input: torch.Tensor,
    base_output: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: torch.Tensor | Sequence[int],
    scalings: torch.Tensor | Sequence[float],
    adapter_indices: torch.Tensor | Sequence[int],
) -> torch.Tensor:
    """Adds a different LoRA adapter to each row of one batch (mixed-adapter batch).

    Returns a new tensor ``out = base_output + delta`` where, for every row
    ``i`` with adapter ``a = adapter_indices[i] != -1`` and ``r = ranks[a]``::

        delta[i] = scalings[a] * (input[i] @ lora_A[a, :r].T) @ lora_B[a, :, :r].T

    and ``delta[i] = 0`` for rows with index ``-1`` (PEFT's ``"__base__"``) or
    rank 0. This is the batched multi-adapter LoRA of Punica (SGMV) with
    S-LoRA's per-adapter ranks, so AdaLoRA adapters of different ranks share a
    batch: the CPU kernel sorts the rows by adapter, then per adapter computes
    the rank-``r`` "shrink" ``input @ A.T`` for all its rows and "expands" with
    ``B``, so every adapter's factors are read once per call, whatever the number
    of rows or adapters. Sums are in fp32; the result is rounded once.

    Args:
        input: ``[..., in]``, float32, bfloat16 or float16.
        base_output: ``[..., out]`` (input's leading shape and dtype), typically
            the frozen base layer's output ``F.linear(input, W, bias)``.
        lora_A: ``[num_adapters, max_rank, in]``, adapter ``a``'s A in rows
            ``:ranks[a]`` (rows past the rank are ignored; zero-pad them).
        lora_B: ``[num_adapters, out, max_rank]``, adapter ``a``'s B in columns
            ``:ranks[a]`` (columns past the rank are ignored).
        ranks: int64 ``[num_adapters]``, each in ``[0, max_rank]``.
        scalings: float32 ``[num_adapters]`` (``alpha / r``, or ``alpha / sqrt(r)``
            for rsLoRA).
        adapter_indices: int64 in ``[-1, num_adapters)``, shaped like a prefix of
            input's leading dimensions: ``[batch]`` for a ``[batch, seq, in]``
            input gives every token of a sequence that sequence's adapter.
    Sequences for ``ranks``, ``scalings`` and ``adapter_indices`` are converted
    to tensors on input's device.

    Differentiable with respect to ``input``, ``base_output``, ``lora_A`` and
    ``lora_B`` (so mixed-adapter batches also train); the gradient of an
    adapter's A and B is zero past its rank and for adapters no row uses.
    Mutates nothing. Raises ``RuntimeError`` naming the argument for mismatched
    shapes, dtypes or devices, ranks outside ``[0, max_rank]`` and indices
    outside ``[-1, num_adapters)``. On CUDA the values of ``ranks`` and
    ``adapter_indices`` are not read on the host (that would block it on
    every call): a row with an out-of-range index or rank comes out NaN (and
    makes the factor gradients NaN) instead; ``LOWRANK_CUDA_CHECK_VALUES=1``
    in the environment restores the ``RuntimeError`` for eager calls, at the
    cost of one device-to-host copy each.
    """
    device = input.device
    if not isinstance(ranks, torch.Tensor):
        ranks = torch.as_tensor(ranks, dtype=torch.int64, device=device)
    if not isinstance(scalings, torch.Tensor):
        scalings = torch.as_tensor(scalings, dtype=torch.float32, device=device)
    if not isinstance(adapter_indices, torch.Tensor):
        adapter_indices = torch.as_tensor(adapter_indices, dtype=torch.int64, device=device)
    return _call(_ops.multi_lora_linear.default, (input, base_output, lora_A, lora_B),
                 input, base_output, lora_A, lora_B, ranks, scalings, adapter_indices)


def dropout(input: torch.Tensor, p: float, seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverted dropout whose mask is a hash of ``(seed, element index)``.

    ``out = input * keep / (1 - p)`` with ``keep[i] = hash(seed, i) >= p * 2**32``
    (computed in fp32, rounded once to input's dtype). Because the mask is a
    pure function of the seed, the backward pass regenerates it instead of
    storing it, every ISA and thread count gives the same result, and the
    mask costs a few integer operations per element instead of a call to the
    global generator for each one. CPU only (CUDA layers use ``F.dropout``).

    Args:
        input: float32 / bfloat16 / float16, any shape.
        p: drop probability in [0, 1).
        seed: CPU int64 tensor with one element; by default drawn from torch's
            global generator, so ``torch.manual_seed`` makes runs repeatable.
    """
    if seed is None:
        seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64)
    return _call(_ops.dropout.default, (input,), input, float(p), seed)


def stack_lora_factors(
    lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packs per-adapter factors of any ranks into :func:`multi_lora_linear`'s layout.

    Args:
        lora_As: adapter ``a``'s A, ``[r_a, in]``; lora_Bs: its B, ``[out, r_a]``.
            All share dtype and device; ``r_a`` may differ (AdaLoRA) or be 0.

    Returns:
        ``(lora_A [n, max_rank, in], lora_B [n, out, max_rank], ranks int64 [n])``
        with zeros past each adapter's rank.
    """
    if len(lora_As) == 0 or len(lora_As) != len(lora_Bs):
        raise ValueError(
            f"stack_lora_factors: need one lora_B per lora_A and at least one adapter, got "
            f"{len(lora_As)} lora_As and {len(lora_Bs)} lora_Bs")
    ranks = [int(a.shape[0]) for a in lora_As]
    max_rank = max(ranks)
    first_A, first_B = lora_As[0], lora_Bs[0]
    stacked_A = first_A.new_zeros((len(lora_As), max_rank, first_A.shape[1]))
    stacked_B = first_B.new_zeros((len(lora_Bs), first_B.shape[0], max_rank))
    for index, (lora_A, lora_B) in enumerate(zip(lora_As, lora_Bs)):
        stacked_A[index, : lora_A.shape[0]] = lora_A
        stacked_B[index, :, : lora_B.shape[1]] = lora_B
    return stacked_A, stacked_B, torch.tensor(ranks, dtype=torch.int64, device=first_A.device)


# ------------------------------------------------------------- fake kernels --
#
# A fake kernel also runs, as the Meta kernel, whenever any argument is on the
# meta device; with the others on a real device it would hand back an
# uninitialized real tensor. Every fake kernel therefore refuses such a mix.


def _register_fake(name: str):
    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def checked(*args, **kwargs):
            devices = {}
            for argument, value in signature.bind(*args, **kwargs).arguments.items():
                # dropout's seed is a CPU tensor whatever the input's device.
                if isinstance(value, torch.Tensor) and argument != "seed":
                    devices[argument] = value.device
            meta = [argument for argument, device in devices.items() if device.type == "meta"]
            if meta and len(meta) != len(devices):
                others = {argument: str(device) for argument, device in devices.items()
                          if device.type != "meta"}
                raise RuntimeError(f"{name}: {', '.join(meta)} on the meta device but "
                                   f"{others}: all tensors must be on one device")
            return function(*args, **kwargs)

        return torch.library.register_fake(f"lowrank_ext::{name}")(checked)

    return decorate


# The fake kernels check every argument the real kernels check (csrc/op_checks.h,
# csrc/multi_lora_checks.h and the ops' glue), in the same order and with the
# same messages, so a wrong call fails the same way on the meta device and
# while torch.compile traces as when the kernel runs. Each argument group has
# one check function here, the Python twin of its C++ one; every fake kernel
# taking that group calls it. Static properties (dtype, dimensionality,
# presence, device) raise RuntimeError directly; sizes go through
# torch._check, so symbolic sizes add guards (or, for unbacked sizes, runtime
# assertions) instead of failing to trace. Only the checks that read tensor
# values (NaN or Inf inputs, an unsorted code map, ranks and adapter indices
# out of range) have no fake counterpart.

# c10's names of the scalar types, which the C++ messages print.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The linear ops also take float64 (a reference path in ATen; see csrc/op_checks.h).
_LINEAR_DTYPES = _FLOAT_DTYPES + (torch.float64,)
# nf4::kNestedBlocksize: double quantization keeps one fp32 scale per 256 absmax codes.
_NESTED_BLOCKSIZE = 256


def _dtype_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _shape(sizes) -> str:
    """Sizes as c10 prints an IntArrayRef: ``[2, 45]``."""
    return f"[{', '.join(str(size) for size in sizes)}]"


def _fail(op: str, message: str):
    raise RuntimeError(f"{op}: {message}")


def _check_sizes(op: str, sizes, expected, message) -> None:
    """sizes == expected, one torch._check per dimension (symbolic sizes trace)."""
    if len(sizes) != len(expected):
        _fail(op, message())
    for size, want in zip(sizes, expected):
        torch._check(size == want, lambda: f"{op}: {message()}")


# check_float_tensor
def _check_float(op: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        _fail(op, f"{name} must be float32, bfloat16 or float16, got {_dtype_name(tensor.dtype)}")


# check_linear_float
def _check_linear_float(op: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _LINEAR_DTYPES:
        _fail(op, f"{name} must be float32, bfloat16, float16 or float64, got "
                  f"{_dtype_name(tensor.dtype)}")


# check_dtype
def _check_dtype(op: str, name: str, tensor: torch.Tensor, expected: torch.dtype) -> None:
    if tensor.dtype != expected:
        _fail(op, f"{name} must be {_dtype_name(expected)}, got {_dtype_name(tensor.dtype)}")


# check_numel
def _check_numel(op: str, name: str, tensor: torch.Tensor, expected, why: str) -> None:
    torch._check(tensor.numel() == expected,
                 lambda: f"{op}: {name} must have {expected} elements ({why}), got "
                         f"{tensor.numel()}")


# check_same_device
def _check_same_device(op: str, name: str, tensor: torch.Tensor, reference: torch.Tensor,
                       reference_name: str) -> None:
    if tensor.device != reference.device:
        _fail(op, f"{name} is on {tensor.device} but {reference_name} is on {reference.device}")


# check_blocksize (NF4)
def _check_blocksize(op: str, blocksize: int) -> None:
    torch._check(isinstance(blocksize, int) and 32 <= blocksize <= 4096
                 and blocksize & (blocksize - 1) == 0,
                 lambda: f"{op}: blocksize must be a power of two in [32, 4096], got {blocksize}")


# The 8-bit ops' blocksize (any positive one).
def _check_positive_blocksize(op: str, blocksize: int) -> None:
    torch._check(blocksize > 0, lambda: f"{op}: blocksize must be positive, got {blocksize}")


# The 8-bit code map: float32, 256 entries (its order is a value check).
def _check_code_map(op: str, code: torch.Tensor) -> None:
    _check_dtype(op, "code", code, torch.float32)
    _check_numel(op, "code", code, 256, "an 8-bit code map")


# check_linear_input: input [..., in_features] of a float dtype the linear ops take.
def _check_linear_input(op: str, input: torch.Tensor, in_features) -> None:
    _check_linear_float(op, "input", input)
    if input.dim() < 1:
        _fail(op, "input must have at least one dimension")
    torch._check(input.shape[-1] == in_features,
                 lambda: f"{op}: input's last dimension must be in_features={in_features}, got "
                         f"input of shape {_shape(input.shape)}")


# Nf4WeightArgs::validate: the NF4 weight group against the input's device.
def _check_nf4_weight(op, device_reference, packed, absmax, nested_absmax, nested_code,
                      out_features, in_features, blocksize) -> None:
    torch._check(out_features > 0 and in_features > 0,
                 lambda: f"{op}: out_features and in_features must be positive, got "
                         f"{out_features} and {in_features}")
    _check_blocksize(op, blocksize)
    _check_dtype(op, "packed", packed, torch.uint8)
    numel = out_features * in_features
    blocks = _num_blocks(numel, blocksize)
    _check_numel(op, "packed", packed, (numel + 1) // 2,
                 "two 4-bit codes per byte of out_features * in_features")
    _check_same_device(op, "packed", packed, device_reference, "input")
    _check_same_device(op, "absmax", absmax, device_reference, "input")
    _check_numel(op, "absmax", absmax, blocks, "one scale per block")
    if (nested_absmax is None) != (nested_code is None):
        _fail(op, "nested_absmax and nested_code must both be given (double quantization) or "
                  "both be None")
    if nested_absmax is not None:
        _check_dtype(op, "absmax (double-quantized codes)", absmax, torch.uint8)
        _check_dtype(op, "nested_absmax", nested_absmax, torch.float32)
        _check_dtype(op, "nested_code", nested_code, torch.float32)
        _check_numel(op, "nested_absmax", nested_absmax, _num_blocks(blocks, _NESTED_BLOCKSIZE),
                     "one scale per 256 blocks")
        _check_numel(op, "nested_code", nested_code, 256, "the 8-bit code map")
        _check_same_device(op, "nested_absmax", nested_absmax, device_reference, "input")
        _check_same_device(op, "nested_code", nested_code, device_reference, "input")
    else:
        _check_dtype(op, "absmax", absmax, torch.float32)


# check_bias
def _check_bias(op: str, bias: Optional[torch.Tensor], input: torch.Tensor, out_features) -> None:
    if bias is None:
        return
    _check_dtype(op, "bias", bias, input.dtype)
    _check_numel(op, "bias", bias, out_features, "one value per output feature")
    if bias.dim() != 1:
        _fail(op, f"bias must be 1-D, got shape {_shape(bias.shape)}")
    _check_same_device(op, "bias", bias, input, "input")


# check_lora_factors: lora_A [r, in], lora_B [out, r], of input's dtype, or
# both float32 with a bfloat16 or float16 input.
def _check_lora_factors(op, input, lora_A, lora_B, out_features, in_features) -> None:
    reduced = input.dtype in (torch.bfloat16, torch.float16)
    factors = torch.float32 if reduced and lora_A.dtype == torch.float32 else input.dtype
    if lora_A.dtype != factors:
        allowed = " (input's dtype) or float32" if reduced else " (input's dtype)"
        _fail(op, f"lora_A must be {_dtype_name(input.dtype)}{allowed}, got "
                  f"{_dtype_name(lora_A.dtype)}")
    _check_dtype(op, "lora_B", lora_B, factors)
    _check_same_device(op, "lora_A", lora_A, input, "input")
    _check_same_device(op, "lora_B", lora_B, input, "input")
    if lora_A.dim() != 2:
        _fail(op, f"lora_A must have shape [r, {in_features}], got {_shape(lora_A.shape)}")
    torch._check(lora_A.shape[1] == in_features,
                 lambda: f"{op}: lora_A must have shape [r, {in_features}], got "
                         f"{_shape(lora_A.shape)}")
    _check_sizes(op, lora_B.shape, (out_features, lora_A.shape[0]),
                 lambda: f"lora_B must have shape [{out_features}, {lora_A.shape[0]}], got "
                         f"{_shape(lora_B.shape)}")


# check_lora_input
def _check_lora_input(op: str, lora_input: Optional[torch.Tensor], input: torch.Tensor) -> None:
    if lora_input is None:
        return
    _check_dtype(op, "lora_input", lora_input, input.dtype)
    _check_sizes(op, lora_input.shape, input.shape,
                 lambda: f"lora_input must have input's shape {_shape(input.shape)}, got "
                         f"{_shape(lora_input.shape)}")
    _check_same_device(op, "lora_input", lora_input, input, "input")


# A dense base weight [out, in] of input's dtype.
def _check_dense_weight(op: str, weight: torch.Tensor, input: torch.Tensor) -> None:
    _check_dtype(op, "weight", weight, input.dtype)
    if weight.dim() != 2:
        _fail(op, f"weight must be 2-D [out, in], got {_shape(weight.shape)}")


# checked_linear_weight: nf4_linear's and qlora_linear's input, weight and bias.
def _check_linear_weight(op, input, packed, absmax, nested_absmax, nested_code, out_features,
                         in_features, blocksize, bias) -> None:
    _check_linear_input(op, input, in_features)
    _check_nf4_weight(op, input, packed, absmax, nested_absmax, nested_code, out_features,
                      in_features, blocksize)
    _check_bias(op, bias, input, out_features)


# checked_grad_input_weight: nf4_linear_grad_input's grad_output and weight.
def _check_grad_input_weight(op, grad_output, packed, absmax, nested_absmax, nested_code,
                             out_features, in_features, blocksize) -> None:
    _check_linear_float(op, "grad_output", grad_output)
    if grad_output.dim() < 1:
        _fail(op, f"grad_output's last dimension must be out_features={out_features}, got "
                  f"shape {_shape(grad_output.shape)}")
    torch._check(grad_output.shape[-1] == out_features,
                 lambda: f"{op}: grad_output's last dimension must be out_features="
                         f"{out_features}, got shape {_shape(grad_output.shape)}")
    _check_nf4_weight(op, grad_output, packed, absmax, nested_absmax, nested_code, out_features,
                      in_features, blocksize)


# check_multi_lora_args (shapes, dtypes, devices; not the values of ranks and
# adapter_indices). `other` is base_output or grad_output, [..., out_features].
def _check_multi_lora(op, input, other, other_name, lora_A, lora_B, ranks, scalings,
                      adapter_indices) -> None:
    _check_float(op, "input", input)
    if input.dim() < 1:
        _fail(op, "input must have at least one dimension")
    in_features = input.shape[-1]
    _check_dtype(op, "lora_A", lora_A, input.dtype)
    _check_dtype(op, "lora_B", lora_B, input.dtype)
    _check_dtype(op, other_name, other, input.dtype)
    lora_A_message = (lambda: f"lora_A must have shape [num_adapters, max_rank, {in_features}] "
                              f"(in_features from input), got {_shape(lora_A.shape)}")
    if lora_A.dim() != 3:
        _fail(op, lora_A_message())
    torch._check(lora_A.shape[2] == in_features, lambda: f"{op}: {lora_A_message()}")
    num_adapters, max_rank = lora_A.shape[0], lora_A.shape[1]
    lora_B_message = (lambda: f"lora_B must have shape [{num_adapters}, out_features, "
                              f"{max_rank}] (num_adapters and max_rank from lora_A), got "
                              f"{_shape(lora_B.shape)}")
    if lora_B.dim() != 3:
        _fail(op, lora_B_message())
    _check_sizes(op, lora_B.shape, (num_adapters, lora_B.shape[1], max_rank), lora_B_message)
    expected = (*input.shape[:-1], lora_B.shape[1])
    _check_sizes(op, other.shape, expected,
                 lambda: f"{other_name} must have shape {_shape(expected)} (input's leading "
                         f"dimensions, out_features from lora_B), got {_shape(other.shape)}")
    _check_dtype(op, "ranks", ranks, torch.int64)
    _check_dtype(op, "scalings", scalings, torch.float32)
    _check_dtype(op, "adapter_indices", adapter_indices, torch.int64)
    for name, tensor in (("ranks", ranks), ("scalings", scalings)):
        _check_sizes(op, tensor.shape, (num_adapters,),
                     lambda name=name, tensor=tensor: f"{name} must have shape [{num_adapters}] "
                                                      f"(one per adapter), got "
                                                      f"{_shape(tensor.shape)}")
    leading = input.shape[:-1]
    _check_sizes(op, adapter_indices.shape, leading[:adapter_indices.dim()],
                 lambda: f"adapter_indices' shape must be a prefix of input's leading "
                         f"dimensions {_shape(leading)}, got {_shape(adapter_indices.shape)}")
    for name, tensor in ((other_name, other), ("lora_A", lora_A), ("lora_B", lora_B),
                         ("ranks", ranks), ("scalings", scalings),
                         ("adapter_indices", adapter_indices)):
        _check_same_device(op, name, tensor, input, "input")


@_register_fake("nf4_quantize")
def _nf4_quantize_fake(input, blocksize):
    op = "nf4_quantize"
    _check_float(op, "input", input)
    _check_blocksize(op, blocksize)
    numel = input.numel()
    torch._check(numel > 0, lambda: f"{op}: input must not be empty, got shape "
                                    f"{_shape(input.shape)}")
    packed = input.new_empty(((numel + 1) // 2,), dtype=torch.uint8)
    absmax = input.new_empty((_num_blocks(numel, blocksize),), dtype=torch.float32)
    return packed, absmax


@_register_fake("nf4_dequantize")
def _nf4_dequantize_fake(packed, absmax, shape, blocksize, dtype):
    op = "nf4_dequantize"
    _check_blocksize(op, blocksize)
    if dtype not in _FLOAT_DTYPES:
        _fail(op, f"dtype must be float32, bfloat16 or float16, got {_dtype_name(dtype)}")
    _check_dtype(op, "packed", packed, torch.uint8)
    _check_dtype(op, "absmax", absmax, torch.float32)
    _check_same_device(op, "absmax", absmax, packed, "packed")
    numel = 1
    for size in shape:
        torch._check(size >= 0, lambda: f"{op}: shape must not have negative sizes, got "
                                        f"{_shape(shape)}")
        numel = numel * size
    torch._check(numel > 0, lambda: f"{op}: shape must describe a non-empty tensor, got "
                                    f"{_shape(shape)}")
    _check_numel(op, "packed", packed, (numel + 1) // 2, "two 4-bit codes per byte of shape")
    _check_numel(op, "absmax", absmax, _num_blocks(numel, blocksize),
                 "one scale per block of shape")
    return packed.new_empty(shape, dtype=dtype)


@_register_fake("quantize_blockwise_8bit")
def _quantize_blockwise_8bit_fake(input, code, blocksize):
    op = "quantize_blockwise_8bit"
    _check_dtype(op, "input", input, torch.float32)
    _check_code_map(op, code)
    _check_same_device(op, "code", code, input, "input")
    _check_positive_blocksize(op, blocksize)
    torch._check(input.numel() > 0, lambda: f"{op}: input must not be empty")
    codes = torch.empty_like(input, dtype=torch.uint8)
    absmax = input.new_empty((_num_blocks(input.numel(), blocksize),), dtype=torch.float32)
    return codes, absmax


@_register_fake("dequantize_blockwise_8bit")
def _dequantize_blockwise_8bit_fake(codes, absmax, code, blocksize):
    op = "dequantize_blockwise_8bit"
    _check_dtype(op, "codes", codes, torch.uint8)
    _check_dtype(op, "absmax", absmax, torch.float32)
    _check_code_map(op, code)
    _check_same_device(op, "absmax", absmax, codes, "codes")
    _check_same_device(op, "code", code, codes, "codes")
    _check_positive_blocksize(op, blocksize)
    _check_numel(op, "absmax", absmax, _num_blocks(codes.numel(), blocksize),
                 "one scale per block of codes")
    return torch.empty_like(codes, dtype=torch.float32)


def _linear_out_fake(input, out_features):
    return input.new_empty((*input.shape[:-1], out_features))


@_register_fake("nf4_linear")
def _nf4_linear_fake(input, packed, absmax, nested_absmax, nested_code, offset,
                     out_features, in_features, blocksize, bias):
    _check_linear_weight("nf4_linear", input, packed, absmax, nested_absmax, nested_code,
                         out_features, in_features, blocksize, bias)
    return _linear_out_fake(input, out_features)


@_register_fake("nf4_linear_grad_input")
def _nf4_linear_grad_input_fake(grad_output, packed, absmax, nested_absmax, nested_code,
                                offset, out_features, in_features, blocksize):
    _check_grad_input_weight("nf4_linear_grad_input", grad_output, packed, absmax, nested_absmax,
                             nested_code, out_features, in_features, blocksize)
    return _linear_out_fake(grad_output, in_features)


@_register_fake("lora_linear")
def _lora_linear_fake(input, lora_input, weight, bias, lora_A, lora_B, scaling):
    op = "lora_linear"
    _check_linear_float(op, "input", input)
    _check_dense_weight(op, weight, input)
    _check_same_device(op, "weight", weight, input, "input")
    out_features, in_features = weight.shape
    _check_linear_input(op, input, in_features)
    _check_bias(op, bias, input, out_features)
    _check_lora_input(op, lora_input, input)
    _check_lora_factors(op, input, lora_A, lora_B, out_features, in_features)
    return _linear_out_fake(input, out_features)


def _lora_backward_fake(input, lora_input, lora_A, lora_B):
    grad_lora_input = (
        torch.empty_like(lora_input) if lora_input is not None else input.new_empty((0,))
    )
    return (torch.empty_like(input), grad_lora_input, torch.empty_like(lora_A),
            torch.empty_like(lora_B))


@_register_fake("lora_linear_backward")
def _lora_linear_backward_fake(grad_output, input, lora_input, weight, lora_A, lora_B, scaling):
    op = "lora_linear_backward"
    _check_linear_float(op, "input", input)
    _check_dtype(op, "grad_output", grad_output, input.dtype)
    _check_dense_weight(op, weight, input)
    out_features, in_features = weight.shape
    _check_linear_input(op, input, in_features)
    _check_grad_output_shape(op, grad_output, input, out_features)
    _check_lora_input(op, lora_input, input)
    _check_lora_factors(op, input, lora_A, lora_B, out_features, in_features)
    return _lora_backward_fake(input, lora_input, lora_A, lora_B)


def _check_grad_output_shape(op, grad_output, input, out_features):
    expected = (*input.shape[:-1], out_features)
    _check_sizes(op, grad_output.shape, expected,
                 lambda: f"grad_output must have shape {_shape(expected)}, got "
                         f"{_shape(grad_output.shape)}")


@_register_fake("qlora_linear")
def _qlora_linear_fake(input, lora_input, packed, absmax, nested_absmax, nested_code, offset,
                       out_features, in_features, blocksize, bias, lora_A, lora_B, scaling):
    op = "qlora_linear"
    _check_linear_weight(op, input, packed, absmax, nested_absmax, nested_code, out_features,
                         in_features, blocksize, bias)
    _check_lora_input(op, lora_input, input)
    _check_lora_factors(op, input, lora_A, lora_B, out_features, in_features)
    return _linear_out_fake(input, out_features)


@_register_fake("qlora_linear_backward")
def _qlora_linear_backward_fake(grad_output, input, lora_input, packed, absmax, nested_absmax,
                                nested_code, offset, out_features, in_features, blocksize,
                                lora_A, lora_B, scaling):
    op = "qlora_linear_backward"
    _check_linear_input(op, input, in_features)
    _check_dtype(op, "grad_output", grad_output, input.dtype)
    _check_grad_output_shape(op, grad_output, input, out_features)
    _check_lora_input(op, lora_input, input)
    _check_lora_factors(op, input, lora_A, lora_B, out_features, in_features)
    # The real kernel leaves grad_output and the weight to nf4_linear_grad_input,
    # which it calls: its messages name that op.
    _check_grad_input_weight("nf4_linear_grad_input", grad_output, packed, absmax,
                             nested_absmax, nested_code, out_features, in_features, blocksize)
    return _lora_backward_fake(input, lora_input, lora_A, lora_B)


@_register_fake("multi_lora_linear")
def _multi_lora_linear_fake(input, base_output, lora_A, lora_B, ranks, scalings,
                            adapter_indices):
    _check_multi_lora("multi_lora_linear", input, base_output, "base_output", lora_A, lora_B,
                      ranks, scalings, adapter_indices)
    return torch.empty_like(base_output, memory_format=torch.contiguous_format)


@_register_fake("multi_lora_linear_backward")
def _multi_lora_linear_backward_fake(grad_output, input, lora_A, lora_B, ranks, scalings,
                                     adapter_indices):
    _check_multi_lora("multi_lora_linear_backward", input, grad_output, "grad_output", lora_A,
                      lora_B, ranks, scalings, adapter_indices)
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            torch.empty_like(lora_A, memory_format=torch.contiguous_format),
            torch.empty_like(lora_B, memory_format=torch.contiguous_format))


@_register_fake("dropout")
def _dropout_fake(input, p, seed):
    op = "dropout"
    _check_float(op, "input", input)
    if not 0.0 <= p < 1.0:
        _fail(op, f"p must be in [0, 1), got {p:g}")
    # On the meta device (every argument meta) the seed may be meta as well.
    if (seed.dtype != torch.int64 or seed.numel() != 1
            or seed.device.type not in ("cpu", "meta")):
        _fail(op, f"seed must be a CPU int64 tensor with one element, got "
                  f"{_dtype_name(seed.dtype)} with {seed.numel()} elements on {seed.device}")
    return torch.empty_like(input, memory_format=torch.contiguous_format)


# nf4_quantize and quantize_blockwise_8bit are not differentiable: their
# outputs are integer codes and the block scales that go with them, a step
# function of the input. Without an Autograd kernel torch's fallback gives an
# input that requires grad an absmax that requires grad too, through a node
# with no derivative: backward warns (deprecated) and leaves the input's
# gradient out, and opcheck's AOT-dispatch check fails on it. A fallthrough
# (no Python in the call path) declares them non-differentiable, as the
# fallback's own warning suggests: their outputs never require grad.
_NON_DIFFERENTIABLE = ("nf4_quantize", "quantize_blockwise_8bit")
_autograd_library = torch.library.Library("lowrank_ext", "IMPL")
for _name in _NON_DIFFERENTIABLE:
    _autograd_library.impl(_name, torch.library.fallthrough_kernel, "Autograd")
del _name

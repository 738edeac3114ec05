"""Typed Python wrappers over ``torch.ops.lowrank_ext.*``.

Every op here is a torch custom op (schema in ``csrc/registration.cpp``) with a
fake kernel, so ``torch.compile(fullgraph=True)`` can trace it, and the
differentiable ones have autograd (registered in C++, ``csrc/autograd.cpp``).
CPU and CUDA kernels register for the same names; the dispatcher picks the
backend from the tensors' device. Under ``torch.autocast`` the linear ops cast
their floating activation and weight arguments to the autocast dtype, as torch
does for ``F.linear`` (``csrc/autocast.cpp``); given forward-mode tangents they
compute the same math in differentiable ATen ops (``csrc/autograd.cpp``).

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

from . import _C  # noqa: F401  (loads the library that registers the ops)

_ops = torch.ops.lowrank_ext

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
    return _ops.nf4_quantize(input, blocksize)


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
    fp32. On CPU, few rows (up to 16 for float32/float16, 6 for bfloat16)
    take a fused GEMV that reads the 4-bit weight directly with the exact
    fp32 dequantized values, except on CPUs with AVX512-BF16 for bfloat16
    input with ``in_features % 64 == 0``: that GEMV multiplies the bfloat16
    activations by the NF4 codebook rounded to bfloat16 (relative error up
    to 2^-9 per weight, within the output's bfloat16 rounding; products
    below fp32's normal range count as zero), then applies the fp32 block
    scales. More rows dequantize panels of W into input's dtype (float32 for
    float16 input) and multiply them with ATen's GEMM, so there the weight
    is rounded to bfloat16 for bfloat16 input, as a dense bfloat16 layer
    would hold it.

    Differentiable with respect to ``input`` and ``bias`` (W is frozen).
    Raises ``RuntimeError`` naming the argument for wrong shapes, dtypes,
    devices or sizes of the weight group.
    """
    return _ops.nf4_linear(
        input, packed, absmax, nested_absmax, nested_code, float(offset),
        out_features, in_features, blocksize, bias,
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
    return _ops.lora_linear(input, lora_input, weight, bias, lora_A, lora_B, float(scaling))


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
    return _ops.qlora_linear(
        input, lora_input, packed, absmax, nested_absmax, nested_code, float(offset),
        out_features, in_features, blocksize, bias, lora_A, lora_B, float(scaling),
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
    return _ops.multi_lora_linear(input, base_output, lora_A, lora_B, ranks, scalings,
                                  adapter_indices)


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
    return _ops.dropout(input, float(p), seed)


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


# The fake kernels check what the real ones check about dtypes, block sizes
# and the NF4 weight's sizes, so a wrong call fails the same way on the meta
# device and while torch.compile traces, not only when the kernel runs.
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_blocksize(op: str, blocksize: int) -> None:
    torch._check(isinstance(blocksize, int) and 32 <= blocksize <= 4096
                 and blocksize & (blocksize - 1) == 0,
                 lambda: f"{op}: blocksize must be a power of two in [32, 4096], got {blocksize}")


def _check_float(op: str, name: str, tensor: torch.Tensor) -> None:
    torch._check(tensor.dtype in _FLOAT_DTYPES,
                 lambda: f"{op}: {name} must be float32, bfloat16 or float16, got {tensor.dtype}")


def _check_numel(op: str, name: str, tensor: torch.Tensor, expected, why: str) -> None:
    torch._check(tensor.numel() == expected,
                 lambda: f"{op}: {name} must have {expected} elements ({why}), got "
                         f"{tensor.numel()}")


# The linear ops also take float64 (a reference path in ATen; see csrc/op_checks.h).
_LINEAR_DTYPES = _FLOAT_DTYPES + (torch.float64,)


def _check_rows(op: str, name: str, tensor: torch.Tensor, features, field: str) -> None:
    torch._check(tensor.dtype in _LINEAR_DTYPES,
                 lambda: f"{op}: {name} must be float32, bfloat16, float16 or float64, got "
                         f"{tensor.dtype}")
    torch._check(tensor.dim() >= 1 and tensor.shape[-1] == features,
                 lambda: f"{op}: {name}'s last dimension must be {field}={features}, got "
                         f"shape {tuple(tensor.shape)}")


def _check_nf4_weight(op, packed, absmax, out_features, in_features, blocksize):
    _check_blocksize(op, blocksize)
    numel = out_features * in_features
    _check_numel(op, "packed", packed, (numel + 1) // 2,
                 "two 4-bit codes per byte of out_features * in_features")
    _check_numel(op, "absmax", absmax, _num_blocks(numel, blocksize), "one scale per block")


@_register_fake("nf4_quantize")
def _nf4_quantize_fake(input, blocksize):
    _check_blocksize("nf4_quantize", blocksize)
    _check_float("nf4_quantize", "input", input)
    numel = input.numel()
    torch._check(numel > 0, lambda: "nf4_quantize: input must not be empty")
    packed = input.new_empty(((numel + 1) // 2,), dtype=torch.uint8)
    absmax = input.new_empty((_num_blocks(numel, blocksize),), dtype=torch.float32)
    return packed, absmax


@_register_fake("nf4_dequantize")
def _nf4_dequantize_fake(packed, absmax, shape, blocksize, dtype):
    op = "nf4_dequantize"
    _check_blocksize(op, blocksize)
    torch._check(dtype in _FLOAT_DTYPES,
                 lambda: f"{op}: dtype must be float32, bfloat16 or float16, got {dtype}")
    numel = 1
    for size in shape:
        numel = numel * size
    _check_numel(op, "packed", packed, (numel + 1) // 2, "two 4-bit codes per byte of shape")
    _check_numel(op, "absmax", absmax, _num_blocks(numel, blocksize), "one scale per block of shape")
    return packed.new_empty(shape, dtype=dtype)


@_register_fake("quantize_blockwise_8bit")
def _quantize_blockwise_8bit_fake(input, code, blocksize):
    codes = torch.empty_like(input, dtype=torch.uint8)
    absmax = input.new_empty((_num_blocks(input.numel(), blocksize),), dtype=torch.float32)
    return codes, absmax


@_register_fake("dequantize_blockwise_8bit")
def _dequantize_blockwise_8bit_fake(codes, absmax, code, blocksize):
    return torch.empty_like(codes, dtype=torch.float32)


def _linear_out_fake(input, out_features):
    return input.new_empty((*input.shape[:-1], out_features))


@_register_fake("nf4_linear")
def _nf4_linear_fake(input, packed, absmax, nested_absmax, nested_code, offset,
                     out_features, in_features, blocksize, bias):
    _check_nf4_weight("nf4_linear", packed, absmax, out_features, in_features, blocksize)
    _check_rows("nf4_linear", "input", input, in_features, "in_features")
    return _linear_out_fake(input, out_features)


@_register_fake("nf4_linear_grad_input")
def _nf4_linear_grad_input_fake(grad_output, packed, absmax, nested_absmax, nested_code,
                                offset, out_features, in_features, blocksize):
    op = "nf4_linear_grad_input"
    _check_nf4_weight(op, packed, absmax, out_features, in_features, blocksize)
    _check_rows(op, "grad_output", grad_output, out_features, "out_features")
    return _linear_out_fake(grad_output, in_features)


@_register_fake("lora_linear")
def _lora_linear_fake(input, lora_input, weight, bias, lora_A, lora_B, scaling):
    return _linear_out_fake(input, weight.shape[0])


def _lora_backward_fake(input, lora_input, lora_A, lora_B):
    grad_lora_input = (
        torch.empty_like(lora_input) if lora_input is not None else input.new_empty((0,))
    )
    return (torch.empty_like(input), grad_lora_input, torch.empty_like(lora_A),
            torch.empty_like(lora_B))


@_register_fake("lora_linear_backward")
def _lora_linear_backward_fake(grad_output, input, lora_input, weight, lora_A, lora_B, scaling):
    return _lora_backward_fake(input, lora_input, lora_A, lora_B)


@_register_fake("qlora_linear")
def _qlora_linear_fake(input, lora_input, packed, absmax, nested_absmax, nested_code, offset,
                       out_features, in_features, blocksize, bias, lora_A, lora_B, scaling):
    _check_nf4_weight("qlora_linear", packed, absmax, out_features, in_features, blocksize)
    _check_rows("qlora_linear", "input", input, in_features, "in_features")
    return _linear_out_fake(input, out_features)


@_register_fake("qlora_linear_backward")
def _qlora_linear_backward_fake(grad_output, input, lora_input, packed, absmax, nested_absmax,
                                nested_code, offset, out_features, in_features, blocksize,
                                lora_A, lora_B, scaling):
    return _lora_backward_fake(input, lora_input, lora_A, lora_B)


@_register_fake("multi_lora_linear")
def _multi_lora_linear_fake(input, base_output, lora_A, lora_B, ranks, scalings,
                            adapter_indices):
    return torch.empty_like(base_output, memory_format=torch.contiguous_format)


@_register_fake("multi_lora_linear_backward")
def _multi_lora_linear_backward_fake(grad_output, input, lora_A, lora_B, ranks, scalings,
                                     adapter_indices):
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            torch.empty_like(lora_A, memory_format=torch.contiguous_format),
            torch.empty_like(lora_B, memory_format=torch.contiguous_format))


@_register_fake("dropout")
def _dropout_fake(input, p, seed):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


# The ops' autograd is registered in C++ (csrc/autograd.cpp): a Python autograd
# kernel would add its interpreter overhead to every call, under no_grad too.

"""One table of sample inputs for every op of the ``lowrank_ext`` namespace.

For each op the dispatcher knows, ``SAMPLES`` holds valid inputs and
``BAD_SAMPLES`` invalid ones (a wrong dtype, a wrong shape):

* every valid sample passes ``torch.library.opcheck`` (schema, autograd
  registration, fake kernel against the real one, AOT dispatch with dynamic
  shapes), once with plain inputs and, for the ops with an autograd kernel,
  once with their floating inputs requiring grad (so opcheck also runs the
  backward, which calls the ``*_backward`` / ``*_grad_input`` ops); the ops
  declared non-differentiable (a fallthrough Autograd kernel: the quantizers)
  also run with an input requiring grad, and none of their outputs may;
* every invalid sample is rejected by the real kernel with a RuntimeError
  whose message names the op and the argument, and by the fake kernel (what
  ``torch.compile`` and the meta device run) with the same exception type and
  a message matching the same pattern. Where a fake kernel accepts what the
  real one rejects, the case is an ``xfail(strict=True)`` with the reason, so
  fixing the fake kernel makes the test fail until the mark goes. The fake
  kernels mirror the C++ checks message for message, which a second test
  holds them to;
* under ``torch.compile(fullgraph=True)`` a bad input fails while tracing,
  with the kernel's message, and the fake kernels' checks leave dynamic
  batch sizes symbolic (one graph for every batch size);
* a test fails when an op is registered without samples of both kinds, or
  when the table names an op that no longer exists.

Numerical correctness is each op's own test file's job; here only the op
contract is checked, on small awkward shapes (odd sizes, partial blocks, one
row, no rows), on the CPU ISA in use (every ISA path is held to its
reference in the op tests), and on CUDA as well when this build and machine
have it. Checks that read tensor values (NaN in the input, ranks or adapter
indices out of range) have no fake counterpart and are tested with the ops.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lowrank_ext
from lowrank_ext import NF4Weight, ops

NAMESPACE = "lowrank_ext"
DEVICES = ["cpu"]
if torch.cuda.is_available() and "cuda" in lowrank_ext.build_info()["backends"]:
    DEVICES.append("cuda")
# dropout has a CPU kernel only (the layers use F.dropout on CUDA).
CPU_ONLY = {"dropout"}

bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def registered_ops() -> list[str]:
    """Names of every op of the namespace that the dispatcher has."""
    prefix = f"{NAMESPACE}::"
    return sorted({name[len(prefix):].split(".")[0]
                   for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix)})


def differentiable(op: str) -> bool:
    """Whether the op has an autograd kernel (csrc/autograd.cpp)."""
    name = f"{NAMESPACE}::{op}"
    return (torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")
            and not torch._C._dispatch_kernel_for_dispatch_key_is_fallthrough(name, "Autograd"))


def non_differentiable(op: str) -> bool:
    """Whether the op is declared non-differentiable: a fallthrough Autograd
    kernel (python/lowrank_ext/ops.py), so its outputs never require grad."""
    name = f"{NAMESPACE}::{op}"
    return (torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")
            and torch._C._dispatch_kernel_for_dispatch_key_is_fallthrough(name, "Autograd"))


class Make:
    """Fresh random sample tensors on one device; with ``grad`` the floating
    inputs an op differentiates with respect to require grad."""

    def __init__(self, generator: torch.Generator, device: str, grad: bool = False):
        self.generator = generator
        self.device = device
        self.grad = grad

    def randn(self, *shape, dtype=fp32, trainable=False, scale=1.0) -> torch.Tensor:
        tensor = (torch.randn(*shape, generator=self.generator) * scale).to(self.device, dtype)
        return tensor.requires_grad_(trainable and self.grad)

    def nf4(self, out_features=19, in_features=45, blocksize=32, double_quant=True) -> list:
        """An NF4 weight's argument group (packed ... blocksize), 19x45 in
        blocks of 32 by default: odd sizes, blocks straddling rows, a partial
        last block, double-quantized scales."""
        dense = torch.randn(out_features, in_features, generator=self.generator)
        weight = NF4Weight.from_float(dense, blocksize=blocksize, double_quant=double_quant)
        return list(weight.to(self.device).linear_args())

    def factors(self, rank, out_features=19, in_features=45, dtype=fp32) -> list:
        return [self.randn(rank, in_features, dtype=dtype, trainable=True,
                           scale=in_features ** -0.5),
                self.randn(out_features, rank, dtype=dtype, trainable=True)]

    def multi_lora(self, leading, in_features, out_features, num_adapters, max_rank,
                   dtype=fp32, index_dims=None) -> list:
        """multi_lora_linear's arguments; ranks include max_rank and 0, indices -1."""
        ranks = torch.randint(0, max_rank + 1, (num_adapters,), generator=self.generator)
        ranks[0] = max_rank
        if num_adapters > 1:
            ranks[1] = 0
        scalings = torch.rand(num_adapters, generator=self.generator) * 2 + 0.25
        index_shape = tuple(leading[:len(leading) if index_dims is None else index_dims])
        indices = torch.randint(-1, num_adapters, index_shape, generator=self.generator)
        return [self.randn(*leading, in_features, dtype=dtype, trainable=True),
                self.randn(*leading, out_features, dtype=dtype, trainable=True),
                self.randn(num_adapters, max_rank, in_features, dtype=dtype, trainable=True,
                           scale=in_features ** -0.5),
                self.randn(num_adapters, out_features, max_rank, dtype=dtype, trainable=True),
                ranks.to(self.device), scalings.to(self.device), indices.to(self.device)]

    def quantized(self, shape, blocksize=64) -> list:
        return list(ops.nf4_quantize(self.randn(*shape), blocksize))

    def quantized_8bit(self, numel=600, blocksize=256) -> list:
        code = lowrank_ext.dynamic_map(self.device)
        return [*ops.quantize_blockwise_8bit(self.randn(numel), code, blocksize), code]


@dataclasses.dataclass(frozen=True)
class Sample:
    """Valid inputs: ``build(make)`` returns the op's positional arguments."""
    id: str
    build: Callable[[Make], tuple]


@dataclasses.dataclass(frozen=True)
class BadSample:
    """Invalid inputs. ``match`` is a regex both kernels' messages must match
    (the op, the argument, what was expected); ``fake_accepts`` says why the
    fake kernel lets the input through, for a known gap."""
    id: str
    build: Callable[[Make], tuple]
    match: str
    fake_accepts: str = ""
    # Why the fake kernel's message is not the real one's, word for word.
    message_differs: str = ""


def with_item(args, index, value) -> tuple:
    """args with args[index] replaced by value."""
    args = list(args)
    args[index] = value
    return tuple(args)


# Positions in the NF4 weight group returned by Make.nf4.
PACKED, ABSMAX, NESTED_ABSMAX, NESTED_CODE = 0, 1, 2, 3

def lora_linear_args(make, rows=5, dtype=fp32, factor_dtype=None, lora_input=False, bias=True,
                     rank=4):
    factor_dtype = factor_dtype or dtype
    return (make.randn(rows, 45, dtype=dtype, trainable=True),
            make.randn(rows, 45, dtype=dtype, trainable=True) if lora_input else None,
            make.randn(19, 45, dtype=dtype, trainable=True),
            make.randn(19, dtype=dtype, trainable=True) if bias else None,
            *make.factors(rank, dtype=factor_dtype), 0.5)


def lora_backward_args(make, rows=5, dtype=fp32, factor_dtype=None, lora_input=False):
    factor_dtype = factor_dtype or dtype
    return (make.randn(rows, 19, dtype=dtype), make.randn(rows, 45, dtype=dtype),
            make.randn(rows, 45, dtype=dtype) if lora_input else None,
            make.randn(19, 45, dtype=dtype), *make.factors(4, dtype=factor_dtype), 0.5)


def nf4_linear_args(make, leading=(2,), dtype=fp32, bias=True, **weight):
    weight = make.nf4(**weight)
    return (make.randn(*leading, weight[6], dtype=dtype, trainable=True), *weight,
            make.randn(weight[5], dtype=dtype, trainable=True) if bias else None)


def qlora_linear_args(make, rows=2, dtype=fp32, factor_dtype=None, lora_input=False, bias=True):
    factor_dtype = factor_dtype or dtype
    return (make.randn(rows, 45, dtype=dtype, trainable=True),
            make.randn(rows, 45, dtype=dtype, trainable=True) if lora_input else None,
            *make.nf4(), make.randn(19, dtype=dtype, trainable=True) if bias else None,
            *make.factors(4, dtype=factor_dtype), 0.5)


def qlora_backward_args(make, rows=2, dtype=fp32, factor_dtype=None, lora_input=False):
    factor_dtype = factor_dtype or dtype
    return (make.randn(rows, 19, dtype=dtype), make.randn(rows, 45, dtype=dtype),
            make.randn(rows, 45, dtype=dtype) if lora_input else None,
            *make.nf4(), *make.factors(4, dtype=factor_dtype), 0.5)


def multi_lora_backward_args(make, *shape, **options):
    args = make.multi_lora(*shape, **options)
    grad_output = make.randn(*args[1].shape, dtype=args[1].dtype)
    return (grad_output, args[0], *args[2:])


# Valid samples. Rows: few (the CPU's fused GEMV) and many (the panel GEMM);
# dtypes: every one an op takes, float32 LoRA factors with bfloat16 input.
SAMPLES: dict[str, list[Sample]] = {
    # The quantizers are not differentiable; with grad their input requires
    # grad anyway (a layer quantizing a trained weight) and no output may.
    "nf4_quantize": [
        Sample("33x65-float32-bs64", lambda make: (make.randn(33, 65, trainable=True), 64)),
        Sample("7x9-bfloat16-bs32",
               lambda make: (make.randn(7, 9, dtype=bf16, trainable=True), 32)),
        Sample("7-float16-one-partial-block",
               lambda make: (make.randn(7, dtype=fp16, trainable=True), 4096)),
    ],
    "nf4_dequantize": [
        Sample("33x65-float32", lambda make: (*make.quantized((33, 65)), [33, 65], 64, fp32)),
        Sample("33x65-float16", lambda make: (*make.quantized((33, 65)), [33, 65], 64, fp16)),
        Sample("1001-bfloat16-bs128",
               lambda make: (*make.quantized((1001,), 128), [1001], 128, bf16)),
    ],
    "quantize_blockwise_8bit": [
        Sample("600-bs256", lambda make: (make.randn(600, trainable=True),
                                          lowrank_ext.dynamic_map(make.device), 256)),
        Sample("3x100-bs64", lambda make: (make.randn(3, 100, trainable=True),
                                           lowrank_ext.dynamic_map(make.device), 64)),
    ],
    "dequantize_blockwise_8bit": [
        Sample("600-bs256", lambda make: (*make.quantized_8bit(), 256)),
        Sample("77-bs32", lambda make: (*make.quantized_8bit(77, 32), 32)),
    ],
    "nf4_linear": [
        Sample("2-rows-bias", lambda make: nf4_linear_args(make)),
        Sample("24-rows-no-bias", lambda make: nf4_linear_args(make, (24,), bias=False)),
        Sample("2x3-rows-bfloat16-plain-scales",
               lambda make: nf4_linear_args(make, (2, 3), bf16, double_quant=False)),
        Sample("20-rows-float16-bs64",
               lambda make: nf4_linear_args(make, (20,), fp16, out_features=24,
                                            in_features=64, blocksize=64)),
        Sample("3-rows-float64", lambda make: nf4_linear_args(make, (3,), fp64)),
        Sample("no-rows", lambda make: nf4_linear_args(make, (0,))),
    ],
    "nf4_linear_grad_input": [
        Sample("3-rows", lambda make: (make.randn(3, 19), *make.nf4())),
        Sample("24-rows-bfloat16", lambda make: (make.randn(24, 19, dtype=bf16), *make.nf4())),
        Sample("2x2-rows-float16-plain-scales",
               lambda make: (make.randn(2, 2, 19, dtype=fp16), *make.nf4(double_quant=False))),
        Sample("3-rows-float64", lambda make: (make.randn(3, 19, dtype=fp64), *make.nf4())),
    ],
    "lora_linear": [
        Sample("5-rows-bias", lambda make: lora_linear_args(make)),
        Sample("5-rows-lora-input", lambda make: lora_linear_args(make, lora_input=True,
                                                                  bias=False)),
        Sample("2-rows-bfloat16-float32-factors",
               lambda make: lora_linear_args(make, 2, bf16, fp32, bias=False)),
        Sample("3-rows-rank-0", lambda make: lora_linear_args(make, 3, rank=0)),
    ],
    "lora_linear_backward": [
        Sample("5-rows", lambda make: lora_backward_args(make)),
        Sample("5-rows-lora-input", lambda make: lora_backward_args(make, lora_input=True)),
        Sample("2-rows-bfloat16-float32-factors",
               lambda make: lora_backward_args(make, 2, bf16, fp32)),
    ],
    "qlora_linear": [
        Sample("2-rows-bias", lambda make: qlora_linear_args(make)),
        Sample("24-rows-lora-input", lambda make: qlora_linear_args(make, 24, lora_input=True)),
        Sample("2-rows-bfloat16-float32-factors",
               lambda make: qlora_linear_args(make, 2, bf16, fp32, bias=False)),
    ],
    "qlora_linear_backward": [
        Sample("2-rows", lambda make: qlora_backward_args(make)),
        Sample("24-rows-lora-input", lambda make: qlora_backward_args(make, 24, lora_input=True)),
        Sample("2-rows-bfloat16-float32-factors",
               lambda make: qlora_backward_args(make, 2, bf16, fp32)),
    ],
    "multi_lora_linear": [
        Sample("6-rows", lambda make: make.multi_lora((6,), 10, 7, 3, 4)),
        Sample("2x3-rows-per-sequence", lambda make: make.multi_lora((2, 3), 5, 6, 2, 3,
                                                                     index_dims=1)),
        Sample("2x3-rows-bfloat16", lambda make: make.multi_lora((2, 3), 16, 8, 2, 8, bf16, 1)),
        Sample("no-rows", lambda make: make.multi_lora((0,), 4, 4, 2, 2)),
    ],
    "multi_lora_linear_backward": [
        Sample("6-rows", lambda make: multi_lora_backward_args(make, (6,), 10, 7, 3, 4)),
        Sample("2x3-rows-bfloat16",
               lambda make: multi_lora_backward_args(make, (2, 3), 16, 8, 2, 8, dtype=bf16,
                                                     index_dims=1)),
        Sample("no-rows", lambda make: multi_lora_backward_args(make, (0,), 4, 4, 2, 2)),
    ],
    "dropout": [
        Sample("8x40-p0.2", lambda make: (make.randn(8, 40, trainable=True), 0.2,
                                          torch.tensor([3]))),
        Sample("33-bfloat16-p0.5", lambda make: (make.randn(33, dtype=bf16, trainable=True), 0.5,
                                                 torch.tensor([-7]))),
        Sample("5x3-float16-p0", lambda make: (make.randn(5, 3, dtype=fp16, trainable=True), 0.0,
                                               torch.tensor([11]))),
    ],
}


# Invalid samples: the real kernel rejects each; so must the fake kernel.
BAD_SAMPLES: dict[str, list[BadSample]] = {
    "nf4_quantize": [
        BadSample("int32-input", lambda make: (torch.ones(64, dtype=torch.int32,
                                                          device=make.device), 64),
                  r"nf4_quantize: input must be float32, bfloat16 or float16"),
        BadSample("blocksize-48", lambda make: (make.randn(64), 48),
                  r"nf4_quantize: blocksize must be a power of two in \[32, 4096\]"),
        BadSample("empty-input", lambda make: (make.randn(0), 64),
                  r"nf4_quantize: input must not be empty"),
    ],
    "nf4_dequantize": [
        BadSample("int32-dtype", lambda make: (*make.quantized((33, 65)), [33, 65], 64,
                                               torch.int32),
                  r"nf4_dequantize: dtype must be float32, bfloat16 or float16"),
        BadSample("short-packed",
                  lambda make: with_item((*make.quantized((33, 65)), [33, 65], 64, fp32), 0,
                                         torch.zeros(1072, dtype=torch.uint8, device=make.device)),
                  r"nf4_dequantize: packed must have 1073 elements"),
        BadSample("short-absmax",
                  lambda make: with_item((*make.quantized((33, 65)), [33, 65], 64, fp32), 1,
                                         make.randn(33)),
                  r"nf4_dequantize: absmax must have 34 elements"),
        BadSample("float32-packed",
                  lambda make: with_item((*make.quantized((33, 65)), [33, 65], 64, fp32), 0,
                                         make.randn(1073)),
                  r"nf4_dequantize: packed must be"),
        BadSample("float16-absmax",
                  lambda make: with_item((*make.quantized((33, 65)), [33, 65], 64, fp32), 1,
                                         make.randn(34, dtype=fp16)),
                  r"nf4_dequantize: absmax must be"),
    ],
    "quantize_blockwise_8bit": [
        BadSample("float16-input", lambda make: (make.randn(600, dtype=fp16),
                                                 lowrank_ext.dynamic_map(make.device), 256),
                  r"quantize_blockwise_8bit: input must be"),
        BadSample("short-code", lambda make: (make.randn(600),
                                              lowrank_ext.dynamic_map(make.device)[:255], 256),
                  r"quantize_blockwise_8bit: code must have 256 elements"),
        BadSample("blocksize-0", lambda make: (make.randn(600),
                                               lowrank_ext.dynamic_map(make.device), 0),
                  r"quantize_blockwise_8bit: blocksize must be positive"),
    ],
    "dequantize_blockwise_8bit": [
        BadSample("float32-codes",
                  lambda make: (make.randn(600), *make.quantized_8bit()[1:], 256),
                  r"dequantize_blockwise_8bit: codes must be"),
        BadSample("short-absmax",
                  lambda make: with_item((*make.quantized_8bit(), 256), 1, make.randn(2)),
                  r"dequantize_blockwise_8bit: absmax must have 3 elements"),
    ],
    "nf4_linear": [
        BadSample("input-last-dimension",
                  lambda make: with_item(nf4_linear_args(make), 0, make.randn(2, 44)),
                  r"nf4_linear: input's last dimension must be in_features=45"),
        BadSample("int32-input",
                  lambda make: with_item(nf4_linear_args(make), 0,
                                         torch.ones(2, 45, dtype=torch.int32, device=make.device)),
                  r"nf4_linear: input must be float32, bfloat16, float16 or float64"),
        BadSample("short-packed",
                  lambda make: with_item(nf4_linear_args(make), 1 + PACKED,
                                         torch.zeros(427, dtype=torch.uint8, device=make.device)),
                  r"nf4_linear: packed must have 428 elements"),
        BadSample("blocksize-48", lambda make: with_item(nf4_linear_args(make), 8, 48),
                  r"nf4_linear: blocksize must be a power of two in \[32, 4096\]"),
        BadSample("bias-size", lambda make: with_item(nf4_linear_args(make), 9, make.randn(18)),
                  r"nf4_linear: bias must have 19 elements"),
        BadSample("float32-double-quantized-absmax",
                  lambda make: with_item(nf4_linear_args(make), 1 + ABSMAX, make.randn(27)),
                  r"nf4_linear: absmax \(double-quantized codes\) must be"),
        BadSample("nested-absmax-without-nested-code",
                  lambda make: with_item(nf4_linear_args(make), 1 + NESTED_CODE, None),
                  r"nf4_linear: nested_absmax and nested_code must both be given"),
    ],
    "nf4_linear_grad_input": [
        BadSample("grad-output-last-dimension",
                  lambda make: (make.randn(3, 18), *make.nf4()),
                  r"nf4_linear_grad_input: grad_output's last dimension must be out_features=19"),
        BadSample("int32-grad-output",
                  lambda make: (torch.ones(3, 19, dtype=torch.int32, device=make.device),
                                *make.nf4()),
                  r"nf4_linear_grad_input: grad_output must be float32, bfloat16, float16 or "
                  r"float64"),
        BadSample("short-absmax",
                  lambda make: with_item((make.randn(3, 19), *make.nf4()), 1 + ABSMAX,
                                         torch.zeros(26, dtype=torch.uint8, device=make.device)),
                  r"nf4_linear_grad_input: absmax must have 27 elements"),
    ],
    "lora_linear": [
        BadSample("input-last-dimension",
                  lambda make: with_item(lora_linear_args(make), 0, make.randn(5, 44)),
                  r"lora_linear: input's last dimension must be in_features=45"),
        BadSample("float16-weight",
                  lambda make: with_item(lora_linear_args(make), 2, make.randn(19, 45, dtype=fp16)),
                  r"lora_linear: weight must be"),
        BadSample("lora-A-shape",
                  lambda make: with_item(lora_linear_args(make), 4, make.randn(4, 44)),
                  r"lora_linear: lora_A must have shape \[r, 45\]"),
        BadSample("lora-input-shape",
                  lambda make: with_item(lora_linear_args(make), 1, make.randn(4, 45)),
                  r"lora_linear: lora_input must have input's shape"),
    ],
    "lora_linear_backward": [
        BadSample("grad-output-shape",
                  lambda make: with_item(lora_backward_args(make), 0, make.randn(5, 18)),
                  r"lora_linear_backward: grad_output must have shape \[5, 19\], got "
                  r"\[5, 18\]"),
        BadSample("float16-grad-output",
                  lambda make: with_item(lora_backward_args(make), 0,
                                         make.randn(5, 19, dtype=fp16)),
                  r"lora_linear_backward: grad_output must be"),
        BadSample("lora-B-shape",
                  lambda make: with_item(lora_backward_args(make), 5, make.randn(19, 3)),
                  r"lora_linear_backward: lora_B must have shape \[19, 4\]"),
    ],
    "qlora_linear": [
        BadSample("input-last-dimension",
                  lambda make: with_item(qlora_linear_args(make), 0, make.randn(2, 44)),
                  r"qlora_linear: input's last dimension must be in_features=45"),
        BadSample("short-packed",
                  lambda make: with_item(qlora_linear_args(make), 2 + PACKED,
                                         torch.zeros(427, dtype=torch.uint8, device=make.device)),
                  r"qlora_linear: packed must have 428 elements"),
        BadSample("lora-A-shape",
                  lambda make: with_item(qlora_linear_args(make), 11, make.randn(4, 44)),
                  r"qlora_linear: lora_A must have shape \[r, 45\]"),
        BadSample("bfloat16-bias",
                  lambda make: with_item(qlora_linear_args(make), 10, make.randn(19, dtype=bf16)),
                  r"qlora_linear: bias must be"),
    ],
    "qlora_linear_backward": [
        BadSample("input-last-dimension",
                  lambda make: with_item(qlora_backward_args(make), 1, make.randn(2, 44)),
                  r"qlora_linear_backward: input's last dimension must be in_features=45"),
        BadSample("float16-lora-A",
                  lambda make: with_item(qlora_backward_args(make), 11,
                                         make.randn(4, 45, dtype=fp16)),
                  r"qlora_linear_backward: lora_A must be"),
        BadSample("grad-output-last-dimension",
                  lambda make: with_item(qlora_backward_args(make), 0, make.randn(2, 18)),
                  r"qlora_linear_backward: grad_output must have shape \[2, 19\], got "
                  r"\[2, 18\]"),
        # Rows that do not match input's: the old kernel let this through to a
        # failing view with no argument named.
        BadSample("grad-output-rows",
                  lambda make: with_item(qlora_backward_args(make), 0, make.randn(3, 19)),
                  r"qlora_linear_backward: grad_output must have shape \[2, 19\], got "
                  r"\[3, 19\]"),
    ],
    "multi_lora_linear": [
        BadSample("lora-A-in-features",
                  lambda make: with_item(make.multi_lora((6,), 10, 7, 3, 4), 2,
                                         make.randn(3, 4, 9)),
                  r"multi_lora_linear: lora_A must have shape \[num_adapters, max_rank, 10\]"),
        BadSample("base-output-shape",
                  lambda make: with_item(make.multi_lora((6,), 10, 7, 3, 4), 1, make.randn(6, 6)),
                  r"multi_lora_linear: base_output must have shape"),
        BadSample("int32-ranks",
                  lambda make: with_item(make.multi_lora((6,), 10, 7, 3, 4), 4,
                                         torch.full((3,), 2, dtype=torch.int32,
                                                    device=make.device)),
                  r"multi_lora_linear: ranks must be"),
        BadSample("adapter-indices-shape",
                  lambda make: with_item(make.multi_lora((6,), 10, 7, 3, 4), 6,
                                         torch.zeros(5, dtype=torch.int64, device=make.device)),
                  r"multi_lora_linear: adapter_indices' shape must be a prefix"),
    ],
    "multi_lora_linear_backward": [
        BadSample("grad-output-shape",
                  lambda make: with_item(multi_lora_backward_args(make, (6,), 10, 7, 3, 4), 0,
                                         make.randn(6, 6)),
                  r"multi_lora_linear_backward: grad_output must have shape"),
        BadSample("float16-lora-B",
                  lambda make: with_item(multi_lora_backward_args(make, (6,), 10, 7, 3, 4), 3,
                                         make.randn(3, 7, 4, dtype=fp16)),
                  r"multi_lora_linear_backward: lora_B must be"),
    ],
    "dropout": [
        BadSample("int32-input", lambda make: (torch.ones(10, dtype=torch.int32), 0.1,
                                               torch.tensor([1])),
                  r"dropout: input must be float32, bfloat16 or float16"),
        BadSample("p-1", lambda make: (make.randn(10), 1.0, torch.tensor([1])),
                  r"dropout: p must be in \[0, 1\)"),
        BadSample("float-seed", lambda make: (make.randn(10), 0.1, torch.tensor([1.5])),
                  r"dropout: seed must be a CPU int64 tensor with one element"),
    ],
}


def op_devices(op):
    return ["cpu"] if op in CPU_ONLY else DEVICES


def sample_params():
    for op in sorted(SAMPLES):
        for sample in SAMPLES[op]:
            for device in op_devices(op):
                grads = [False, True] if differentiable(op) or non_differentiable(op) else [False]
                for grad in grads:
                    yield pytest.param(op, sample, device, grad,
                                       id=f"{op}-{sample.id}-{device}{'-grad' if grad else ''}")


def bad_sample_params(with_marks, reason=lambda sample: sample.fake_accepts):
    for op in sorted(BAD_SAMPLES):
        for sample in BAD_SAMPLES[op]:
            for device in op_devices(op):
                marks = (pytest.mark.xfail(reason=reason(sample), strict=True,
                                           raises=AssertionError)
                         if with_marks and reason(sample) else ())
                yield pytest.param(op, sample, device, id=f"{op}-{sample.id}-{device}",
                                   marks=marks)


def test_every_registered_op_has_samples():
    """A new op must come with samples of both kinds; a removed one must leave the table."""
    registered = set(registered_ops())
    assert registered, "no lowrank_ext op is registered"
    for table, kind in ((SAMPLES, "SAMPLES"), (BAD_SAMPLES, "BAD_SAMPLES")):
        missing = sorted(registered - set(table))
        assert not missing, f"ops without {kind} in tests/test_op_samples.py: {missing}"
        stale = sorted(set(table) - registered)
        assert not stale, f"{kind} names ops that are not registered: {stale}"
        empty = sorted(op for op in registered if not table[op])
        assert not empty, f"ops with an empty list in {kind}: {empty}"


@pytest.mark.parametrize("op, sample, device, grad", list(sample_params()))
def test_opcheck(generator, op, sample, device, grad):
    args = sample.build(Make(generator, device, grad))
    if grad:
        assert any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args)
    torch.library.opcheck(getattr(torch.ops.lowrank_ext, op).default, args)
    if grad and non_differentiable(op):
        outputs = getattr(torch.ops.lowrank_ext, op)(*args)
        assert not any(output.requires_grad for output in outputs), \
            f"{op} is not differentiable, yet an output requires grad"


def raised(call) -> BaseException | None:
    try:
        call()
    except Exception as error:  # noqa: BLE001 (any exception is a rejection to compare)
        return error
    return None


def fake_call(op, args):
    """The op under FakeTensorMode: its fake kernel, as torch.compile traces it."""
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(arg) if isinstance(arg, torch.Tensor) else arg
                     for arg in args]
        return getattr(torch.ops.lowrank_ext, op)(*fake_args)


@pytest.mark.parametrize("op, sample, device", list(bad_sample_params(with_marks=False)))
def test_real_kernel_rejects_bad_input(generator, op, sample, device):
    args = sample.build(Make(generator, device))
    with pytest.raises(RuntimeError, match=sample.match):
        getattr(torch.ops.lowrank_ext, op)(*args)


@pytest.mark.parametrize("op, sample, device", list(bad_sample_params(with_marks=True)))
def test_fake_kernel_rejects_what_real_kernel_rejects(generator, op, sample, device):
    args = sample.build(Make(generator, device))
    real = raised(lambda: getattr(torch.ops.lowrank_ext, op)(*args))
    fake = raised(lambda: fake_call(op, args))
    assert real is not None, f"the real kernel accepted {sample.id}"
    assert fake is not None, f"the fake kernel accepted {sample.id}; the real one raised {real!r}"
    assert type(fake) is type(real), f"fake raised {fake!r}, real raised {real!r}"
    assert re.search(sample.match, str(fake)), f"fake's message {str(fake)!r} does not match"


@pytest.mark.parametrize("op, sample, device",
                         list(bad_sample_params(True, lambda sample: sample.fake_accepts
                                                or sample.message_differs)))
def test_fake_kernel_message_is_the_real_one(generator, op, sample, device):
    """The fake kernels mirror the C++ checks in order and wording: a traced
    call fails with exactly the message an eager one would."""
    args = sample.build(Make(generator, device))
    real = raised(lambda: getattr(torch.ops.lowrank_ext, op)(*args))
    fake = raised(lambda: fake_call(op, args))
    assert str(fake) == str(real)


def bad_sample(op, id):
    return next(sample for sample in BAD_SAMPLES[op] if sample.id == id)


# One bad input per argument group the fake kernels check.
COMPILE_BAD_SAMPLES = [("lora_linear", "float16-weight"), ("qlora_linear", "lora-A-shape"),
                       ("nf4_linear", "nested-absmax-without-nested-code"),
                       ("multi_lora_linear", "base-output-shape"), ("dropout", "p-1")]


@pytest.mark.parametrize("op, id", COMPILE_BAD_SAMPLES, ids=["-".join(case)
                                                              for case in COMPILE_BAD_SAMPLES])
def test_compile_rejects_bad_input_while_tracing(generator, op, id):
    """torch.compile(fullgraph=True) of a wrong call fails while tracing, with
    the kernel's message, before any graph reaches the backend."""
    sample = bad_sample(op, id)
    args = sample.build(Make(generator, "cpu"))
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph

    torch._dynamo.reset()
    compiled = torch.compile(getattr(torch.ops.lowrank_ext, op), backend=backend, fullgraph=True)
    with pytest.raises(RuntimeError, match=sample.match):
        compiled(*args)
    assert not graphs


class OneOp(torch.nn.Module):
    """One op call on a batch ``[rows, 45]``, its other arguments held as a
    layer holds them (parameters, buffers, an NF4Weight, int attributes)."""

    def __init__(self, op, make, bias=True):
        super().__init__()
        self.op = op
        self.weight = NF4Weight.from_float(make.randn(19, 45), blocksize=32, double_quant=True)
        self.bias = torch.nn.Parameter(make.randn(19)) if bias else None
        self.lora_A = torch.nn.Parameter(make.randn(4, 45, scale=45 ** -0.5))
        self.lora_B = torch.nn.Parameter(make.randn(19, 4))
        self.dense = torch.nn.Parameter(make.randn(19, 45))
        lora_A, lora_B, ranks, scalings = make.multi_lora((1,), 45, 19, 3, 4)[2:6]
        self.multi_A = torch.nn.Parameter(lora_A.detach())
        self.multi_B = torch.nn.Parameter(lora_B.detach())
        self.register_buffer("ranks", ranks)
        self.register_buffer("scalings", scalings)
        self.register_buffer("seed", torch.tensor([5]))

    def forward(self, x):
        if self.op == "qlora_linear":
            return ops.qlora_linear(x, *self.weight.linear_args(), self.bias, self.lora_A,
                                    self.lora_B, 0.5)
        if self.op == "nf4_linear":
            return ops.nf4_linear(x, *self.weight.linear_args(), self.bias)
        if self.op == "lora_linear":
            return ops.lora_linear(x, self.dense, self.bias, self.lora_A, self.lora_B, 0.5)
        if self.op == "multi_lora_linear":
            indices = torch.arange(x.shape[0], device=x.device) % 4 - 1
            return ops.multi_lora_linear(x, x[:, :19] * 2, self.multi_A, self.multi_B, self.ranks,
                                         self.scalings, indices)
        return ops.dropout(x, 0.25, self.seed)


DYNAMIC_CASES = [
    pytest.param("qlora_linear", False, True, id="qlora_linear-inference"),
    pytest.param("lora_linear", False, True, id="lora_linear-inference"),
    pytest.param("nf4_linear", False, True, id="nf4_linear-inference"),
    pytest.param("multi_lora_linear", False, True, id="multi_lora_linear-inference"),
    pytest.param("dropout", False, True, id="dropout-inference"),
    pytest.param("nf4_linear", True, False, id="nf4_linear-no-bias-training"),
    pytest.param("dropout", True, True, id="dropout-training"),
    pytest.param("qlora_linear", True, True, id="qlora_linear-training"),
    pytest.param("lora_linear", True, True, id="lora_linear-training"),
    pytest.param("nf4_linear", True, True, id="nf4_linear-bias-training"),
]


@pytest.mark.parametrize("op, training, bias", DYNAMIC_CASES)
def test_compile_dynamic_batch_is_one_graph(generator, op, training, bias):
    """torch.compile(dynamic=True): the fake kernels' checks keep the batch size
    symbolic, so a second batch size runs the same graph (forward, and
    backward when training), with eager's results."""
    make = Make(generator, "cpu")
    module = OneOp(op, make, bias)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", dynamic=True, fullgraph=True)
    for index, rows in enumerate((5, 17)):
        input = make.randn(rows, 45).requires_grad_(training)
        with torch.set_grad_enabled(training), \
                torch._dynamo.config.patch(error_on_recompile=index > 0):
            output = compiled(input)
            expected = module(input)
        torch.testing.assert_close(output, expected)
        if training:
            grads = torch.autograd.grad(output.square().sum(), input)
            expected_grads = torch.autograd.grad(expected.square().sum(), input)
            torch.testing.assert_close(grads, expected_grads)

"""nf4_linear, nf4_linear_grad_input, lora_linear and qlora_linear on the CPU.

Every numeric case runs on each CPU kernel set this machine supports. The
reference is float64 arithmetic on the dequantized weight
(``NF4Weight.dequantize()``), so the only errors measured are those of the
kernels themselves.

Tolerances, elementwise, with S = |x| @ |W|^T + |bias| (the sum of the
magnitudes that enter one output) and u the unit roundoff of the input dtype
(2^-24 fp32, 2^-8 bf16, 2^-11 fp16):

    |y - reference| <= (2 u + K 2^-24) * S

One u covers the weight being rounded to the input dtype in the GEMM path,
one u the final rounding of y; K 2^-24 covers fp32 accumulation over the K
products (the usual worst-case bound, K = reduction length). Nothing here is
tuned to the observed error.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import lowrank_ext
from lowrank_ext import NF4Weight, ops

ISAS = lowrank_ext.supported_cpu_isas()
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (leading input shape, out_features, in_features, blocksize, double_quant, bias)
# Rows 1/3/5 take the GEMV path, 40 and (2, 23) the GEMM path; odd in and out
# make blocks straddle rows and rows start in the middle of a byte; in = 2100
# splits the transposed GEMV of grad_input into several column ranges.
CASES = [
    ((1,), 37, 301, 64, True, True),
    ((3,), 19, 33, 32, False, False),
    ((5,), 64, 256, 64, True, False),
    ((2, 3), 13, 97, 32, True, True),
    ((40,), 37, 301, 64, False, True),
    ((40,), 33, 129, 4096, True, False),
    ((2, 23), 70, 130, 64, True, True),
    ((1,), 33, 129, 4096, False, True),
    ((2,), 5, 2100, 64, True, True),
    # An odd number of 64-blocks per row (the bf16 GEMV's blocksize-64 path
    # pairs blocks), plain scales.
    ((3,), 24, 192, 64, False, True),
]


def case_id(case):
    lead, out_features, in_features, blocksize, double_quant, bias = case
    return (f"x{'x'.join(map(str, lead))}-{out_features}x{in_features}-bs{blocksize}"
            f"{'-dq' if double_quant else ''}{'-bias' if bias else ''}")


@contextlib.contextmanager
def cpu_isa(name):
    previous = lowrank_ext.get_cpu_isa()
    lowrank_ext.set_cpu_isa(name)
    try:
        yield
    finally:
        lowrank_ext.set_cpu_isa(previous)


@pytest.fixture(params=ISAS)
def isa(request):
    with cpu_isa(request.param):
        yield request.param


def make_weight(out_features, in_features, blocksize, double_quant, seed):
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(out_features, in_features, generator=generator)
    return NF4Weight.from_float(dense, blocksize=blocksize, double_quant=double_quant)


def random(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype)


def assert_within_bound(result, reference, magnitude, dtype, reduction):
    bound = (2 * UNIT_ROUNDOFF[dtype] + reduction * 2.0**-24) * magnitude
    error = (result.double() - reference).abs()
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3g}x the bound"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nf4_linear_matches_float64_reference(isa, dtype, case):
    lead, out_features, in_features, blocksize, double_quant, with_bias = case
    weight = make_weight(out_features, in_features, blocksize, double_quant, seed=1)
    x = random((*lead, in_features), dtype, seed=2)
    bias = random((out_features,), dtype, seed=3) if with_bias else None
    y = ops.nf4_linear(x, *weight.linear_args(), bias=bias)
    assert y.shape == (*lead, out_features) and y.dtype == dtype

    dense = weight.dequantize(torch.float32).double()
    reference = x.double() @ dense.T
    magnitude = x.double().abs() @ dense.abs().T
    if bias is not None:
        reference = reference + bias.double()
        magnitude = magnitude + bias.double().abs()
    assert_within_bound(y, reference, magnitude, dtype, in_features)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nf4_linear_grad_input_matches_float64_reference(isa, dtype, case):
    lead, out_features, in_features, blocksize, double_quant, _ = case
    weight = make_weight(out_features, in_features, blocksize, double_quant, seed=4)
    grad_output = random((*lead, out_features), dtype, seed=5)
    grad_input = ops.nf4_linear_grad_input(grad_output, *weight.linear_args())
    assert grad_input.shape == (*lead, in_features) and grad_input.dtype == dtype

    dense = weight.dequantize(torch.float32).double()
    reference = grad_output.double() @ dense
    magnitude = grad_output.double().abs() @ dense.abs()
    assert_within_bound(grad_input, reference, magnitude, dtype, out_features)


@pytest.mark.parametrize("simd", [name for name in ISAS if name != "scalar"])
@pytest.mark.parametrize("rows", [1, 4, 7, 33])
def test_simd_paths_match_scalar(simd, rows):
    # fp32 output: the SIMD kernels use the same fp32 weights as the scalar
    # reference and differ only in summation order (K 2^-24 S), plus the
    # final fp32 rounding.
    weight = make_weight(45, 203, 32, True, seed=6)
    x = random((rows, 203), torch.float32, seed=7)
    grad_output = random((rows, 45), torch.float32, seed=8)
    with cpu_isa("scalar"):
        expected = ops.nf4_linear(x, *weight.linear_args())
        expected_grad = ops.nf4_linear_grad_input(grad_output, *weight.linear_args())
    with cpu_isa(simd):
        result = ops.nf4_linear(x, *weight.linear_args())
        result_grad = ops.nf4_linear_grad_input(grad_output, *weight.linear_args())
    dense = weight.dequantize(torch.float32).double()
    assert_within_bound(result, expected.double(), x.double().abs() @ dense.abs().T,
                        torch.float32, 2 * 203)
    assert_within_bound(result_grad, expected_grad.double(),
                        grad_output.double().abs() @ dense.abs(), torch.float32, 2 * 45)


# (rows, out_features, in_features, blocksize, double_quant, bias) for bf16
# GEMVs on the AVX-512 kernels: in_features a multiple of 64 takes the
# AVX512-BF16 kernel where the CPU has it (blocks of 128 and 4096 straddle
# rows, blocks of 32 are half a 64-weight step, 70 outputs span several
# tasks); odd in_features fall back to the plain AVX-512 kernel.
BF16_GEMV_CASES = [
    (1, 37, 320, 64, True, True),
    (2, 19, 128, 32, False, False),
    (3, 33, 192, 4096, True, False),
    (4, 21, 192, 128, False, True),
    (5, 70, 640, 32, True, False),
    (6, 13, 64, 4096, False, True),
    (1, 9, 301, 64, True, False),
    (6, 5, 97, 32, False, True),
]


@pytest.mark.skipif("avx512" not in ISAS, reason="needs the AVX-512 kernels")
@pytest.mark.parametrize("case", BF16_GEMV_CASES,
                         ids=lambda case: "x{}-{}x{}-bs{}{}{}".format(
                             *case[:4], "-dq" if case[4] else "", "-bias" if case[5] else ""))
def test_bf16_gemv_matches_reference_and_fp32_kernel(case):
    # The AVX512-BF16 kernel rounds each weight's codebook value to bf16 (one
    # u) and the output once (another u), inside the usual bf16 bound. The
    # fp32 run is the plain AVX-512 GEMV on the same activation values.
    rows, out_features, in_features, blocksize, double_quant, with_bias = case
    weight = make_weight(out_features, in_features, blocksize, double_quant, seed=9)
    x = random((rows, in_features), torch.bfloat16, seed=10)
    bias = random((out_features,), torch.bfloat16, seed=11) if with_bias else None
    with cpu_isa("avx512"):
        y = ops.nf4_linear(x, *weight.linear_args(), bias=bias)
        y_fp32 = ops.nf4_linear(x.float(), *weight.linear_args(),
                                bias=None if bias is None else bias.float())
    dense = weight.dequantize(torch.float32).double()
    reference = x.double() @ dense.T
    magnitude = x.double().abs() @ dense.abs().T
    if bias is not None:
        reference = reference + bias.double()
        magnitude = magnitude + bias.double().abs()
    assert y.dtype == torch.bfloat16
    assert_within_bound(y, reference, magnitude, torch.bfloat16, in_features)
    assert_within_bound(y, y_fp32.double(), magnitude, torch.bfloat16, in_features)


def lora_factors(rank, out_features, in_features, dtype, seed):
    return (random((rank, in_features), dtype, seed) * 0.1,
            random((out_features, rank), dtype, seed + 1) * 0.1)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_qlora_linear_forward_and_gradients_match_dense_autograd(isa, rows):
    # fp32 against float64 autograd through the dense weight: every gradient
    # is a sum of at most max(in, out, rows) products, so the fp32 bound above
    # with K = 301 + rows applies to all of them.
    weight = make_weight(37, 301, 64, True, seed=9)
    x = random((rows, 301), torch.float32, seed=10).requires_grad_()
    bias = random((37,), torch.float32, seed=11).requires_grad_()
    lora_A, lora_B = lora_factors(4, 37, 301, torch.float32, seed=12)
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    y = ops.qlora_linear(x, *weight.linear_args(), bias, lora_A, lora_B, 0.5)
    grad_output = random(y.shape, torch.float32, seed=14)
    y.backward(grad_output)

    dense = weight.dequantize(torch.float32).double()
    leaves = [t.detach().double().requires_grad_() for t in (x, bias, lora_A, lora_B)]
    x64, bias64, a64, b64 = leaves
    y64 = x64 @ dense.T + bias64 + 0.5 * (x64 @ a64.T) @ b64.T
    y64.backward(grad_output.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for ours, reference in zip((x, bias, lora_A, lora_B), leaves):
        torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=1e-5, atol=1e-5)


def test_nf4_linear_gradients_flow_to_input_and_bias(isa):
    weight = make_weight(21, 67, 32, False, seed=15)
    x = random((2, 5, 67), torch.float32, seed=16).requires_grad_()
    bias = random((21,), torch.float32, seed=17).requires_grad_()
    ops.nf4_linear(x, *weight.linear_args(), bias=bias).sum().backward()
    dense = weight.dequantize(torch.float32).double()
    torch.testing.assert_close(x.grad.double(), dense.sum(0).expand(2, 5, 67), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, torch.full((21,), 10.0))


def _dense_linear_64(x, dense, bias, lora_input, lora_A, lora_B, scaling):
    y = x @ dense.T
    if bias is not None:
        y = y + bias
    if lora_A is not None:
        y = y + scaling * ((x if lora_input is None else lora_input) @ lora_A.T) @ lora_B.T
    return y


@pytest.mark.parametrize("op,with_lora_input", [
    ("nf4_linear", False), ("lora_linear", False), ("lora_linear", True),
    ("qlora_linear", False), ("qlora_linear", True)])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_each_gradient_alone_matches_dense_autograd(op, double_quant, with_bias,
                                                    with_lora_input):
    # Every tensor argument that can require grad does; torch.autograd.grad
    # asks for one at a time (and then all), so the op must return exactly the
    # gradients asked for, at the right places, whichever optional arguments
    # (bias, lora_input, the nested scales) are absent. fp32 against float64
    # autograd: the module's bound with K = 67 + 3, as rtol/atol 1e-5.
    weight = make_weight(21, 67, 32, double_quant, seed=40)
    dense = weight.dequantize(torch.float32)
    x = random((3, 67), torch.float32, seed=41).requires_grad_()
    bias = random((21,), torch.float32, seed=42).requires_grad_() if with_bias else None
    lora_input = (random((3, 67), torch.float32, seed=43).requires_grad_()
                  if with_lora_input else None)
    lora_A, lora_B = lora_factors(4, 21, 67, torch.float32, seed=44)
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    if op == "nf4_linear":
        lora_A = lora_B = None
        named = {"input": x, "bias": bias}
        y = ops.nf4_linear(x, *weight.linear_args(), bias=bias)
    elif op == "lora_linear":
        dense.requires_grad_()
        named = {"input": x, "lora_input": lora_input, "weight": dense, "bias": bias,
                 "lora_A": lora_A, "lora_B": lora_B}
        y = ops.lora_linear(x, dense, bias, lora_A, lora_B, 0.5, lora_input=lora_input)
    else:
        named = {"input": x, "lora_input": lora_input, "bias": bias, "lora_A": lora_A,
                 "lora_B": lora_B}
        y = ops.qlora_linear(x, *weight.linear_args(), bias, lora_A, lora_B, 0.5,
                             lora_input=lora_input)
    named = {name: tensor for name, tensor in named.items() if tensor is not None}
    grad_output = random(y.shape, torch.float32, seed=45)

    leaves = {name: tensor.detach().double().requires_grad_() for name, tensor in named.items()}
    y64 = _dense_linear_64(leaves["input"], leaves.get("weight", dense.detach().double()),
                           leaves.get("bias"), leaves.get("lora_input"), leaves.get("lora_A"),
                           leaves.get("lora_B"), 0.5)
    reference = dict(zip(leaves, torch.autograd.grad(y64, list(leaves.values()),
                                                     grad_output.double())))
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for name in [*named, None]:
        wanted = list(named) if name is None else [name]
        grads = torch.autograd.grad(y, [named[n] for n in wanted], grad_output,
                                    retain_graph=True)
        for wanted_name, grad in zip(wanted, grads):
            torch.testing.assert_close(grad.double(), reference[wanted_name], rtol=1e-5,
                                       atol=1e-5, msg=lambda m: f"{op} d{wanted_name}: {m}")


@pytest.mark.parametrize("op", ["lora_linear", "qlora_linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_lora_input", [False, True], ids=["x", "lora_input"])
def test_float32_factors_with_reduced_precision_input(op, dtype, with_lora_input):
    # The decoding path: fp32 factors with a bf16/fp16 input; the low-rank
    # term is computed in fp32 and rounded once into the output, and the
    # factors' gradients come back in fp32. Reference: float64 autograd.
    # Output bound: the base product as the module docstring's (2 u + K 2^-24)
    # S, plus one more u S for the term's final rounding; gradients of x
    # (rounded to dtype): the same with the reduction over out = 21; factor
    # gradients are fp32 sums of dtype-exact products: rtol 1e-5.
    weight = make_weight(21, 64, 32, True, seed=50)
    dense = weight.dequantize(torch.float32).to(dtype)
    x = random((3, 64), dtype, seed=51).requires_grad_()
    lora_input = random((3, 64), dtype, seed=52).requires_grad_() if with_lora_input else None
    lora_A, lora_B = lora_factors(4, 21, 64, torch.float32, seed=53)
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    if op == "lora_linear":
        y = ops.lora_linear(x, dense, None, lora_A, lora_B, 0.5, lora_input=lora_input)
    else:
        y = ops.qlora_linear(x, *weight.linear_args(), None, lora_A, lora_B, 0.5,
                             lora_input=lora_input)
    assert y.dtype == dtype
    grad_output = random(y.shape, dtype, seed=54)
    y.backward(grad_output)
    assert lora_A.grad.dtype == torch.float32 and lora_B.grad.dtype == torch.float32

    base64 = dense.double()
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B)]
    x64, a64, b64 = leaves
    branch64 = x64 if lora_input is None else lora_input.detach().double().requires_grad_()
    y64 = x64 @ base64.T + 0.5 * (branch64 @ a64.T) @ b64.T
    y64.backward(grad_output.double())
    magnitude = (x64.abs() @ base64.abs().T
                 + 0.5 * (branch64.abs() @ a64.abs().T) @ b64.abs().T).detach()
    assert_within_bound(y, y64.detach(), 1.5 * magnitude, dtype, 64)
    torch.testing.assert_close(lora_A.grad.double(), a64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lora_B.grad.double(), b64.grad, rtol=1e-5, atol=1e-6)
    grad_magnitude = grad_output.double().abs() @ base64.abs()
    if lora_input is None:
        grad_magnitude = grad_magnitude + 0.5 * (grad_output.double().abs() @ b64.abs()) @ a64.abs()
    assert_within_bound(x.grad, x64.grad, 1.5 * grad_magnitude.detach(), dtype, 21)


def test_factor_dtype_is_checked():
    x = random((3, 64), torch.bfloat16, seed=55)
    dense = random((21, 64), torch.bfloat16, seed=56)
    lora_A, lora_B = lora_factors(4, 21, 64, torch.float16, seed=57)
    with pytest.raises(RuntimeError, match="lora_A must be BFloat16 \\(input's dtype\\) or float32"):
        ops.lora_linear(x, dense, None, lora_A, lora_B, 0.5)
    with pytest.raises(RuntimeError, match="lora_B must be Float"):
        ops.lora_linear(x, dense, None, lora_A.float(), lora_B, 0.5)
    with pytest.raises(RuntimeError, match="lora_A must be Float \\(input's dtype\\)"):
        ops.lora_linear(x.float(), dense.float(), None, lora_A.double(), lora_B.double(), 0.5)


def test_no_autograd_node_when_nothing_needs_a_gradient():
    weight = make_weight(21, 67, 32, True, seed=46)
    x = random((3, 67), torch.float32, seed=47).requires_grad_()
    lora_A, lora_B = lora_factors(4, 21, 67, torch.float32, seed=48)
    assert ops.qlora_linear(x.detach(), *weight.linear_args(), None, lora_A, lora_B,
                            0.5).grad_fn is None
    with torch.no_grad():
        assert ops.qlora_linear(x, *weight.linear_args(), None, lora_A, lora_B, 0.5).grad_fn is None
    y = ops.qlora_linear(x, *weight.linear_args(), None, lora_A, lora_B, 0.5)
    assert y.grad_fn is not None and y.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_linear_matches_float64_reference(dtype):
    x = random((6, 48), dtype, seed=18)
    dense = random((24, 48), dtype, seed=19)
    bias = random((24,), dtype, seed=20)
    lora_A, lora_B = lora_factors(8, 24, 48, dtype, seed=21)
    y = ops.lora_linear(x, dense, bias, lora_A, lora_B, 2.0)
    x64 = x.double()
    reference = (x64 @ dense.double().T + bias.double()
                 + 2.0 * (x64 @ lora_A.double().T) @ lora_B.double().T)
    magnitude = (x64.abs() @ dense.double().abs().T + bias.double().abs()
                 + 2.0 * (x64.abs() @ lora_A.double().abs().T) @ lora_B.double().abs().T)
    # Two roundings of the output (base GEMM, then the in-place low-rank add).
    assert_within_bound(y, reference, 2 * magnitude, dtype, 48)


# ------------------------------------------------------------ torch.compile --


class TinyQLoRA(torch.nn.Module):
    def __init__(self, weight: NF4Weight, rank: int):
        super().__init__()
        self.weight = weight
        out_features, in_features = weight.shape
        self.bias = torch.nn.Parameter(random((out_features,), torch.float32, seed=37))
        lora_A, lora_B = lora_factors(rank, out_features, in_features, torch.float32, seed=38)
        self.lora_A = torch.nn.Parameter(lora_A)
        self.lora_B = torch.nn.Parameter(lora_B)

    def forward(self, x):
        y = ops.qlora_linear(x, *self.weight.linear_args(), self.bias, self.lora_A, self.lora_B, 0.25)
        return torch.nn.functional.gelu(y)


def test_torch_compile_fullgraph_qlora_matches_eager():
    torch._dynamo.reset()
    module = TinyQLoRA(make_weight(24, 40, 32, True, seed=39), rank=4)
    x = random((3, 7, 40), torch.float32, seed=40)
    results = []
    for runner in (module, torch.compile(module, fullgraph=True)):
        module.zero_grad()
        inputs = x.clone().requires_grad_()
        out = runner(inputs)
        out.square().sum().backward()
        results.append((out.detach(), inputs.grad, module.bias.grad.clone(),
                        module.lora_A.grad.clone(), module.lora_B.grad.clone()))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- errors --


def test_errors_name_the_argument():
    weight = make_weight(19, 45, 32, True, seed=22)
    args = list(weight.linear_args())
    x = random((2, 45), torch.float32, seed=41)
    with pytest.raises(RuntimeError, match="input's last dimension must be in_features=45"):
        ops.nf4_linear(random((2, 44), torch.float32, seed=42), *args)
    # float64 is taken (the reference path, tests/test_dtypes.py); integers are not.
    with pytest.raises(RuntimeError, match="input must be float32, bfloat16, float16 or float64"):
        ops.nf4_linear(x.int(), *args)
    with pytest.raises(RuntimeError, match="bias must have 19 elements"):
        ops.nf4_linear(x, *args, bias=random((18,), torch.float32, seed=43))
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.nf4_linear(x, *args, bias=random((19,), torch.bfloat16, seed=44))
    bad_packed = args.copy()
    bad_packed[0] = args[0][:-1]
    with pytest.raises(RuntimeError, match="packed must have"):
        ops.nf4_linear(x, *bad_packed)
    bad_absmax = args.copy()
    bad_absmax[1] = args[1].float()
    with pytest.raises(RuntimeError, match=r"absmax \(double-quantized codes\) must be"):
        ops.nf4_linear(x, *bad_absmax)
    bad_nested = args.copy()
    bad_nested[3] = None
    with pytest.raises(RuntimeError, match="nested_absmax and nested_code"):
        ops.nf4_linear(x, *bad_nested)
    bad_blocksize = args.copy()
    bad_blocksize[7] = 48
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        ops.nf4_linear(x, *bad_blocksize)
    with pytest.raises(RuntimeError, match="grad_output's last dimension must be out_features=19"):
        ops.nf4_linear_grad_input(random((2, 18), torch.float32, seed=45), *args)
    lora_A, lora_B = lora_factors(4, 19, 45, torch.float32, seed=46)
    with pytest.raises(RuntimeError, match=r"lora_A must have shape \[r, 45\]"):
        ops.qlora_linear(x, *args, None, lora_A[:, :-1], lora_B, 1.0)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \[19, 4\]"):
        ops.qlora_linear(x, *args, None, lora_A, lora_B[:, :-1], 1.0)
    with pytest.raises(RuntimeError, match="lora_input must have input's shape"):
        ops.qlora_linear(x, *args, None, lora_A, lora_B, 1.0, lora_input=x[:1])
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        ops.lora_linear(x, random((19, 45, 1), torch.float32, seed=47), None, lora_A, lora_B, 1.0)


@pytest.mark.parametrize("direction", ["forward", "grad_input"])
def test_bf16_gemm_path_multiplies_as_this_cpu_does_fastest(direction):
    """The GEMM path (more rows than the GEMV takes) with bfloat16 activations.

    Without AVX512-BF16, ATen's bf16 GEMM has no native instructions (26x
    slower than fp32 at 64x5632 @ 5632x256 on an AVX2-only CPU), so the
    weight is dequantized to fp32, multiplied in fp32 and the result rounded
    once: it must then equal fp32 arithmetic rounded to bf16. With
    AVX512-BF16 the weight is dequantized to bf16 and ATen's bf16 GEMM runs:
    it must equal that. Both sides accumulate in fp32, perhaps in another
    order, so an element whose fp32 value lies within a few fp32 ulps of a
    bf16 rounding boundary may round the other way: at most 1% of the
    elements may differ, each by at most one bf16 ulp. Rounding the weight to
    bf16 when fp32 is expected changes about a third of them.
    """
    native = lowrank_ext._C.build_info()["cpu_bf16_dot_product"]
    weight = make_weight(256, 2048, 64, True, seed=70)
    dense = weight.dequantize(torch.float32)
    if direction == "forward":
        x = random((64, 2048), torch.bfloat16, seed=71)
        result = ops.nf4_linear(x, *weight.linear_args())
        expected = x @ dense.bfloat16().T if native else (x.float() @ dense.T).bfloat16()
    else:
        x = random((64, 256), torch.bfloat16, seed=72)
        result = ops.nf4_linear_grad_input(x, *weight.linear_args())
        expected = x @ dense.bfloat16() if native else (x.float() @ dense).bfloat16()
    assert result.dtype == torch.bfloat16
    differs = result != expected
    ulp = expected.float().abs().clamp_min(2.0**-126) * 2.0**-7
    assert ((result.float() - expected.float()).abs() <= ulp).all()
    assert differs.float().mean().item() <= 0.01, \
        f"{differs.float().mean().item():.1%} of the elements differ"

"""Property-based tests (hypothesis): random shapes, dtypes, blocksizes and value
ranges for the quantization ops, every SIMD path held to the scalar reference.

Bound: the SIMD kernels implement the same fp32 operations in the same order
as the scalar reference, so the bound is zero (bit-identical outputs).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowrank_ext
from lowrank_ext import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def run_on_every_isa(function):
    """{isa: function()} for every ISA this CPU supports (restores the active one)."""
    previous = lowrank_ext.get_cpu_isa()
    try:
        results = {}
        for isa in lowrank_ext.supported_cpu_isas():
            lowrank_ext.set_cpu_isa(isa)
            results[isa] = function()
        return results
    finally:
        lowrank_ext.set_cpu_isa(previous)


@st.composite
def weights(draw):
    numel = draw(st.one_of(st.integers(1, 70), st.integers(70, 5000)))
    dtype = draw(st.sampled_from(DTYPES))
    # Magnitudes from subnormal to huge (within the dtype's range), plus zero blocks.
    max_exponent = {torch.float32: 30, torch.bfloat16: 30, torch.float16: 4}[dtype]
    min_exponent = {torch.float32: -40, torch.bfloat16: -40, torch.float16: -6}[dtype]
    exponent = draw(st.integers(min_exponent, max_exponent))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=generator, dtype=torch.float64) * 10.0**exponent
    zero_fraction = draw(st.sampled_from([0.0, 0.0, 0.5, 1.0]))
    values[: int(numel * zero_fraction)] = 0.0
    return values.to(dtype)


@SETTINGS
@given(weight=weights(), blocksize=st.sampled_from([32, 64, 128, 256, 512, 1024, 2048, 4096]),
       out_dtype=st.sampled_from(DTYPES))
def test_quantize_dequantize_simd_equals_scalar(weight, blocksize, out_dtype):
    def roundtrip():
        packed, absmax = ops.nf4_quantize(weight, blocksize)
        return packed, absmax, ops.nf4_dequantize(packed, absmax, weight.shape, blocksize,
                                                  out_dtype)

    results = run_on_every_isa(roundtrip)
    reference = results["scalar"]
    for isa, outputs in results.items():
        for ours, expected in zip(outputs, reference):
            assert torch.equal(ours, expected), isa
    packed, absmax, restored = reference
    assert packed.numel() == (weight.numel() + 1) // 2
    assert absmax.numel() == math.ceil(weight.numel() / blocksize)
    # Dequantized values never exceed their block's absmax (codebook is within [-1, 1]).
    block = torch.arange(weight.numel()) // blocksize
    assert (restored.double().abs() <= absmax[block].to(out_dtype).double()).all()


@SETTINGS
@given(weight=weights(), blocksize=st.sampled_from([32, 64, 4096]),
       bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
       position=st.floats(0, 1, exclude_max=True))
def test_non_finite_anywhere_is_rejected_on_every_isa(weight, blocksize, bad, position):
    weight = weight.clone()
    weight[int(position * weight.numel())] = bad

    def quantize():
        with pytest.raises(ValueError, match="NaN or Inf"):
            ops.nf4_quantize(weight, blocksize)

    run_on_every_isa(quantize)


@SETTINGS
@given(numel=st.integers(1, 3000), blocksize=st.sampled_from([64, 256, 1000]),
       exponent=st.integers(-30, 30), seed=st.integers(0, 2**31 - 1))
def test_blockwise_8bit_roundtrip_within_half_a_step(numel, blocksize, exponent, seed):
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 10.0**exponent
    code = lowrank_ext.dynamic_map()
    codes, absmax = ops.quantize_blockwise_8bit(values, code, blocksize)
    restored = ops.dequantize_blockwise_8bit(codes, absmax, code, blocksize)
    block_absmax = absmax[torch.arange(numel) // blocksize]
    # Half the dynamic map's widest gap bounds the relative error per block; the
    # 65536-bin lookup may pick a neighbour within one bin (2/65535) of a midpoint.
    widest_gap = code.diff().max().item()
    error = ((restored - values).abs() / block_absmax.clamp_min(1e-38)).max().item()
    assert error <= widest_gap / 2 + 2 / 65535 + 1e-6


# ----------------------------------------------------------- compute ops --

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def within_bound(result, reference, magnitude, dtype, reduction):
    """Error bound (2u + K·2^-24)·(|x|·|W|ᵀ) + (K+1)·s: one rounding of the weight
    to the input dtype, one of the output, fp32 summation over K terms, and s,
    the dtype's smallest subnormal, for roundings that land below the normal
    range (where the relative bound does not hold; it matters for fp16)."""
    assert result.shape == reference.shape
    if result.numel() == 0:
        return True
    subnormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    bound = ((2 * UNIT_ROUNDOFF[dtype] + reduction * 2.0**-24) * magnitude
             + (reduction + 1) * subnormal + 1e-300)
    return ((result.double() - reference).abs() / bound).max().item() <= 1.0


@st.composite
def linear_problems(draw):
    rows = draw(st.one_of(st.integers(1, 8), st.integers(9, 40)))
    in_features = draw(st.integers(1, 300))
    out_features = draw(st.integers(1, 70))
    dtype = draw(st.sampled_from(DTYPES))
    blocksize = draw(st.sampled_from([32, 64, 256, 4096]))
    double_quant = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.integers(-3, 3))
    return rows, in_features, out_features, dtype, blocksize, double_quant, seed, scale


@SETTINGS
@given(problem=linear_problems(), with_bias=st.booleans())
def test_nf4_linear_and_grad_input_within_bound_on_every_isa(problem, with_bias):
    rows, in_features, out_features, dtype, blocksize, double_quant, seed, scale = problem
    generator = torch.Generator().manual_seed(seed)
    weight = lowrank_ext.NF4Weight.from_float(
        torch.randn(out_features, in_features, generator=generator) * scale,
        blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    grad = torch.randn(rows, out_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    dense = weight.dequantize(torch.float32).double()
    expected = x.double() @ dense.T + (0 if bias is None else bias.double())
    magnitude = x.double().abs() @ dense.abs().T + (0 if bias is None else bias.double().abs())
    expected_grad = grad.double() @ dense
    grad_magnitude = grad.double().abs() @ dense.abs()

    results = run_on_every_isa(lambda: (ops.nf4_linear(x, *weight.linear_args(), bias=bias),
                                        ops.nf4_linear_grad_input(grad, *weight.linear_args())))
    for isa, (output, grad_input) in results.items():
        assert output.dtype == dtype and output.shape == (rows, out_features)
        assert within_bound(output, expected, magnitude, dtype, in_features), isa
        assert within_bound(grad_input, expected_grad, grad_magnitude, dtype, out_features), isa


@SETTINGS
@given(problem=linear_problems(), rank=st.integers(0, 12), use_lora_input=st.booleans())
def test_lora_and_qlora_linear_within_bound(problem, rank, use_lora_input):
    rows, in_features, out_features, dtype, blocksize, double_quant, seed, scale = problem
    generator = torch.Generator().manual_seed(seed)
    weight = lowrank_ext.NF4Weight.from_float(
        torch.randn(out_features, in_features, generator=generator) * scale,
        blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    lora_x = torch.randn(rows, in_features, generator=generator).to(dtype) if use_lora_input else None
    lora_A = torch.randn(rank, in_features, generator=generator).to(dtype)
    lora_B = torch.randn(out_features, rank, generator=generator).to(dtype)
    scaling = 0.5
    dense = weight.dequantize(dtype)
    branch = (x if lora_x is None else lora_x).double()
    low_rank = (branch @ lora_A.double().T) @ lora_B.double().T * scaling
    magnitude = (x.double().abs() @ dense.double().abs().T
                 + (branch.abs() @ lora_A.double().abs().T) @ lora_B.double().abs().T * scaling)
    expected = x.double() @ dense.double().T + low_rank
    # The low-rank product rounds its [rows, r] intermediate to the input dtype once more.
    reduction = in_features + max(rank, 1)
    dense_result = ops.lora_linear(x, dense, None, lora_A, lora_B, scaling, lora_input=lora_x)
    assert within_bound(dense_result, expected, 2 * magnitude, dtype, reduction)
    results = run_on_every_isa(lambda: ops.qlora_linear(
        x, *weight.linear_args(), None, lora_A, lora_B, scaling, lora_input=lora_x))
    for isa, output in results.items():
        assert within_bound(output, expected, 2 * magnitude, dtype, reduction), isa


@SETTINGS
@given(rows=st.integers(0, 20), in_features=st.integers(1, 200), out_features=st.integers(1, 60),
       ranks=st.lists(st.integers(0, 9), min_size=1, max_size=5),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_multi_lora_linear_within_bound_on_every_isa(rows, in_features, out_features, ranks,
                                                     dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    base = torch.randn(rows, out_features, generator=generator).to(dtype)
    As = [torch.randn(r, in_features, generator=generator).to(dtype) for r in ranks]
    Bs = [torch.randn(out_features, r, generator=generator).to(dtype) for r in ranks]
    lora_A, lora_B, rank_tensor = ops.stack_lora_factors(As, Bs)
    scalings = torch.rand(len(ranks), generator=generator)
    indices = torch.randint(-1, len(ranks), (rows,), generator=generator)
    expected = base.double().clone()
    magnitude = base.double().abs().clone()
    for row, adapter in enumerate(indices.tolist()):
        if adapter < 0:
            continue
        A, B, s = As[adapter].double(), Bs[adapter].double(), scalings[adapter].item()
        expected[row] += s * (x[row].double() @ A.T) @ B.T
        magnitude[row] += s * (x[row].double().abs() @ A.abs().T) @ B.abs().T
    results = run_on_every_isa(lambda: ops.multi_lora_linear(
        x, base, lora_A, lora_B, rank_tensor, scalings, indices))
    for isa, output in results.items():
        assert within_bound(output, expected, magnitude, dtype, in_features + max(ranks)), isa

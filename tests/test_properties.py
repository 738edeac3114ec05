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

"""CUDA backend: bit-exact with the CPU ops where the format demands it, close
to fp64 references where it computes, and strict about devices.

Skipped as a whole where torch sees no CUDA device (CPU-only CI); run by
bench/gpu_check.sh on a GPU machine.

Uninitialized memory: before an op runs, `poison_allocator` fills both pools
of torch's caching allocator (the large one and the small one that serves
allocations up to 1 MiB) with a NaN pattern and frees it, so fresh outputs
are carved from poisoned memory; every result is then checked for equality
with a reference (bit-exact ops) or finiteness and a bound. Each check runs
under two different poison patterns.

Tolerances of the matmul ops (against an fp64 product of the same
dequantized weight): |out - ref| <= 3 * (u + K * 2^-24) * (|x| @ |W|.T) + u * |ref|
with u the unit roundoff of the output dtype (2^-8 bf16, 2^-11 fp16, 2^-24
fp32): one output rounding plus fp32 accumulation over K terms, tripled
because cuBLAS (the dequantize path) may reduce split-K partial sums in the
16-bit type by default.
"""

import pytest
import torch

import lowrank_ext
from lowrank_ext import NF4Weight, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

if torch.cuda.is_available() and "cuda" not in lowrank_ext.build_info()["backends"]:
    pytestmark = pytest.mark.skip(reason="lowrank_ext was built without CUDA")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SHAPES = [(1,), (7,), (33,), (64, 1), (3, 129), (300, 257), (4096,), (2, 3, 1111)]
BLOCKSIZES = [32, 64, 256, 4096]
POISONS = [float("nan"), float("-inf")]


def poison_allocator(value):
    """Fills the caching allocator's memory with `value` and frees it again.

    Cached segments are released first, so that later allocations come from
    the poisoned ones. The large pool (allocations over 1 MiB) gets one
    256 MiB block; the small pool (2 MiB segments serving allocations up to
    1 MiB) gets sixteen 1 MiB blocks, then smaller ones that fill the free
    fragments of segments still in use, which best-fit hands out first.
    """
    torch.cuda.empty_cache()
    blocks = [torch.full((64 * 1024 * 1024,), value, dtype=torch.float32, device="cuda")]
    for elements in (256 * 1024, 32 * 1024, 4 * 1024, 512, 128):
        blocks += [torch.full((elements,), value, dtype=torch.float32, device="cuda")
                   for _ in range(16)]
    del blocks


def random_weight(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def launched_kernels(function):
    """Names of the CUDA kernels that `function()` launches (demangled, with
    template arguments), from torch's profiler."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        function()
        torch.cuda.synchronize()
    return [event.key for event in profile.key_averages()]


def assert_bit_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual.cpu().view(torch.uint8), expected.cpu().view(torch.uint8))


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("elements", [100, 1000, 200_000, 4 * 1024 * 1024],
                         ids=["small-pool-400B", "small-pool-4KB", "small-pool-800KB",
                              "large-pool-16MB"])
def test_poison_reaches_fresh_allocations_of_both_pools(poison, elements):
    poison_allocator(poison)
    fresh = torch.empty(elements, dtype=torch.float32, device="cuda")
    assert_bit_equal(fresh, torch.full_like(fresh, poison))


# ------------------------------------------------------------ quantization --


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_dequantize_bit_exact_with_cpu(generator, poison, dtype, shape, blocksize):
    weight = random_weight(shape, dtype, generator, scale=3.0)
    cpu_packed, cpu_absmax = ops.nf4_quantize(weight, blocksize)
    poison_allocator(poison)
    packed, absmax = ops.nf4_quantize(weight.cuda(), blocksize)
    assert_bit_equal(packed, cpu_packed)
    assert_bit_equal(absmax, cpu_absmax)
    for out_dtype in DTYPES:
        expected = ops.nf4_dequantize(cpu_packed, cpu_absmax, shape, blocksize, out_dtype)
        poison_allocator(poison)
        assert_bit_equal(ops.nf4_dequantize(packed, absmax, shape, blocksize, out_dtype), expected)


def test_dequantize_misaligned_buffers_take_the_scalar_path(generator):
    weight = random_weight((37, 91), torch.float32, generator)
    packed, absmax = ops.nf4_quantize(weight, 64)
    expected = ops.nf4_dequantize(packed, absmax, weight.shape, 64, torch.bfloat16)
    storage = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    storage[1:] = packed.cuda()
    out = ops.nf4_dequantize(storage[1:], absmax.cuda(), weight.shape, 64, torch.bfloat16)
    assert_bit_equal(out, expected)


def test_all_zero_and_tiny_blocks_match_cpu():
    weight = torch.zeros(300)
    weight[100:140] = 1e-39  # subnormal: below the absmax floor
    weight[-3:] = -2.5
    for blocksize in (32, 64):
        expected = ops.nf4_quantize(weight, blocksize)
        actual = ops.nf4_quantize(weight.cuda(), blocksize)
        assert_bit_equal(actual[0], expected[0])
        assert_bit_equal(actual[1], expected[1])


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("blocksize", [64, 256, 1000, 4096])
@pytest.mark.parametrize("numel", [1, 255, 256, 5000, 70001])
def test_blockwise_8bit_bit_exact_with_cpu(generator, poison, blocksize, numel):
    values = torch.randn(numel, generator=generator) * 0.1
    if numel > blocksize:
        values[:blocksize] = 0.0  # an all-zero block gets code 0
    code = lowrank_ext.dynamic_map()
    cpu_codes, cpu_absmax = ops.quantize_blockwise_8bit(values, code, blocksize)
    poison_allocator(poison)
    codes, absmax = ops.quantize_blockwise_8bit(values.cuda(), code.cuda(), blocksize)
    assert_bit_equal(codes, cpu_codes)
    assert_bit_equal(absmax, cpu_absmax)
    expected = ops.dequantize_blockwise_8bit(cpu_codes, cpu_absmax, code, blocksize)
    poison_allocator(poison)
    assert_bit_equal(ops.dequantize_blockwise_8bit(codes, absmax, code.cuda(), blocksize), expected)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(513, 96), (2500, 1024)])  # 770 and 40000 blocks
def test_nf4weight_on_cuda_equals_cpu(generator, double_quant, shape):
    weight = random_weight(shape, torch.bfloat16, generator)
    on_cpu = NF4Weight.from_float(weight, 64, double_quant)
    on_cuda = NF4Weight.from_float(weight.cuda(), 64, double_quant)
    assert on_cuda.offset == on_cpu.offset
    assert_bit_equal(on_cuda.absmax, on_cpu.absmax)
    assert_bit_equal(on_cuda.dequantize(), on_cpu.dequantize())


# ----------------------------------------------------------------- matmuls --


def make_weight(out_features, in_features, dtype, generator, double_quant, blocksize=64):
    dense = random_weight((out_features, in_features), torch.float32, generator) * 0.05
    weight = NF4Weight.from_float(dense.cuda(), blocksize, double_quant)
    return weight, weight.dequantize(dtype)


def matmul_bound(input, dense, dtype):
    """Elementwise error bound of input @ dense.T against the fp64 product."""
    unit = UNIT_ROUNDOFF[dtype]
    reduction = input.shape[-1]
    magnitude = input.abs().double() @ dense.abs().double().T
    return 3 * (unit + reduction * 2.0**-24) * magnitude


def assert_close_to_reference(actual, reference, bound, dtype):
    assert actual.dtype == dtype
    assert torch.isfinite(actual).all()
    error = (actual.double() - reference).abs()
    limit = bound + UNIT_ROUNDOFF[dtype] * reference.abs() + 1e-30
    worst = (error - limit).max().item()
    assert worst <= 0, f"error exceeds bound by {worst}"


@pytest.fixture(params=["auto", "fused", "dequantize"])
def gemm_path(request, monkeypatch):
    monkeypatch.setenv("LOWRANK_CUDA_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 17, 130, 300])
@pytest.mark.parametrize("in_features", [256, 72, 100])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_nf4_linear_matches_fp64_reference(generator, gemm_path, dtype, rows, in_features,
                                           double_quant, with_bias):
    out_features = 136
    weight, dense = make_weight(out_features, in_features, dtype, generator, double_quant)
    input = random_weight((rows, in_features), dtype, generator).cuda()
    bias = random_weight((out_features,), dtype, generator).cuda() if with_bias else None
    reference = input.double() @ dense.double().T
    if bias is not None:
        reference += bias.double()
    poison_allocator(float("nan") if rows % 2 else float("-inf"))
    out = ops.nf4_linear(input, *weight.linear_args(), bias=bias)
    assert_close_to_reference(out, reference, matmul_bound(input, dense, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 17, 300])
@pytest.mark.parametrize("in_features", [256, 96])
@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_nf4_linear_other_blocksizes_match_fp64_reference(generator, gemm_path, dtype, rows,
                                                          in_features, blocksize):
    """Blocks of 32 are exactly one GEMV lane's 16-byte load; blocks of 128 and
    256 straddle weight rows when in_features is 96."""
    weight, dense = make_weight(72, in_features, dtype, generator, True, blocksize)
    input = random_weight((rows, in_features), dtype, generator).cuda()
    reference = input.double() @ dense.double().T
    poison_allocator(float("nan"))
    out = ops.nf4_linear(input, *weight.linear_args())
    assert_close_to_reference(out, reference, matmul_bound(input, dense, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", ["packed", "input"])
def test_gemv_misaligned_buffers_take_the_element_path(generator, dtype, misaligned):
    weight, dense = make_weight(40, 128, dtype, generator, True)
    input = random_weight((3, 128), dtype, generator).cuda()
    args = list(weight.linear_args())
    aligned_kernels = launched_kernels(lambda: ops.nf4_linear(input, *args))
    if misaligned == "packed":
        storage = torch.empty(args[0].numel() + 1, dtype=torch.uint8, device="cuda")
        storage[1:] = args[0]
        args[0] = storage[1:]
    else:
        storage = torch.empty(input.numel() + 1, dtype=dtype, device="cuda")
        storage[1:] = input.reshape(-1)
        input = storage[1:].view(input.shape)
    poison_allocator(float("nan"))
    out = ops.nf4_linear(input, *args)
    reference = input.double() @ dense.double().T
    assert_close_to_reference(out, reference, matmul_bound(input, dense, dtype), dtype)
    # Template arguments <T, kRows, kVector> in the demangled kernel names.
    assert any("nf4_gemv_kernel" in name and "true>" in name for name in aligned_kernels)
    misaligned_kernels = launched_kernels(lambda: ops.nf4_linear(input, *args))
    assert any("nf4_gemv_kernel" in name and "false>" in name for name in misaligned_kernels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 64, 300])
def test_nf4_linear_matches_cpu_op(generator, gemm_path, dtype, rows):
    weight, dense = make_weight(192, 320, dtype, generator, True)
    input = random_weight((rows, 320), dtype, generator)
    cpu_args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in weight.linear_args()]
    expected = ops.nf4_linear(input, *cpu_args).double()
    out = ops.nf4_linear(input.cuda(), *weight.linear_args()).cpu().double()
    bound = 2 * matmul_bound(input, dense.cpu(), dtype)
    assert ((out - expected).abs() <= bound + 2 * UNIT_ROUNDOFF[dtype] * expected.abs()).all()


def test_nf4_linear_batched_shape_and_non_contiguous_input(generator):
    weight, dense = make_weight(64, 128, torch.bfloat16, generator, True)
    input = random_weight((3, 128, 5), torch.bfloat16, generator).cuda().transpose(1, 2)
    out = ops.nf4_linear(input, *weight.linear_args())
    assert out.shape == (3, 5, 64)
    reference = input.double() @ dense.double().T
    assert_close_to_reference(out, reference, matmul_bound(input, dense, torch.bfloat16),
                              torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_nf4_linear_grad_input_matches_fp64_reference(generator, dtype, rows):
    weight, dense = make_weight(136, 200, dtype, generator, True)
    grad_output = random_weight((rows, 136), dtype, generator).cuda()
    poison_allocator(float("nan"))
    grad_input = ops.nf4_linear_grad_input(grad_output, *weight.linear_args())
    reference = grad_output.double() @ dense.double()
    assert_close_to_reference(grad_input, reference, matmul_bound(grad_output, dense.T, dtype), dtype)


def lora_reference(input, dense, bias, lora_A, lora_B, scaling):
    x, a, b = input.double(), lora_A.double(), lora_B.double()
    out = x @ dense.double().T + scaling * (x @ a.T) @ b.T
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [4, 200])
@pytest.mark.parametrize("quantized", [True, False])
def test_lora_and_qlora_forward_backward_match_fp64(generator, dtype, rows, quantized):
    out_features, in_features, rank, scaling = 96, 160, 8, 2.0
    weight, dense = make_weight(out_features, in_features, dtype, generator, True)
    input = random_weight((rows, in_features), dtype, generator).cuda().requires_grad_()
    bias = random_weight((out_features,), dtype, generator).cuda().requires_grad_()
    lora_A = (random_weight((rank, in_features), dtype, generator) * 0.1).cuda().requires_grad_()
    lora_B = (random_weight((out_features, rank), dtype, generator) * 0.1).cuda().requires_grad_()
    if quantized:
        out = ops.qlora_linear(input, *weight.linear_args(), bias, lora_A, lora_B, scaling)
    else:
        out = ops.lora_linear(input, dense, bias, lora_A, lora_B, scaling)
    grad_output = random_weight(out.shape, dtype, generator).cuda()
    out.backward(grad_output)

    leaves = [t.detach().double().requires_grad_() for t in (input, bias, lora_A, lora_B)]
    reference = lora_reference(leaves[0], dense, leaves[1], leaves[2], leaves[3], scaling)
    reference.backward(grad_output.double())
    # Each result passes through up to four roundings to `dtype` (the low-rank
    # intermediate, the products, the scaled sum) plus fp32 accumulation over
    # at most rows + in_features terms; relative to the largest reference
    # value, 16 unit roundoffs plus the accumulation term bound that.
    unit = UNIT_ROUNDOFF[dtype]
    limit = 16 * unit + (rows + in_features) * 2.0**-22
    pairs = [(out.detach(), reference.detach())]
    pairs += [(tensor.grad, leaf.grad) for tensor, leaf in zip((input, bias, lora_A, lora_B), leaves)]
    for value, expected in pairs:
        scale = expected.abs().max().item() + 1e-12
        error = (value.double() - expected).abs().max().item()
        assert error <= limit * scale, f"relative error {error / scale} > {limit}"


def test_lora_input_branch_matches_cpu(generator):
    weight, _ = make_weight(64, 96, torch.float32, generator, False)
    input = random_weight((10, 96), torch.float32, generator)
    lora_input = random_weight((10, 96), torch.float32, generator)
    lora_A = random_weight((4, 96), torch.float32, generator)
    lora_B = random_weight((64, 4), torch.float32, generator)
    cpu_args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in weight.linear_args()]
    expected = ops.qlora_linear(input, *cpu_args, None, lora_A, lora_B, 0.5, lora_input=lora_input)
    actual = ops.qlora_linear(input.cuda(), *weight.linear_args(), None, lora_A.cuda(),
                              lora_B.cuda(), 0.5, lora_input=lora_input.cuda())
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ torch integration --


def test_compile_fullgraph_qlora_equals_eager(generator):
    weight, _ = make_weight(64, 128, torch.bfloat16, generator, True)
    lora_A = random_weight((8, 128), torch.bfloat16, generator).cuda()
    lora_B = random_weight((64, 8), torch.bfloat16, generator).cuda()
    input = random_weight((4, 128), torch.bfloat16, generator).cuda()

    def layer(x):
        return ops.qlora_linear(x, *weight.linear_args(), None, lora_A, lora_B, 1.0)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(input), layer(input))


def multi_lora_case(generator):
    """multi_lora_linear on a 64-row bf16 batch over 8 adapters, as a function of its input."""
    lora_A = random_weight((8, 16, 512), torch.bfloat16, generator, 0.05).cuda()
    lora_B = random_weight((8, 256, 16), torch.bfloat16, generator, 0.25).cuda()
    base = random_weight((64, 256), torch.bfloat16, generator).cuda()
    ranks = torch.full((8,), 16, dtype=torch.int64, device="cuda")
    scalings = torch.full((8,), 2.0, device="cuda")
    indices = torch.randint(-1, 8, (64,), generator=generator).cuda()
    return lambda x: ops.multi_lora_linear(x, base, lora_A, lora_B, ranks, scalings, indices)


@pytest.mark.parametrize("case", ["gemv", "fused", "dequantize", "quantize", "multi_lora"])
def test_runs_on_the_current_stream(generator, monkeypatch, case):
    """Each op launches on the current stream: on a side stream whose input is
    written only after pending work (a GPU spin), an op on any other stream
    would read the stale zeros and differ from the reference."""
    weight, _ = make_weight(256, 512, torch.bfloat16, generator, True)
    rows = {"gemv": 1, "fused": 40, "dequantize": 300, "quantize": 256, "multi_lora": 64}[case]
    if case in ("fused", "dequantize"):
        monkeypatch.setenv("LOWRANK_CUDA_GEMM", case)
    if case == "quantize":
        function = lambda x: ops.nf4_quantize(x, 64)  # noqa: E731
    elif case == "multi_lora":
        function = multi_lora_case(generator)
    else:
        function = lambda x: ops.nf4_linear(x, *weight.linear_args())  # noqa: E731
    source = random_weight((rows, 512), torch.bfloat16, generator).cuda()
    expected = function(source)
    stale = torch.zeros_like(source)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)  # tens of ms of pending work on this stream
        stale.copy_(source)
        out = function(stale)
    torch.cuda.current_stream().wait_stream(stream)
    if case != "quantize":
        out, expected = (out,), (expected,)
    for actual, reference in zip(out, expected, strict=True):
        assert_bit_equal(actual, reference)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_guard_uses_the_tensors_device(generator):
    weight = random_weight((64, 64), torch.float32, generator)
    expected = ops.nf4_quantize(weight, 64)
    with torch.cuda.device(0):
        actual = ops.nf4_quantize(weight.to("cuda:1"), 64)
    assert actual[0].device == torch.device("cuda:1")
    assert_bit_equal(actual[0], expected[0])


# -------------------------------------------------------------- bad input --


def test_weight_on_another_device_is_rejected(generator):
    weight, _ = make_weight(32, 64, torch.float32, generator, True)
    packed, absmax, nested_absmax, nested_code, *rest = weight.linear_args()
    input = random_weight((2, 64), torch.float32, generator).cuda()
    with pytest.raises(RuntimeError, match="packed is on cpu but input is on cuda"):
        ops.nf4_linear(input, packed.cpu(), absmax, nested_absmax, nested_code, *rest)
    with pytest.raises(RuntimeError, match="nested_code is on cpu"):
        ops.nf4_linear(input, packed, absmax, nested_absmax, nested_code.cpu(), *rest)
    with pytest.raises(RuntimeError, match="is on"):
        ops.nf4_linear(input.cpu(), packed, absmax, nested_absmax, nested_code, *rest)


def test_lora_factor_on_cpu_is_rejected(generator):
    input = random_weight((2, 16), torch.float32, generator).cuda()
    dense = random_weight((8, 16), torch.float32, generator).cuda()
    lora_A = random_weight((2, 16), torch.float32, generator)
    lora_B = random_weight((8, 2), torch.float32, generator).cuda()
    with pytest.raises(RuntimeError, match="lora_A is on cpu"):
        ops.lora_linear(input, dense, None, lora_A, lora_B, 1.0)


def test_wrong_dtype_and_non_finite_are_rejected():
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        ops.nf4_quantize(torch.ones(64, dtype=torch.int32, device="cuda"), 64)
    bad = torch.ones(64, device="cuda")
    bad[5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.nf4_quantize(bad, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_max_rows_setting_moves_the_crossover(generator, monkeypatch, dtype):
    weight, _ = make_weight(136, 256, dtype, generator, True)
    input = random_weight((40, 256), dtype, generator).cuda()
    monkeypatch.setenv("LOWRANK_CUDA_GEMM", "auto")
    for max_rows, fused in (("40", True), ("39", False), ("0", False), ("", True)):
        monkeypatch.setenv("LOWRANK_CUDA_FUSED_MAX_ROWS", max_rows)
        names = launched_kernels(lambda: ops.nf4_linear(input, *weight.linear_args()))
        assert any("nf4_gemm_kernel" in name for name in names) == fused, (max_rows, names)
        assert any("nf4_dequantize_kernel" in name for name in names) != fused, (max_rows, names)
    for bad in ("-1", "many", "12rows"):
        monkeypatch.setenv("LOWRANK_CUDA_FUSED_MAX_ROWS", bad)
        with pytest.raises(RuntimeError, match="LOWRANK_CUDA_FUSED_MAX_ROWS"):
            ops.nf4_linear(input, *weight.linear_args())


def test_unknown_gemm_path_is_rejected(generator, monkeypatch):
    weight, _ = make_weight(32, 64, torch.bfloat16, generator, False)
    input = random_weight((40, 64), torch.bfloat16, generator).cuda()
    monkeypatch.setenv("LOWRANK_CUDA_GEMM", "fastest")
    with pytest.raises(RuntimeError, match="LOWRANK_CUDA_GEMM"):
        ops.nf4_linear(input, *weight.linear_args())


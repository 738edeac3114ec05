"""NF4 quantization ops: bit-exact with bitsandbytes on every ISA, torch integration, errors.

Bit-exactness is the contract (docs/numerics.md), so every comparison with
bitsandbytes is `torch.equal`, not a tolerance.
"""

import json
import warnings

import pytest
import torch

import lowrank_ext
from lowrank_ext import NF4Weight, ops
from lowrank_ext.quant import _SERIAL_SUM_LENGTH, mean_block_scale

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.backends import utils as bnb_utils
    from bitsandbytes.backends.default import ops as bnb_default_ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd element counts, partial last blocks, one element, exact multiples.
SHAPES = [(1,), (7,), (33,), (64, 1), (3, 129), (300, 257), (4096,), (2, 3, 1111)]
BLOCKSIZES = [32, 64, 128, 256, 1024, 4096]


def random_weight(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def bnb_dequantize(packed, state, dtype=None):
    """bitsandbytes' NF4 dequantization numerics (its torch reference implementation).

    bitsandbytes 0.50.2's native CPU kernel mis-scales weights whose last
    dimension is even but not a multiple of the blocksize (blocks straddling
    rows), so the comparison uses the package's own backend-independent
    formula: codebook[code] * absmax in fp32, then a cast.
    """
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnb_utils._get_4bit_code("nf4", packed.device)
    return bnb_default_ops._dequantize_4bit_compute(
        packed.reshape(-1), absmax, code, state.blocksize, state.shape, dtype or state.dtype)


def bnb_quantize(weight, blocksize, double_quant=False):
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    return packed, state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_matches_bitsandbytes(cpu_isa, generator, dtype, shape, blocksize):
    weight = random_weight(shape, dtype, generator)
    packed, absmax = ops.nf4_quantize(weight, blocksize)
    bnb_packed, state = bnb_quantize(weight, blocksize)
    assert torch.equal(packed, bnb_packed.reshape(-1))
    assert torch.equal(absmax, state.absmax)
    for out_dtype in DTYPES:
        ours = ops.nf4_dequantize(packed, absmax, shape, blocksize, out_dtype)
        assert ours.shape == torch.Size(shape)
        assert torch.equal(ours, bnb_dequantize(bnb_packed, state, out_dtype)), out_dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 257), (64, 4096), (5, 7)])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_double_quant_matches_bitsandbytes(cpu_isa, generator, dtype, shape, blocksize):
    weight = random_weight(shape, dtype, generator, scale=0.02)
    ours = NF4Weight.from_float(weight, blocksize=blocksize, double_quant=True)
    bnb_packed, state = bnb_quantize(weight, blocksize, double_quant=True)
    assert torch.equal(ours.packed, bnb_packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert ours.offset == state.offset.item()
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_code, state.state2.code)
    assert torch.equal(ours.dequantize(), bnb_dequantize(bnb_packed, state))


def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(lowrank_ext.dynamic_map(), bnb_functional.create_dynamic_map(signed=True))


def test_codebook_matches_bitsandbytes():
    assert torch.equal(lowrank_ext.nf4_codebook(), bnb_functional.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("blocksize", [64, 256, 1000, 4096])
@pytest.mark.parametrize("numel", [1, 255, 256, 5000, 70001])
def test_blockwise_8bit_matches_bitsandbytes(generator, blocksize, numel):
    values = torch.randn(numel, generator=generator) * torch.rand(1, generator=generator).item()
    code = lowrank_ext.dynamic_map()
    codes, absmax = ops.quantize_blockwise_8bit(values, code, blocksize)
    bnb_codes, bnb_absmax = torch.ops.bitsandbytes.quantize_blockwise(values, code, blocksize)
    assert torch.equal(codes, bnb_codes)
    assert torch.equal(absmax, bnb_absmax)
    assert torch.equal(ops.dequantize_blockwise_8bit(codes, absmax, code, blocksize),
                       torch.ops.bitsandbytes.dequantize_blockwise(
                           bnb_codes, bnb_absmax, code, blocksize, torch.float32))


def test_blockwise_8bit_zero_block_matches_bitsandbytes(generator):
    values = torch.zeros(512)
    values[256:] = torch.randn(256, generator=generator)
    code = lowrank_ext.dynamic_map()
    codes, absmax = ops.quantize_blockwise_8bit(values, code, 256)
    bnb_codes, bnb_absmax = torch.ops.bitsandbytes.quantize_blockwise(values, code, 256)
    assert torch.equal(codes, bnb_codes) and torch.equal(absmax, bnb_absmax)
    assert torch.equal(ops.dequantize_blockwise_8bit(codes, absmax, code, 256)[:256], values[:256])


def test_simd_paths_equal_scalar(generator):
    weight = torch.randn(1023, 77, generator=generator)
    results = {}
    previous = lowrank_ext.get_cpu_isa()
    try:
        for isa in lowrank_ext.supported_cpu_isas():
            lowrank_ext.set_cpu_isa(isa)
            packed, absmax = ops.nf4_quantize(weight, 64)
            results[isa] = (packed, absmax, ops.nf4_dequantize(packed, absmax, weight.shape, 64,
                                                               torch.bfloat16))
    finally:
        lowrank_ext.set_cpu_isa(previous)
    reference = results["scalar"]
    for isa, outputs in results.items():
        assert all(torch.equal(a, b) for a, b in zip(outputs, reference)), isa


def test_all_zero_block_dequantizes_to_zero(cpu_isa):
    weight = torch.zeros(3, 100)
    weight[2, 50:] = 1.5  # one non-zero block among zero ones, partial last block zero too
    weight[2, 99] = 0.0
    packed, absmax = ops.nf4_quantize(weight, 32)
    restored = ops.nf4_dequantize(packed, absmax, weight.shape, 32)
    assert torch.equal(restored[:2], torch.zeros(2, 100))
    assert torch.isfinite(restored).all()


def test_non_contiguous_input_equals_contiguous(cpu_isa, generator):
    weight = torch.randn(130, 70, generator=generator)
    transposed = weight.t()
    assert not transposed.is_contiguous()
    for a, b in zip(ops.nf4_quantize(transposed, 64), ops.nf4_quantize(transposed.contiguous(), 64)):
        assert torch.equal(a, b)


def test_results_do_not_depend_on_thread_count(generator):
    weight = torch.randn(2000, 300, generator=generator)
    previous = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, previous):
            torch.set_num_threads(threads)
            outputs.append(ops.nf4_quantize(weight, 64))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


def test_roundtrip_error_is_bounded(cpu_isa, generator):
    # Half the largest gap between NF4 levels bounds |w - deq(w)| / absmax.
    largest_gap = lowrank_ext.nf4_codebook().diff().max().item()
    weight = torch.randn(64, 64, generator=generator)
    restored = NF4Weight.from_float(weight, double_quant=False).dequantize()
    block_absmax = weight.reshape(-1, 64).abs().amax(1, keepdim=True)
    relative = ((restored - weight).reshape(-1, 64).abs() / block_absmax).max()
    assert relative <= largest_gap / 2 + 1e-6


# ------------------------------------------------------------- serialization


def test_bitsandbytes_linear4bit_state_dict_loads_into_nf4weight(generator):
    linear = torch.nn.Linear(96, 40)
    quantized = bnb.nn.Linear4bit(96, 40, quant_type="nf4", compress_statistics=True,
                                  compute_dtype=torch.float32)
    quantized.load_state_dict(linear.state_dict())
    quantized = quantized.to("cpu")
    state = quantized.state_dict()
    weight = NF4Weight.from_state_dict(state, prefix="weight")
    expected = bnb_dequantize(quantized.weight.data, quantized.weight.quant_state)
    assert torch.equal(weight.dequantize(), expected)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4weight_state_dict_loads_into_bitsandbytes(generator, double_quant, dtype):
    weight = random_weight((40, 96), dtype, generator)
    ours = NF4Weight.from_float(weight, blocksize=64, double_quant=double_quant)
    state = ours.state_dict(prefix="weight")
    stats = {key[len("weight."):]: value for key, value in state.items() if key.startswith("weight.")}
    params = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, requires_grad=False,
                                                 device="cpu")
    theirs = bnb_dequantize(params.data, params.quant_state)
    assert theirs.dtype == dtype
    assert torch.equal(theirs, ours.dequantize())
    reloaded = NF4Weight.from_state_dict(state)
    assert torch.equal(reloaded.dequantize(), ours.dequantize())


def test_state_dict_keys_and_json_fields(generator):
    state = NF4Weight.from_float(torch.randn(8, 64, generator=generator)).state_dict("layer.weight")
    assert sorted(state) == sorted([
        "layer.weight", "layer.weight.absmax", "layer.weight.quant_map",
        "layer.weight.nested_absmax", "layer.weight.nested_quant_map",
        "layer.weight.quant_state.bitsandbytes__nf4"])
    fields = json.loads(bytes(state["layer.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert fields["quant_type"] == "nf4" and fields["shape"] == [8, 64]
    assert fields["nested_blocksize"] == 256


def test_from_state_dict_rejects_inconsistent_tensors(generator):
    state = NF4Weight.from_float(torch.randn(8, 64, generator=generator)).state_dict()
    truncated = dict(state, weight=state["weight"][:-1])
    with pytest.raises(ValueError, match="packed data"):
        NF4Weight.from_state_dict(truncated)
    with pytest.raises(KeyError, match="absmax"):
        NF4Weight.from_state_dict({k: v for k, v in state.items() if k != "weight.absmax"})
    corrupt = dict(state)
    corrupt["weight.quant_state.bitsandbytes__nf4"] = torch.tensor([0xFF, 0x00], dtype=torch.uint8)
    with pytest.raises(ValueError, match="JSON"):
        NF4Weight.from_state_dict(corrupt)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_bitsandbytes_quant_storage_checkpoint_loads_into_the_layers(generator, storage):
    # FSDP-QLoRA checkpoints store the codes as a float dtype (quant_storage);
    # the layers must load them as NF4Weight does, bit for bit.
    from lowrank_ext.nn import NF4Linear, QLoRALinear

    dense = torch.randn(40, 96, generator=generator)
    quantized = bnb.nn.Linear4bit(96, 40, quant_type="nf4", compute_dtype=torch.float32,
                                  quant_storage=storage)
    quantized.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4",
                                         quant_storage=storage, module=quantized)._quantize("cpu")
    state = quantized.state_dict()
    assert state["weight"].dtype == storage
    expected = NF4Weight.from_state_dict(state).dequantize(torch.float32)
    layer = NF4Linear.from_linear(torch.nn.Linear(96, 40))
    layer.load_state_dict(state)
    assert torch.equal(layer.dequantize(torch.float32), expected)
    wrapped = QLoRALinear(NF4Linear.from_linear(torch.nn.Linear(96, 40)), r=4)
    wrapped.base_layer.load_state_dict(state)
    assert torch.equal(wrapped.base_layer.dequantize(torch.float32), expected)


def test_bitsandbytes_scales_stored_in_bf16_load(generator):
    # After a CPU forward bitsandbytes may keep plain (not double-quantized)
    # scales in the compute dtype; they widen to fp32 exactly.
    weight = NF4Weight.from_float(torch.randn(8, 64, generator=generator), double_quant=False)
    state = weight.state_dict()
    state["weight.absmax"] = state["weight.absmax"].bfloat16()
    reloaded = NF4Weight.from_state_dict(state)
    assert reloaded.absmax.dtype == torch.float32
    assert torch.equal(reloaded.absmax, weight.absmax.bfloat16().float())


@pytest.mark.parametrize("edit, message", [
    (lambda fields: fields.update(blocksize=0), "blocksize"),
    (lambda fields: fields.update(blocksize=64.5), "blocksize"),
    (lambda fields: fields.update(shape=None), "shape"),
    (lambda fields: fields.update(nested_offset=None), "nested_offset"),
    (lambda fields: [fields], "JSON object"),
])
def test_malformed_quant_state_raises_value_error(generator, edit, message):
    state = NF4Weight.from_float(torch.randn(8, 64, generator=generator)).state_dict()
    key = "weight.quant_state.bitsandbytes__nf4"
    fields = json.loads(bytes(state[key].tolist()))
    edited = edit(fields)
    encoded = json.dumps(fields if edited is None else edited).encode()
    state[key] = torch.tensor(list(encoded), dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        NF4Weight.from_state_dict(state)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_torch_sums_a_serial_chunk_the_same_on_any_thread_count(generator, restore_threads):
    """mean_block_scale's premise: torch's CPU sum of _SERIAL_SUM_LENGTH values is serial."""
    values = torch.rand(3, _SERIAL_SUM_LENGTH, generator=generator) * 0.05
    sums = []
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        sums.append([row.sum() for row in values])
    for row_sums in sums[1:]:
        assert all(torch.equal(a, b) for a, b in zip(row_sums, sums[0]))


def test_double_quant_offset_is_independent_of_thread_count(generator, restore_threads):
    # 300000 block scales: torch's own mean splits them across threads and
    # differs in the last bits between 1 and 2 threads for most draws.
    for _ in range(3):
        absmax = torch.rand(300_000, generator=generator) * 0.05
        offsets = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            offsets.append(mean_block_scale(absmax))
        assert offsets[0].device.type == "cpu" and offsets[0].dtype == torch.float32
        assert offsets[0].view(torch.int32) == offsets[1].view(torch.int32)
        # Still the mean: fp32 sums of 300000 terms stay within 300000 * 2^-24 < 0.02 relative.
        exact = absmax.double().mean().item()
        assert abs(offsets[0].item() - exact) <= 0.02 * exact


def test_double_quant_offset_is_the_fixed_path_formula(generator):
    # Two levels of chunks: 40000 scales are summed as 32767 + 7233 values.
    weight = random_weight((625, 4096), torch.bfloat16, generator, scale=0.02)
    single = NF4Weight.from_float(weight, blocksize=64, double_quant=False)
    double = NF4Weight.from_float(weight, blocksize=64, double_quant=True)
    assert single.absmax.numel() == 40_000
    head, tail = single.absmax.split(_SERIAL_SUM_LENGTH)
    expected = torch.stack([head.sum(), tail.sum()]).sum() / 40_000
    assert double.offset == expected.item()
    # Up to _SERIAL_SUM_LENGTH scales the formula is torch's (bitsandbytes') CPU mean.
    assert mean_block_scale(head).view(torch.int32) == head.mean().view(torch.int32)


def test_double_quant_of_weights_near_the_float32_limit_raises_value_error():
    weight = torch.full((512,), 3e38)
    with pytest.raises(ValueError, match="double_quant=False"):
        NF4Weight.from_float(weight, blocksize=64)
    single = NF4Weight.from_float(weight, blocksize=64, double_quant=False)
    assert torch.isfinite(single.dequantize()).all()


def test_meta_tensor_mixed_with_real_ones_raises(generator):
    # Any meta argument dispatches to the fake kernel; with the others real it
    # must refuse rather than return an uninitialized real tensor.
    weight = NF4Weight.from_float(torch.randn(8, 64, generator=generator), double_quant=False)
    x = torch.randn(2, 64, generator=generator)
    with pytest.raises(RuntimeError, match="bias on the meta device"):
        ops.nf4_linear(x, *weight.linear_args(), bias=torch.zeros(8, device="meta"))
    with pytest.raises(RuntimeError, match="absmax on the meta device"):
        ops.nf4_dequantize(weight.packed, weight.absmax.to("meta"), [8, 64], 64)
    lora_A, lora_B = torch.zeros(2, 64), torch.zeros(8, 2, device="meta")
    with pytest.raises(RuntimeError, match="lora_B on the meta device"):
        ops.qlora_linear(x, *weight.linear_args(), None, lora_A, lora_B, 1.0)
    # All on meta: shapes only, as torch's own ops.
    meta_args = [arg.to("meta") if isinstance(arg, torch.Tensor) else arg
                 for arg in weight.linear_args()]
    assert ops.nf4_linear(x.to("meta"), *meta_args).shape == (2, 8)


# --------------------------------------------------------- torch integration


def test_compile_fullgraph_roundtrip_equals_eager(generator):
    def roundtrip(weight):
        packed, absmax = ops.nf4_quantize(weight, 64)
        return ops.nf4_dequantize(packed, absmax, weight.shape, 64, weight.dtype)

    weight = torch.randn(48, 80, generator=generator)
    torch._dynamo.reset()
    compiled = torch.compile(roundtrip, fullgraph=True)
    assert torch.equal(compiled(weight), roundtrip(weight))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("blocksize", [0, 16, 48, 8192, -64])
def test_bad_blocksize_is_rejected(blocksize):
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        ops.nf4_quantize(torch.randn(128), blocksize)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float64, torch.bool])
def test_non_float_input_is_rejected(dtype):
    with pytest.raises(RuntimeError, match="input must be float32, bfloat16 or float16"):
        ops.nf4_quantize(torch.ones(64, dtype=dtype), 64)


def test_empty_input_is_rejected():
    with pytest.raises(RuntimeError, match="input must not be empty"):
        ops.nf4_quantize(torch.empty(0, 5), 64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_rejected(cpu_isa, bad):
    weight = torch.randn(10, 64)
    weight[3, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.nf4_quantize(weight, 64)


def test_mismatched_sizes_are_rejected(generator):
    packed, absmax = ops.nf4_quantize(torch.randn(10, 64, generator=generator), 64)
    with pytest.raises(RuntimeError, match="packed must have"):
        ops.nf4_dequantize(packed, absmax, [11, 64], 64)
    with pytest.raises(RuntimeError, match="absmax must have"):
        ops.nf4_dequantize(packed, absmax[:-1], [10, 64], 64)
    with pytest.raises(RuntimeError, match="absmax must be Float"):
        ops.nf4_dequantize(packed, absmax.double(), [10, 64], 64)
    with pytest.raises(RuntimeError, match="packed must be Byte"):
        ops.nf4_dequantize(packed.int(), absmax, [10, 64], 64)
    with pytest.raises(RuntimeError, match="dtype must be float32"):
        ops.nf4_dequantize(packed, absmax, [10, 64], 64, torch.int32)
    with pytest.raises(RuntimeError, match="non-empty"):
        ops.nf4_dequantize(packed, absmax, [0, 64], 64)


def test_unknown_isa_is_rejected():
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        lowrank_ext.set_cpu_isa("sse9")


def test_ops_use_torchs_parallel_backend():
    # Built without it, at::parallel_for silently runs every op on one thread.
    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert lowrank_ext.build_info()["cpu_parallel"] == "openmp"
        with open("/proc/self/maps", encoding="utf-8") as maps:
            runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
        assert len(runtimes) == 1, f"two OpenMP runtimes loaded: {runtimes}"


def test_build_info_names_backends_and_isa():
    info = lowrank_ext.build_info()
    assert "cpu" in info["backends"]
    assert info["cpu_isa"] in lowrank_ext.supported_cpu_isas()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.parametrize("call, message", [
    (lambda w, x: ops.nf4_quantize(x.double(), 64), "float32, bfloat16 or float16"),
    (lambda w, x: ops.nf4_quantize(x, 17), "power of two"),
    (lambda w, x: ops.nf4_dequantize(w.packed, w.absmax[:-1], [10, 64], 64), "absmax must have"),
    (lambda w, x: ops.nf4_dequantize(w.packed, w.absmax, [10, 64], 16), "power of two"),
    (lambda w, x: ops.nf4_linear(x[:, :32], *w.linear_args()), "in_features=64"),
    (lambda w, x: ops.nf4_linear_grad_input(x[:, :7], *w.linear_args()), "out_features=10"),
])
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_fake_kernels_check_like_the_real_ones(generator, call, message, device):
    # On the meta device (and while torch.compile traces) the fake kernels
    # run: they must refuse what the CPU kernels refuse, with the same words.
    weight = NF4Weight.from_float(torch.randn(10, 64, generator=generator), double_quant=False)
    weight = NF4Weight(packed=weight.packed.to(device), absmax=weight.absmax.to(device),
                       shape=weight.shape, dtype=weight.dtype, blocksize=weight.blocksize)
    with pytest.raises(RuntimeError, match=message):
        call(weight, torch.randn(2, 64, generator=generator).to(device))

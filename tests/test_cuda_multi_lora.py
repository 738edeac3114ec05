"""multi_lora_linear on CUDA: against the CPU op and a float64 per-row reference.

Skipped as a whole where torch sees no CUDA device (CPU-only CI).

Tolerances are those of tests/test_multi_lora.py: both backends sum in fp32
(in different orders) and round once, so against the fp64 reference fp32
agrees to ~1e-5 and bf16 / fp16 to one unit in the last place (2^-8 / 2^-11
relative, bounded by 2^-7 / 2^-10) plus a small absolute term; against the
CPU op each side may sit half a unit off on opposite sides, hence the same
bound. Gradients sum over rows too: 1e-5 in fp32, 2^-7 (bf16) / 2^-10 (fp16)
relative with 1e-2 absolute.

Uninitialized memory: before each op, `poison_allocator` (tests/test_cuda.py)
fills both pools of the caching allocator with a NaN (or -Inf) pattern and
frees it, so fresh outputs and scratch buffers are carved from poisoned
memory; results must then still be finite and close to the reference.

Value ranges: the CUDA op never reads ranks and adapter_indices on the host
(no synchronization on the eager path): rows with an out-of-range index or
rank come out NaN, in eager mode and inside CUDA graphs. With
LOWRANK_CUDA_CHECK_VALUES=1 eager calls check them like the CPU op (see
csrc/cuda/multi_lora_ops.cpp).
"""

import pytest
import torch

import lowrank_ext
from lowrank_ext import ops
from test_cuda import poison_allocator
from test_multi_lora import (TOLERANCES, check_compile_fullgraph_equals_eager, make_problem,
                             reference)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

if torch.cuda.is_available() and "cuda" not in lowrank_ext.build_info()["backends"]:
    pytestmark = pytest.mark.skip(reason="lowrank_ext was built without CUDA")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POISONS = [float("nan"), float("-inf")]
GRAD_TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-2),
    torch.float16: dict(rtol=2**-10, atol=1e-2),
}

SHAPES = [
    # leading, in, out, adapters, max_rank, index_dims (None: one index per row)
    ((64,), 512, 384, 32, 16, None),  # the serving case: 16-byte loads on both sides
    ((64,), 64, 48, 8, 16, None),
    ((7,), 130, 70, 5, 20, None),  # in and max_rank not multiples of 8: element paths
    ((3, 5), 33, 17, 4, 7, 1),  # one adapter per sequence
    ((4, 6), 256, 96, 3, 64, 1),
    ((2, 3), 16, 40, 3, 9, None),
    ((1,), 1, 1, 1, 1, None),
    ((0,), 8, 8, 2, 4, None),
    ((5,), 31, 33, 3, 0, None),
]


def to_cuda(args):
    return [arg.cuda() for arg in args]


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_forward_matches_reference_and_cpu(generator, poison, dtype, shape):
    leading, in_features, out_features, num_adapters, max_rank, index_dims = shape
    args = make_problem(generator, leading, in_features, out_features, num_adapters, max_rank,
                        dtype, index_dims)
    expected_cpu = ops.multi_lora_linear(*args)
    poison_allocator(poison)
    out = ops.multi_lora_linear(*to_cuda(args))
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == args[1].shape
    assert out.is_contiguous() and torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), reference(*args), **TOLERANCES[dtype])
    torch.testing.assert_close(out.cpu(), expected_cpu, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_adapter_and_rank_zero_keep_base_exactly(generator, dtype):
    args = list(make_problem(generator, (12,), 40, 24, 3, 8, dtype))
    args[6] = torch.tensor([-1, 1, -1, 1, 0, 2, -1, 1, 1, -1, -1, 1])  # adapter 1 has rank 0
    poison_allocator(float("nan"))
    out = ops.multi_lora_linear(*to_cuda(args)).cpu()
    untouched = (args[6] == -1) | (args[6] == 1)
    assert torch.equal(out[untouched].view(torch.uint8), args[1][untouched].view(torch.uint8))
    assert not torch.equal(out[~untouched], args[1][~untouched])


def test_padding_past_the_rank_is_never_read(generator):
    """NaN in the zero padding of lora_A / lora_B must not reach any output."""
    args = list(make_problem(generator, (16,), 64, 40, 4, 16, torch.bfloat16))
    args[4] = torch.tensor([16, 0, 5, 9])
    for adapter, rank in enumerate(args[4].tolist()):
        args[2][adapter, rank:] = float("nan")
        args[3][adapter, :, rank:] = float("nan")
    out = ops.multi_lora_linear(*to_cuda(args)).cpu()
    torch.testing.assert_close(out.double(), reference(*args), **TOLERANCES[torch.bfloat16])


def test_non_contiguous_and_misaligned_inputs_equal_contiguous(generator):
    args = to_cuda(make_problem(generator, (10,), 24, 18, 4, 8, torch.bfloat16))
    expected = ops.multi_lora_linear(*args)
    strided = [
        args[0].t().contiguous().t(),
        args[1].t().contiguous().t(),
        args[2].transpose(1, 2).contiguous().transpose(1, 2),
        args[3].transpose(0, 1).contiguous().transpose(0, 1),
        *args[4:],
    ]
    assert torch.equal(ops.multi_lora_linear(*strided), expected)

    def misaligned(tensor):
        storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device="cuda")
        view = storage[1:].view(tensor.shape)
        view.copy_(tensor)
        return view

    # One element off 16 bytes: the element-wise kernels, same sums in the same order
    # for the expand, a different warp split for the shrink.
    shifted = [misaligned(arg) for arg in args[:4]] + args[4:]
    torch.testing.assert_close(ops.multi_lora_linear(*shifted), expected,
                               **TOLERANCES[torch.bfloat16])


def out_of_range_problem(generator):
    """Adapter 1 has a rank past max_rank; indices 3 and -2 are out of range."""
    args = to_cuda(make_problem(generator, (6,), 10, 8, 3, 4))
    args[4] = torch.tensor([4, 5, 2], device="cuda")
    args[6] = torch.tensor([0, 1, 3, -2, 2, -1], device="cuda")
    return args


def test_out_of_range_values_give_nan_rows_in_eager_mode(generator, monkeypatch):
    monkeypatch.delenv("LOWRANK_CUDA_CHECK_VALUES", raising=False)
    out = ops.multi_lora_linear(*out_of_range_problem(generator))
    assert torch.isnan(out).all(dim=1).cpu().tolist() == [False, True, True, True, False, False]
    assert torch.isfinite(out[[0, 4, 5]]).all()


def test_out_of_range_values_raise_on_request(generator, monkeypatch):
    monkeypatch.setenv("LOWRANK_CUDA_CHECK_VALUES", "1")
    args = to_cuda(make_problem(generator, (6,), 10, 8, 3, 4))
    bad_ranks = list(args)
    bad_ranks[4] = torch.tensor([4, 5, 2], device="cuda")  # adapter 1: rank past max_rank
    with pytest.raises(RuntimeError, match="ranks must lie in"):
        ops.multi_lora_linear(*bad_ranks)
    bad_indices = list(args)
    bad_indices[6] = torch.tensor([0, 1, 3, -2, 2, -1], device="cuda")
    with pytest.raises(RuntimeError, match="adapter_indices must lie in"):
        ops.multi_lora_linear(*bad_indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_forward_and_backward_never_synchronize(generator, monkeypatch, dtype):
    """A serving or training step must not wait for the host: no device-to-host copy."""
    monkeypatch.delenv("LOWRANK_CUDA_CHECK_VALUES", raising=False)
    args = to_cuda(make_problem(generator, (24,), 64, 40, 6, 16, dtype))
    for index in (0, 1, 2, 3):
        args[index].requires_grad_()
    grad = torch.randn(args[1].shape, generator=generator).to(dtype).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.multi_lora_linear(*args)
        out.backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(args[index].grad).all() for index in (0, 1, 2, 3))


@pytest.mark.parametrize("check_values", ["0", "1"])
def test_out_of_range_values_give_nan_rows_inside_graph_capture(generator, monkeypatch,
                                                                 check_values):
    monkeypatch.setenv("LOWRANK_CUDA_CHECK_VALUES", check_values)
    ops.multi_lora_linear(*to_cuda(make_problem(generator, (6,), 10, 8, 3, 4)))  # warm-up
    args = out_of_range_problem(generator)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.multi_lora_linear(*args)
    graph.replay()
    nan_rows = torch.isnan(out).all(dim=1).cpu()
    assert nan_rows.tolist() == [False, True, True, True, False, False]
    assert torch.isfinite(out[[0, 4, 5]]).all()


def test_cuda_graph_replay_follows_new_indices(generator):
    """The serving loop: one captured graph, new adapter choices each step."""
    args = to_cuda(make_problem(generator, (32,), 128, 96, 8, 16, torch.bfloat16))
    static_indices = args[6].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.multi_lora_linear(*args[:6], static_indices)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.multi_lora_linear(*args[:6], static_indices)
    for _ in range(3):
        static_indices.copy_(torch.randint(-1, 8, (32,), generator=generator))
        graph.replay()
        torch.testing.assert_close(static_out, ops.multi_lora_linear(*args[:6], static_indices),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [((11,), 20, 14, 4, 6, None), ((2, 4), 9, 13, 3, 5, 1),
                                   ((24,), 64, 40, 6, 16, None)])
def test_gradients_match_cpu_and_reference(generator, dtype, shape):
    leading, in_features, out_features, num_adapters, max_rank, index_dims = shape
    args = make_problem(generator, leading, in_features, out_features, num_adapters, max_rank,
                        dtype, index_dims)
    grad_output = torch.randn(args[1].shape, generator=generator).to(dtype)
    cpu_inputs = [arg.clone().requires_grad_() for arg in args[:4]]
    cuda_inputs = [arg.cuda().requires_grad_() for arg in args[:4]]
    reference_inputs = [arg.detach().double().requires_grad_() for arg in args[:4]]

    ops.multi_lora_linear(*cpu_inputs, *args[4:]).backward(grad_output)
    poison_allocator(float("nan"))
    ops.multi_lora_linear(*cuda_inputs, *to_cuda(args[4:])).backward(grad_output.cuda())
    reference(*reference_inputs, *args[4:]).backward(grad_output.double())

    for ours, cpu, expected in zip(cuda_inputs, cpu_inputs, reference_inputs):
        expected_grad = expected.grad if expected.grad is not None else torch.zeros_like(expected)
        assert ours.grad.dtype == dtype and ours.grad.is_contiguous()
        torch.testing.assert_close(ours.grad.cpu().double(), expected_grad,
                                   **GRAD_TOLERANCES[dtype])
        torch.testing.assert_close(ours.grad.cpu(), cpu.grad, **GRAD_TOLERANCES[dtype])
    for adapter, rank in enumerate(args[4].tolist()):
        assert not cuda_inputs[2].grad[adapter, rank:].any()
        assert not cuda_inputs[3].grad[adapter, :, rank:].any()


def test_compile_fullgraph_equals_eager(generator):
    check_compile_fullgraph_equals_eager(generator, "cuda")


NAMES = ["input", "base_output", "lora_A", "lora_B", "ranks", "scalings", "adapter_indices"]


@pytest.mark.parametrize("name", NAMES[1:])
def test_argument_on_another_device_is_rejected(generator, name):
    args = dict(zip(NAMES, to_cuda(make_problem(generator, (6,), 10, 8, 3, 4))))
    args[name] = args[name].cpu()
    with pytest.raises(RuntimeError, match=f"{name} is on cpu but input is on cuda"):
        torch.ops.lowrank_ext.multi_lora_linear(*args.values())
    # The backward takes grad_output where the forward takes base_output.
    grad_name = "grad_output" if name == "base_output" else name
    with pytest.raises(RuntimeError, match=f"{grad_name} is on cpu but input is on cuda"):
        torch.ops.lowrank_ext.multi_lora_linear_backward(
            args["base_output"], args["input"], *list(args.values())[2:])


@pytest.mark.parametrize("change, message", [
    (lambda a: dict(adapter_indices=a["adapter_indices"].int()), "adapter_indices must be Long"),
    (lambda a: dict(adapter_indices=a["adapter_indices"][:5]), "prefix of input"),
    (lambda a: dict(ranks=a["ranks"][:2]), "ranks must have shape"),
    (lambda a: dict(scalings=a["scalings"].double()), "scalings must be Float"),
    (lambda a: dict(lora_A=a["lora_A"].bfloat16()), "lora_A must be Float"),
    (lambda a: dict(lora_B=a["lora_B"][:, :, :3]), "lora_B must have shape"),
    (lambda a: dict(base_output=a["base_output"][:5]), "base_output must have shape"),
])
def test_bad_shapes_and_dtypes_are_rejected_as_on_cpu(generator, change, message):
    args = dict(zip(NAMES, to_cuda(make_problem(generator, (6,), 10, 8, 3, 4))))
    args.update(change(args))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lowrank_ext.multi_lora_linear(*args.values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_guard_uses_the_tensors_device(generator):
    args = make_problem(generator, (9,), 32, 24, 3, 8, torch.bfloat16)
    expected = ops.multi_lora_linear(*args)
    with torch.cuda.device(0):
        out = ops.multi_lora_linear(*[arg.to("cuda:1") for arg in args])
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), expected, **TOLERANCES[torch.bfloat16])

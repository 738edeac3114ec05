"""multi_lora_linear: mixed-adapter batches (per-row adapters, per-adapter ranks).

Every kernel result is held to a float64 per-row reference loop. Tolerances:
fp32 results come from fp32 sums of ~in + rank unit-scale products, so they
agree to ~1e-5; bf16 / fp16 results are rounded once from fp32, so they sit
within one unit in the last place of the output (2^-7 resp. 2^-10 relative)
plus the fp32 error.
"""

import pytest
import torch

import lowrank_ext
from lowrank_ext import ops

TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-3),
    torch.float16: dict(rtol=2**-10, atol=1e-3),
}


def make_problem(generator, leading, in_features, out_features, num_adapters, max_rank,
                 dtype=torch.float32, index_dims=None):
    """Random inputs; ranks include 0 and max_rank, indices include -1."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    input = randn(*leading, in_features)
    base_output = randn(*leading, out_features)
    lora_A = randn(num_adapters, max_rank, in_features, scale=in_features ** -0.5)
    lora_B = randn(num_adapters, out_features, max_rank, scale=max(max_rank, 1) ** -0.5)
    ranks = torch.randint(0, max_rank + 1, (num_adapters,), generator=generator)
    ranks[0] = max_rank
    if num_adapters > 1:
        ranks[1] = 0
    scalings = torch.rand(num_adapters, generator=generator) * 2 + 0.25
    index_shape = tuple(leading[: len(leading) if index_dims is None else index_dims])
    adapter_indices = torch.randint(-1, num_adapters, index_shape, generator=generator)
    return input, base_output, lora_A, lora_B, ranks, scalings, adapter_indices


def reference(input, base_output, lora_A, lora_B, ranks, scalings, adapter_indices):
    """Per-row loop in float64, differentiable (autograd gives the reference gradients)."""
    in_features, out_features = input.shape[-1], base_output.shape[-1]
    rows = input.reshape(-1, in_features).double()
    base_rows = base_output.reshape(-1, out_features).double()
    if rows.shape[0] == 0:
        return base_rows.reshape(base_output.shape)
    per_index = rows.shape[0] // max(adapter_indices.numel(), 1)
    row_adapters = adapter_indices.reshape(-1).repeat_interleave(per_index)
    out_rows = []
    for row, adapter in enumerate(row_adapters.tolist()):
        rank = int(ranks[adapter]) if adapter >= 0 else 0
        if rank == 0:
            out_rows.append(base_rows[row])
            continue
        A = lora_A[adapter, :rank].double()
        B = lora_B[adapter, :, :rank].double()
        delta = float(scalings[adapter]) * (rows[row] @ A.t()) @ B.t()
        out_rows.append(base_rows[row] + delta)
    return torch.stack(out_rows).reshape(base_output.shape)


SHAPES = [
    # leading, in, out, adapters, max_rank, index_dims (None: one index per row)
    ((64,), 64, 48, 8, 16, None),
    ((7,), 130, 70, 5, 20, None),
    ((3, 5), 33, 17, 4, 7, 1),
    ((2, 3), 16, 40, 3, 9, None),
    ((1,), 1, 1, 1, 1, None),
    ((0,), 8, 8, 2, 4, None),
    ((5,), 31, 33, 3, 0, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_forward_matches_reference(cpu_isa, generator, dtype, shape):
    leading, in_features, out_features, num_adapters, max_rank, index_dims = shape
    args = make_problem(generator, leading, in_features, out_features, num_adapters, max_rank,
                        dtype, index_dims)
    out = ops.multi_lora_linear(*args)
    assert out.dtype == dtype and out.shape == args[1].shape
    torch.testing.assert_close(out.double(), reference(*args), **TOLERANCES[dtype])


def test_rows_without_adapter_and_rank_zero_keep_base_exactly(cpu_isa, generator):
    args = list(make_problem(generator, (12,), 40, 24, 3, 8, torch.bfloat16))
    args[6] = torch.tensor([-1, 1, -1, 1, 0, 2, -1, 1, 1, -1, -1, 1])  # adapter 1 has rank 0
    out = ops.multi_lora_linear(*args)
    untouched = (args[6] == -1) | (args[6] == 1)
    assert torch.equal(out[untouched], args[1][untouched])
    assert not torch.equal(out[~untouched], args[1][~untouched])


def test_inputs_are_not_mutated_and_output_is_new(cpu_isa, generator):
    args = make_problem(generator, (9,), 20, 12, 4, 5)
    copies = [arg.clone() for arg in args]
    out = ops.multi_lora_linear(*args)
    for arg, copy in zip(args, copies):
        assert torch.equal(arg, copy)
    assert out.data_ptr() != args[1].data_ptr()


def test_non_contiguous_inputs_equal_contiguous(cpu_isa, generator):
    args = make_problem(generator, (10,), 24, 18, 4, 6)
    strided = [
        args[0].t().contiguous().t() if args[0].dim() == 2 else args[0],
        args[1].t().contiguous().t(),
        args[2].transpose(1, 2).contiguous().transpose(1, 2),
        args[3].transpose(0, 1).contiguous().transpose(0, 1),
        *args[4:],
    ]
    assert not strided[1].is_contiguous()
    assert torch.equal(ops.multi_lora_linear(*strided), ops.multi_lora_linear(*args))


def test_simd_paths_agree_with_scalar(generator):
    args = make_problem(generator, (64,), 300, 200, 32, 16)
    previous = lowrank_ext.get_cpu_isa()
    try:
        results = {}
        for isa in lowrank_ext.supported_cpu_isas():
            lowrank_ext.set_cpu_isa(isa)
            results[isa] = ops.multi_lora_linear(*args)
    finally:
        lowrank_ext.set_cpu_isa(previous)
    for isa, result in results.items():
        torch.testing.assert_close(result, results["scalar"], **TOLERANCES[torch.float32])


def test_results_do_not_depend_on_thread_count(generator):
    args = make_problem(generator, (33,), 100, 90, 6, 12, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.multi_lora_linear(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ops.multi_lora_linear(*args), single)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("spread", ["one adapter", "two of nine", "even", "even, ragged ranks"])
def test_every_split_between_threads_matches_reference(generator, threads, spread):
    """The CPU glue gives each thread whole adapters when the work splits evenly
    and splits ranks / outputs otherwise; both must give the reference."""
    input, base_output, lora_A, lora_B, ranks, scalings, _ = make_problem(
        generator, (40,), 70, 50, 9, 12)
    rows = torch.arange(40)
    indices = {"one adapter": torch.full((40,), 3),
               "two of nine": torch.where(rows < 30, 0, 5),
               "even": rows % 9,
               "even, ragged ranks": rows % 9}[spread]
    if spread == "even":
        ranks = torch.full((9,), 12)
    expected = reference(input, base_output, lora_A, lora_B, ranks, scalings, indices)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        result = ops.multi_lora_linear(input, base_output, lora_A, lora_B, ranks, scalings, indices)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(result, expected.float(), **TOLERANCES[torch.float32])


def test_matches_separate_lora_per_adapter(generator):
    """Stacked adapters of different ranks equal running each adapter on its rows."""
    in_features, out_features = 24, 20
    ranks = [4, 0, 8, 1]
    lora_As = [torch.randn(r, in_features, generator=generator) for r in ranks]
    lora_Bs = [torch.randn(out_features, r, generator=generator) for r in ranks]
    lora_A, lora_B, stacked_ranks = ops.stack_lora_factors(lora_As, lora_Bs)
    assert stacked_ranks.tolist() == ranks
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(10, in_features, generator=generator)
    indices = torch.tensor([2, 0, -1, 3, 1, 2, 2, 0, -1, 3])
    scalings = torch.tensor([2.0, 1.0, 0.5, 4.0])
    out = ops.multi_lora_linear(x, torch.nn.functional.linear(x, weight), lora_A, lora_B,
                                stacked_ranks, scalings, indices)
    for row, adapter in enumerate(indices.tolist()):
        expected = weight @ x[row]
        if adapter >= 0:
            expected = expected + scalings[adapter] * lora_Bs[adapter] @ (lora_As[adapter] @ x[row])
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)


def test_matches_peft_mixed_adapter_batch(generator):
    peft = pytest.importorskip("peft")
    in_features, out_features = 32, 24
    model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features))
    names, ranks = ["first", "second", "third"], [4, 8, 2]
    configs = [peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["0"], init_lora_weights=False)
               for r in ranks]
    model = peft.get_peft_model(model, configs[0], adapter_name=names[0])
    for name, config in zip(names[1:], configs[1:]):
        model.add_adapter(name, config)
    model.eval()
    layer = model.base_model.model[0]
    x = torch.randn(9, in_features, generator=generator)
    adapter_names = ["second", "__base__", "first", "third", "second", "first", "__base__",
                     "third", "third"]
    with torch.no_grad():
        expected = model(x, adapter_names=adapter_names)
        lora_A, lora_B, stacked_ranks = ops.stack_lora_factors(
            [layer.lora_A[name].weight for name in names],
            [layer.lora_B[name].weight for name in names])
        scalings = [layer.scaling[name] for name in names]
        indices = [names.index(name) if name in names else -1 for name in adapter_names]
        out = ops.multi_lora_linear(x, layer.base_layer(x), lora_A, lora_B, stacked_ranks,
                                    scalings, indices)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [((11,), 20, 14, 4, 6, None), ((2, 4), 9, 13, 3, 5, 1)])
def test_gradients_match_reference_autograd(generator, dtype, shape):
    leading, in_features, out_features, num_adapters, max_rank, index_dims = shape
    args = make_problem(generator, leading, in_features, out_features, num_adapters, max_rank,
                        dtype, index_dims)
    differentiable = [arg.clone().requires_grad_() for arg in args[:4]]
    reference_inputs = [arg.detach().double().requires_grad_() for arg in args[:4]]
    grad_output = torch.randn(args[1].shape, generator=generator).to(dtype)

    ops.multi_lora_linear(*differentiable, *args[4:]).backward(grad_output)
    reference(*reference_inputs, *args[4:]).backward(grad_output.double())

    # bf16 gradients are rounded once from fp32 sums of a few products.
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-2)
    for ours, expected in zip(differentiable, reference_inputs):
        # The reference never touches factors that no row uses: no gradient means zero.
        expected_grad = expected.grad if expected.grad is not None else torch.zeros_like(expected)
        torch.testing.assert_close(ours.grad.double(), expected_grad, **tolerance)
    # Past each rank and for unused adapters the factors get exactly zero gradient.
    for adapter, rank in enumerate(args[4].tolist()):
        assert not differentiable[2].grad[adapter, rank:].any()
        assert not differentiable[3].grad[adapter, :, rank:].any()


def check_compile_fullgraph_equals_eager(generator, device):
    """torch.compile(fullgraph=True) of base linear + multi_lora_linear equals
    eager bit for bit, forward and backward (shared with the CUDA tests)."""
    weight = torch.randn(18, 24, generator=generator).to(device)
    args = [arg.to(device) for arg in make_problem(generator, (16,), 24, 18, 5, 8)]

    def mixed_batch(x, lora_A, lora_B, ranks, scalings, indices):
        return ops.multi_lora_linear(x, torch.nn.functional.linear(x, weight), lora_A, lora_B,
                                     ranks, scalings, indices)

    inputs = (args[0], *args[2:])
    compiled = torch.compile(mixed_batch, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), mixed_batch(*inputs), rtol=0, atol=0)

    eager_A = args[2].clone().requires_grad_()
    compiled_A = args[2].clone().requires_grad_()
    mixed_batch(args[0], eager_A, *args[3:]).sum().backward()
    compiled(args[0], compiled_A, *args[3:]).sum().backward()
    torch.testing.assert_close(compiled_A.grad, eager_A.grad, rtol=0, atol=0)


def test_compile_fullgraph_equals_eager(generator):
    check_compile_fullgraph_equals_eager(generator, "cpu")


def _bad(generator, **changes):
    args = dict(zip(
        ["input", "base_output", "lora_A", "lora_B", "ranks", "scalings", "adapter_indices"],
        make_problem(generator, (6,), 10, 8, 3, 4)))
    args.update(changes)
    return args


@pytest.mark.parametrize("change, message", [
    (lambda a: dict(adapter_indices=torch.tensor([0, 1, 3, 0, 0, 0])), "adapter_indices must lie"),
    (lambda a: dict(adapter_indices=torch.tensor([0, -2, 1, 0, 0, 0])), "adapter_indices must lie"),
    (lambda a: dict(adapter_indices=a["adapter_indices"].int()), "adapter_indices must be Long"),
    (lambda a: dict(adapter_indices=torch.zeros(5, dtype=torch.int64)), "prefix of input"),
    (lambda a: dict(ranks=torch.tensor([1, 5, 2])), "ranks must lie"),
    (lambda a: dict(ranks=torch.tensor([1, -1, 2])), "ranks must lie"),
    (lambda a: dict(ranks=torch.tensor([1, 2])), "ranks must have shape"),
    (lambda a: dict(scalings=a["scalings"].double()), "scalings must be Float"),
    (lambda a: dict(lora_A=a["lora_A"].bfloat16()), "lora_A must be Float"),
    (lambda a: dict(lora_A=a["lora_A"][:, :, :9]), "lora_A must have shape"),
    (lambda a: dict(lora_B=a["lora_B"][:, :, :3]), "lora_B must have shape"),
    (lambda a: dict(base_output=a["base_output"][:5]), "base_output must have shape"),
    (lambda a: dict(input=a["input"].int()), "input must be float32"),
])
def test_bad_inputs_are_rejected(generator, change, message):
    args = _bad(generator)
    args.update(change(args))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lowrank_ext.multi_lora_linear(*args.values())

"""LoRA / NF4 / QLoRA layers against plain-torch references."""

import math

import pytest
import torch
from torch import nn

from lowrank_ext.nn import LoRAConv, LoRAEmbedding, LoRALinear, NF4Linear, QLoRALinear
from lowrank_ext.quant import NF4Weight

DTYPES = [torch.float32, torch.bfloat16]
KINDS = ["linear", "conv1d", "conv2d", "embedding", "gpt2_conv1d"]


def tolerance(dtype):
    # fp32: a few ulps of a sum of ~64 products; bf16: a few bf16 ulps (2^-8)
    # of outputs of magnitude ~1, since the fused op rounds once per GEMM.
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=3e-2)


def make_base(kind, dtype):
    if kind == "linear":
        return nn.Linear(24, 12).to(dtype), torch.randn(3, 5, 24, dtype=dtype)
    if kind == "conv1d":
        return nn.Conv1d(6, 10, 3, padding=1).to(dtype), torch.randn(2, 6, 9, dtype=dtype)
    if kind == "conv2d":
        return nn.Conv2d(4, 8, 3, stride=2).to(dtype), torch.randn(2, 4, 9, 7, dtype=dtype)
    if kind == "embedding":
        return nn.Embedding(30, 12).to(dtype), torch.randint(0, 30, (3, 7))
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(12, 24)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias)
    return layer.to(dtype), torch.randn(3, 5, 24, dtype=dtype)


def wrap(kind, base, **options):
    if kind in ("linear", "gpt2_conv1d"):
        return LoRALinear(base, **options)
    if kind == "embedding":
        return LoRAEmbedding(base, **options)
    return LoRAConv(base, **options)


def reference_update(layer, name, x):
    """scaling * B(A(x)) computed from the dense delta with plain torch ops."""
    delta = layer.delta_weight(name)  # laid out like the base weight, fp32
    base = layer.base_layer
    if isinstance(layer, LoRAEmbedding):
        return nn.functional.embedding(x, delta)
    if isinstance(layer, LoRAConv):
        conv = {3: nn.functional.conv1d, 4: nn.functional.conv2d}[x.dim()]
        return conv(x.float(), delta, None, base.stride, base.padding, base.dilation)
    weight = delta.T if layer.fan_in_fan_out else delta
    return x.float() @ weight.T


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_reference(kind, dtype):
    torch.manual_seed(0)
    base, x = make_base(kind, dtype)
    expected_base = base(x).float()
    layer = wrap(kind, base, r=4, alpha=6, init=False)
    expected = expected_base + reference_update(layer, "default", x)
    torch.testing.assert_close(layer(x).float(), expected, **tolerance(dtype))


@pytest.mark.parametrize("kind", KINDS)
def test_default_init_is_identity_and_factors_are_fp32(kind):
    base, x = make_base(kind, torch.bfloat16)
    expected = base(x)
    layer = wrap(kind, base, r=3)
    assert torch.equal(layer(x), expected)
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters())
    assert not any(p.requires_grad for p in layer.base_layer.parameters())


@pytest.mark.parametrize("kind", ["linear", "gpt2_conv1d", "conv2d", "embedding"])
def test_gradients_match_autograd_reference(kind):
    torch.manual_seed(1)
    base, x = make_base(kind, torch.float32)
    layer = wrap(kind, base, r=4, alpha=8, init=False)
    if x.is_floating_point():
        x.requires_grad_(True)
    weights = torch.randn_like(layer(x))
    (layer(x) * weights).sum().backward()
    factor_A, factor_B = layer._factor_tensors("default")
    grads = [factor_A.grad.clone(), factor_B.grad.clone()]
    input_grad = x.grad.clone() if x.is_floating_point() else None
    factor_A.grad = factor_B.grad = None
    if input_grad is not None:
        x.grad = None
    # Reference: the same composition written with differentiable plain ops.
    scaling = layer.scaling["default"]
    if kind == "embedding":
        update = nn.functional.embedding(x, factor_A.T) @ factor_B.T
    elif kind == "conv2d":
        update = layer.lora_B["default"](layer.lora_A["default"](x))
    else:
        update = (x @ factor_A.T) @ factor_B.T
    ((base(x) + scaling * update) * weights).sum().backward()
    torch.testing.assert_close(grads[0], factor_A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], factor_B.grad, atol=1e-5, rtol=1e-5)
    if input_grad is not None:
        torch.testing.assert_close(input_grad, x.grad, atol=1e-5, rtol=1e-5)


def test_rslora_scaling():
    layer = LoRALinear(nn.Linear(8, 8), r=16, alpha=8, use_rslora=True)
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(16))
    assert LoRALinear(nn.Linear(8, 8), r=16, alpha=8).scaling["default"] == pytest.approx(0.5)


def test_dropout_only_in_training_and_only_on_adapter_branch():
    torch.manual_seed(2)
    base = nn.Linear(32, 16)
    x = torch.randn(64, 32)
    layer = LoRALinear(base, r=4, alpha=4, dropout=0.5, init=False)
    layer.eval()
    no_dropout = layer(x)
    torch.testing.assert_close(no_dropout, base(x) + reference_update(layer, "default", x))
    layer.train()
    with_dropout = layer(x)
    assert not torch.allclose(with_dropout, no_dropout)
    with layer.disable_adapter():
        assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_round_trip(kind, dtype):
    torch.manual_seed(3)
    base, x = make_base(kind, dtype)
    original = base.weight.detach().clone()
    layer = wrap(kind, base, r=4, alpha=8, init=False)
    unmerged = layer(x).float()
    delta = layer.delta_weight("default")
    errors = layer.merge()
    assert layer.merged_adapters == ["default"]
    merged_weight = base.weight.detach().float()
    # The reported error is the rounding of W + delta to the weight's dtype.
    exact = original.float() + delta
    assert errors["default"] == pytest.approx((merged_weight - exact).abs().max().item())
    torch.testing.assert_close(layer(x).float(), unmerged, **tolerance(dtype))
    layer.unmerge()
    # Unmerge subtracts the same fp32 delta: the result differs from the
    # original by at most one rounding of the stored weight (exact inverse up
    # to the dtype's resolution at |W| + |delta|).
    resolution = torch.finfo(dtype).eps * (original.float().abs() + delta.abs())
    assert ((base.weight.float() - original.float()).abs() <= resolution + 1e-12).all()


def test_safe_merge_refuses_non_finite_and_leaves_layer_unchanged():
    base = nn.Linear(8, 8)
    layer = LoRALinear(base, r=2, init=False)
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    before = base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(base.weight, before) and not layer.merged


def test_several_adapters_add_select_delete_disable():
    torch.manual_seed(4)
    base = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    layer = LoRALinear(base, r=2, init=False, adapter_name="first")
    layer.update_layer("second", r=3, alpha=6, init=False)
    assert layer.active_adapters == ["first", "second"]
    both = base(x) + reference_update(layer, "first", x) + reference_update(layer, "second", x)
    torch.testing.assert_close(layer(x), both)
    layer.set_adapter("second")
    assert not layer.lora_A["first"].weight.requires_grad
    torch.testing.assert_close(layer(x), base(x) + reference_update(layer, "second", x))
    layer.merge()
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=0)
    assert layer.merged_adapters == ["second"]
    layer.delete_adapter("second")
    assert layer.adapter_names == ["first"] and not layer.merged and layer.r == {"first": 2}
    with pytest.raises(KeyError, match="third"):
        layer.set_adapter("third")


@pytest.mark.parametrize("kind", ["linear", "gpt2_conv1d"])
def test_pissa_init_preserves_output_and_rewrites_base(kind):
    torch.manual_seed(5)
    base, x = make_base(kind, torch.float32)
    expected = base(x)
    original = base.weight.detach().clone()
    layer = wrap(kind, base, r=4, alpha=4, init="pissa")
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base.weight, original)


@pytest.mark.parametrize("options, message", [
    (dict(r=0), "r"), (dict(r=-2), "r"), (dict(r=2.5), "r"), (dict(alpha=0), "alpha"),
    (dict(alpha=-1.0), "alpha"), (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
    (dict(init="loftq"), "init"),
])
def test_bad_layer_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(nn.Linear(4, 4), **options)


def test_pissa_refused_where_unsupported():
    with pytest.raises(ValueError, match="pissa"):
        LoRAEmbedding(nn.Embedding(5, 4), init="pissa")


# ---------------------------------------------------------------- NF4 / QLoRA


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_linear_matches_dequantized_reference(dtype, double_quant):
    torch.manual_seed(6)
    linear = nn.Linear(96, 40).to(dtype)
    layer = NF4Linear.from_linear(linear, blocksize=64, double_quant=double_quant)
    x = torch.randn(3, 7, 96, dtype=dtype)
    dense = layer.dequantize(torch.float32)
    expected = x.float() @ dense.T + linear.bias.float()
    torch.testing.assert_close(layer(x).float(), expected, **tolerance(dtype))
    # NF4 keeps each weight within half a code step (<= 0.17 * block absmax).
    assert (dense - linear.weight.float()).abs().max() <= 0.17 * linear.weight.float().abs().max()
    assert not list(p for p in layer.parameters() if p.requires_grad)


def test_nf4_linear_buffers_keep_dtype_under_module_casts():
    layer = NF4Linear.from_linear(nn.Linear(64, 32), double_quant=False)
    scales = layer.weight_absmax.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer.weight_absmax.dtype == torch.float32
    assert torch.equal(layer.weight_absmax, scales) and layer.bias.dtype == torch.bfloat16
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_nf4_linear_state_dict_round_trip():
    torch.manual_seed(7)
    source = NF4Linear.from_linear(nn.Linear(80, 24))
    state = source.state_dict()
    assert {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
            "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"} == set(state)
    target = NF4Linear.from_linear(nn.Linear(80, 24), double_quant=False, blocksize=128)
    target.load_state_dict(state)
    x = torch.randn(4, 80)
    assert torch.equal(target(x), source(x))
    wrong = NF4Linear.from_linear(nn.Linear(40, 24))
    with pytest.raises(RuntimeError, match="does not fit"):
        wrong.load_state_dict(state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qlora_linear_forward_and_gradients(dtype):
    torch.manual_seed(8)
    linear = nn.Linear(128, 48).to(dtype)
    layer = QLoRALinear.from_linear(linear, r=4, alpha=8, init=False)
    x = torch.randn(6, 128, dtype=dtype, requires_grad=True)
    weights = torch.randn(6, 48, dtype=dtype)
    (layer(x) * weights).sum().backward()
    factor_A, factor_B = layer._factor_tensors("default")
    got = [x.grad.float(), factor_A.grad.clone(), factor_B.grad.clone()]
    dense = layer.base_layer.dequantize(torch.float32)
    x_ref = x.detach().float().requires_grad_(True)
    A_ref = factor_A.detach().clone().requires_grad_(True)
    B_ref = factor_B.detach().clone().requires_grad_(True)
    expected = x_ref @ dense.T + linear.bias.float() + 2.0 * (x_ref @ A_ref.T) @ B_ref.T
    torch.testing.assert_close(layer(x).float(), expected, **tolerance(dtype))
    (expected * weights.float()).sum().backward()
    tol = tolerance(dtype) if dtype == torch.float32 else dict(atol=0.3, rtol=5e-2)
    for value, reference in zip(got, [x_ref.grad, A_ref.grad, B_ref.grad]):
        torch.testing.assert_close(value, reference, **tol)


def test_qlora_merge_requantizes_once_reports_error_and_unmerges_exactly():
    torch.manual_seed(9)
    layer = QLoRALinear.from_linear(nn.Linear(128, 64), r=4, alpha=8, init=False)
    layer.update_layer("other", r=2, alpha=2, init=False)
    x = torch.randn(5, 128)
    unmerged = layer(x)
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    exact = (layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default")
             + layer.delta_weight("other"))
    errors = layer.merge()
    measured = (layer.base_layer.dequantize(torch.float32) - exact).abs().max().item()
    assert errors == {"default": pytest.approx(measured), "other": pytest.approx(measured)}
    assert 0 < measured <= 0.17 * exact.abs().max().item()
    assert torch.allclose(layer(x), unmerged, atol=10 * measured * 128 ** 0.5)
    layer.unmerge()
    after = layer.base_layer.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert torch.equal(layer(x), unmerged)


def test_qlora_merge_keeping_dense_weight_is_exact():
    torch.manual_seed(10)
    layer = QLoRALinear.from_linear(nn.Linear(64, 32), r=4, init=False)
    x = torch.randn(3, 64)
    unmerged = layer(x)
    errors = layer.merge(keep_merged_weight=True)
    assert errors["default"] == 0.0 and layer.merged_weight.dtype == torch.float32
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="other way"):
        layer.merge(["default"], keep_merged_weight=False)
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.unmerge()
    assert layer.merged_weight is None and torch.equal(layer(x), unmerged)


def test_qlora_train_eval_switching():
    torch.manual_seed(11)
    layer = QLoRALinear.from_linear(nn.Linear(64, 32), r=4, dropout=0.1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(8, 64)
    for _ in range(2):
        layer.train()
        layer(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        layer.eval()
        with torch.no_grad():
            evaluated = layer(x)
        assert torch.isfinite(evaluated).all()
    layer.train()
    layer(x).sum().backward()
    assert layer.lora_B["default"].weight.grad is not None


def test_qlora_pissa_from_linear_quantizes_the_residual():
    torch.manual_seed(12)
    linear = nn.Linear(64, 32)
    x = torch.randn(4, 64)
    expected = linear(x)
    plain = QLoRALinear.from_linear(linear, r=8, alpha=8)
    pissa = QLoRALinear.from_linear(linear, r=8, alpha=8, init="pissa")
    # The principal part stays exact in the adapter, so only the residual is rounded.
    assert (pissa(x) - expected).abs().max() < (plain(x) - expected).abs().max()


def test_nf4_weight_is_compatible_with_quant_module():
    weight = torch.randn(32, 64)
    layer = NF4Linear(NF4Weight.from_float(weight), None)
    assert torch.equal(layer.dequantize(), NF4Weight.from_float(weight).dequantize())

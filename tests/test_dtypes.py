"""Dtypes and differentiation modes of every op and layer.

* mixed precision: ``torch.autocast`` (bfloat16 / float16) on CPU, eager and
  compiled, against the float32 run and against PEFT in the same loop;
* float64: every layer and a wrapped model pass ``torch.autograd.gradcheck``;
* forward-mode AD: ``torch.func.jvp`` / ``jacfwd`` / ``torch.autograd.forward_ad``
  give the tangents of the same math written with plain torch ops.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from lowrank_ext import AdaLoRAModule, LoRAModule, NF4Weight, QLoRAModule, ops
from lowrank_ext.nn import AdaLoRALinear, LoRALinear, NF4Linear, QLoRALinear

peft = pytest.importorskip("peft")

HALF_DTYPES = [torch.bfloat16, torch.float16]
# Unit roundoff of each dtype (half the distance from 1 to the next value):
# one rounding changes a value by at most this much, relatively.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -12}


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 8)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


IDS = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(1))
MLP_X = torch.randn(12, 32, generator=torch.Generator().manual_seed(2))
MLP_Y = torch.randn(12, 8, generator=torch.Generator().manual_seed(3))


def llama_loss(model):
    return model(input_ids=IDS, labels=IDS).loss


def mlp_loss(model):
    return F.mse_loss(model(MLP_X).float(), MLP_Y)


MODELS = {"llama": (tiny_llama, llama_loss, ["q_proj", "v_proj", "down_proj"]),
          "mlp": (MLP, mlp_loss, ["up", "down"])}


def wrap(kind, model, targets):
    """init_lora_weights=False: both factors (AdaLoRA: lambda too) random, so the
    adapters change the output and every factor gets a gradient."""
    if kind == "lora":
        return LoRAModule(model, target_modules=targets, r=4, lora_alpha=8,
                          init_lora_weights=False)
    if kind == "qlora":
        return QLoRAModule(model, target_modules=targets, r=4, lora_alpha=8,
                           init_lora_weights=False)
    return AdaLoRAModule(model, target_modules=targets, init_r=4, target_r=2, total_step=100,
                         lora_alpha=8, init_lora_weights=False)


def loss_and_grads(model, loss_fn, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = loss_fn(model)
    loss.backward()
    grads = {name: parameter.grad for name, parameter in model.named_parameters()
             if parameter.requires_grad}
    return loss.detach(), grads


def relative_error(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


# ------------------------------------------------------------------ autocast


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("model_name", ["llama", "mlp"])
@pytest.mark.parametrize("kind", ["lora", "qlora", "adalora"])
def test_autocast_trains_in_fp32_parameters_close_to_the_fp32_run(kind, model_name, dtype):
    build, loss_fn, targets = MODELS[model_name]
    model = wrap(kind, build(), targets).train()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())

    loss32, grads32 = loss_and_grads(model, loss_fn)
    loss, grads = loss_and_grads(model, loss_fn, dtype)

    assert loss.dtype == torch.float32
    for name, parameter in trainable.items():
        assert parameter.dtype == torch.float32, name
        assert grads[name] is not None and grads[name].dtype == torch.float32, name
    # Every GEMM operand is rounded once to the autocast dtype (relative error
    # u = UNIT_ROUNDOFF) and products are summed in fp32, so each layer adds
    # a few u; over this depth (2 decoder layers, or 2 MLP layers) and the
    # backward's own roundings, 64u bounds the loss (2^-3 for bfloat16,
    # 2^-6 for float16) and 256u each gradient tensor's relative error, with
    # room for the attention softmax amplifying it. Measured: the loss within
    # 0.4u, gradients within 10u, except AdaLoRA's lambda on Llama under
    # float16 at 69u (a small gradient summed from cancelling terms).
    u = UNIT_ROUNDOFF[dtype]
    assert abs(loss.item() - loss32.item()) <= 64 * u * abs(loss32.item())
    for name in trainable:
        assert relative_error(grads[name], grads32[name]) <= 256 * u, name


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["lora", "qlora", "adalora"])
def test_autocast_optimizer_steps_update_fp32_parameters(kind, dtype):
    model = wrap(kind, tiny_llama(), ["q_proj", "v_proj"]).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=dtype):
            loss = llama_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    for parameter, old in zip(trainable, before):
        assert parameter.dtype == torch.float32
        assert not torch.equal(parameter, old)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
def test_autocast_lora_matches_peft_in_the_same_loop(tmp_path, dtype):
    ours = wrap("lora", tiny_llama(), ["q_proj", "v_proj", "down_proj"]).train()
    ours.save_adapter(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    theirs.train()
    loss32, _ = loss_and_grads(ours, llama_loss)
    loss, grads = loss_and_grads(ours, llama_loss, dtype)
    peft_loss, peft_grads = loss_and_grads(theirs, llama_loss, dtype)
    # Same model, same factors, same autocast: the two libraries differ only in
    # where they round (our fused op adds the low-rank term into the base
    # GEMM's output, PEFT adds two rounded outputs), a few u per layer; the
    # same bounds as against the fp32 run apply.
    u = UNIT_ROUNDOFF[dtype]
    assert abs(loss.item() - peft_loss.item()) <= 64 * u * abs(loss32.item())
    # Both libraries name the factors "...layers.<i>.<module>.lora_A.default.weight".
    by_layer = {name[name.index("layers."):]: grad for name, grad in peft_grads.items()}
    assert by_layer.keys() == {name[name.index("layers."):] for name in grads}
    for name, grad in grads.items():
        assert relative_error(grad, by_layer[name[name.index("layers."):]]) <= 256 * u, name


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["lora", "qlora", "adalora"])
def test_compile_under_autocast_matches_eager(kind, dtype):
    torch._dynamo.reset()
    model = wrap(kind, MLP(), ["up", "down"]).train()
    eager_loss, eager_grads = loss_and_grads(model, mlp_loss, dtype)
    compiled = torch.compile(model, fullgraph=kind != "adalora")
    loss, grads = loss_and_grads(compiled, mlp_loss, dtype)
    # Inductor may fuse the elementwise ops between the GEMMs and skip an
    # intermediate rounding to the autocast dtype: a few u of difference.
    u = UNIT_ROUNDOFF[dtype]
    assert abs(loss.item() - eager_loss.item()) <= 16 * u * abs(eager_loss.item())
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert relative_error(grad, eager_grads[name.removeprefix("_orig_mod.")]) <= 64 * u, name


def test_ops_under_autocast_compute_in_the_autocast_dtype_and_keep_fp32_gradients():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=generator, requires_grad=True)
    weight = torch.randn(24, 64, generator=generator)
    bias = torch.randn(24, generator=generator)
    lora_A = torch.randn(4, 64, generator=generator, requires_grad=True)
    lora_B = torch.randn(24, 4, generator=generator, requires_grad=True)
    quantized = NF4Weight.from_float(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = ops.lora_linear(x, weight, bias, lora_A, lora_B, 0.5)
        nf4 = ops.nf4_linear(x, *quantized.linear_args(), bias)
        fused = ops.qlora_linear(x, *quantized.linear_args(), bias, lora_A, lora_B, 0.5)
        stacked_A, stacked_B, ranks = ops.stack_lora_factors([lora_A], [lora_B])
        rows = ops.multi_lora_linear(x, nf4, stacked_A, stacked_B, ranks, [0.5],
                                     [0, -1, 0, 0, -1])
    for out in (dense, nf4, fused, rows):
        assert out.dtype == torch.bfloat16
    # The same math with the operands rounded to bfloat16 first, as torch's
    # autocast does for F.linear. Both sides round the base product and the
    # low-rank term to bfloat16 in different places (u = 2^-9 of the terms'
    # size each), and the terms may cancel: 4u of the largest value bounds it.
    x16, w16, b16 = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    a16, bb16 = lora_A.bfloat16(), lora_B.bfloat16()
    expected = (x16.float() @ w16.float().T + b16.float()
                + 0.5 * (x16.float() @ a16.float().T).bfloat16().float() @ bb16.float().T)
    u = UNIT_ROUNDOFF[torch.bfloat16]
    torch.testing.assert_close(dense.float(), expected, rtol=0,
                               atol=4 * u * expected.abs().max().item())
    (dense.float().sum() + fused.float().sum() + rows.float().sum()).backward()
    assert lora_A.grad.dtype == torch.float32 and lora_B.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32


def test_autocast_kernels_are_registered_for_cpu_and_cuda():
    for op in ("nf4_linear", "lora_linear", "qlora_linear", "multi_lora_linear", "dropout",
               "nf4_linear_grad_input", "lora_linear_backward", "qlora_linear_backward",
               "multi_lora_linear_backward"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_ext::{op}", key), \
                (op, key)


# ------------------------------------------------------------------- float64


def _linear64(in_features=64, out_features=8, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features).double()


LAYERS64 = {
    # Each layer kind on a float64 base, factors random so that they matter.
    "lora": lambda: LoRALinear(_linear64(), r=3, alpha=6, init=False),
    "nf4": lambda: NF4Linear.from_linear(_linear64()),
    "qlora": lambda: QLoRALinear.from_linear(_linear64(), r=3, alpha=6, init=False),
    "adalora": lambda: AdaLoRALinear(_linear64(), init_r=3, alpha=6, init=False),
    "adalora_nf4": lambda: AdaLoRALinear(NF4Linear.from_linear(_linear64()), init_r=3, alpha=6,
                                         init=False),
}


def _gradcheck_layer(layer, x):
    """gradcheck with respect to the input and every trainable parameter."""
    names = [name for name, p in layer.named_parameters() if p.requires_grad]
    values = [p.detach().clone().requires_grad_() for name, p in layer.named_parameters()
              if p.requires_grad]

    def function(inputs, *parameters):
        return torch.func.functional_call(layer, dict(zip(names, parameters)), (inputs,))

    return torch.autograd.gradcheck(function, (x, *values))


@pytest.mark.parametrize("kind", ["lora", "nf4", "qlora", "adalora", "adalora_nf4"])
def test_float64_layers_pass_gradcheck(kind):
    layer = LAYERS64[kind]()
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    assert layer(x).dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in layer.parameters() if p.requires_grad)
    assert _gradcheck_layer(layer, x)


@pytest.mark.parametrize("double_quant", [True, False])
def test_float64_nf4_base_is_the_exactly_dequantized_weight(double_quant):
    layer = QLoRALinear.from_linear(_linear64(), r=3, alpha=6, init=False,
                                    double_quant=double_quant)
    x = torch.randn(20, 64, dtype=torch.float64)
    dense = layer.base_layer.dequantize(torch.float64)
    # The fp32 decode, widened: float64 holds it exactly.
    assert torch.equal(dense, layer.base_layer.dequantize(torch.float32).double())
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = F.linear(x, dense, layer.base_layer.bias) + 2.0 * (x @ A.T) @ B.T
    # Both sides are float64 GEMMs over 64 terms: rounding ~1e-15 relative.
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["lora", "qlora", "adalora"])
def test_float64_wrapped_model_passes_gradcheck(kind):
    model = wrap(kind, MLP().double(), ["up", "down"]).eval()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    values = [p.detach().clone().requires_grad_() for p in model.parameters() if p.requires_grad]
    assert values and all(v.dtype == torch.float64 for v in values)
    x = MLP_X[:4].double().requires_grad_()

    def function(inputs, *parameters):
        return torch.func.functional_call(model, dict(zip(names, parameters)), (inputs,))

    assert torch.autograd.gradcheck(function, (x, *values))


# ---------------------------------------------------------- forward-mode AD


def _reference(layer):
    """The layer's function written with plain torch ops (no lowrank_ext op)."""
    if isinstance(layer, NF4Linear):
        weight, bias, delta = layer.dequantize(torch.float32), layer.bias, None
    else:
        base = layer.base_layer
        weight = (base.dequantize(torch.float32) if isinstance(base, NF4Linear)
                  else base.weight)
        bias = base.bias
        if isinstance(layer, AdaLoRALinear):
            A, B = layer.effective_factors("default")
        else:
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta = (A, B, layer.scaling["default"])

    def function(x):
        out = F.linear(x, weight, bias)
        if delta is not None:
            A, B, scaling = delta
            out = out + scaling * (x @ A.T) @ B.T
        return out

    return function


LAYERS32 = {
    "lora": lambda: LoRALinear(nn.Linear(64, 8), r=3, alpha=6, init=False),
    "nf4": lambda: NF4Linear.from_linear(nn.Linear(64, 8)),
    "qlora": lambda: QLoRALinear.from_linear(nn.Linear(64, 8), r=3, alpha=6, init=False),
    "adalora": lambda: AdaLoRALinear(nn.Linear(64, 8), init_r=3, alpha=6, init=False),
}


# fp32 GEMMs over 64 terms on both sides, in different orders: ~1e-6 relative.
FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "nf4", "qlora", "adalora"])
def test_jvp_and_forward_ad_match_the_plain_torch_reference(kind):
    torch.manual_seed(0)
    layer = LAYERS32[kind]().eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 64, generator=generator)
    tangent = torch.randn(5, 64, generator=generator)
    reference = _reference(layer)
    expected_out, expected_tangent = torch.func.jvp(reference, (x,), (tangent,))
    assert expected_tangent.abs().max() > 0.1

    out, out_tangent = torch.func.jvp(layer, (x,), (tangent,))
    torch.testing.assert_close(out, expected_out, **FP32_TOLERANCE)
    torch.testing.assert_close(out_tangent, expected_tangent, **FP32_TOLERANCE)

    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = layer(fwAD.make_dual(x, tangent))
        unpacked = fwAD.unpack_dual(dual)
    torch.testing.assert_close(unpacked.primal, expected_out, **FP32_TOLERANCE)
    torch.testing.assert_close(unpacked.tangent, expected_tangent, **FP32_TOLERANCE)

    jacobian = torch.func.jacfwd(layer)(x[:2])
    torch.testing.assert_close(jacobian, torch.func.jacrev(reference)(x[:2]), **FP32_TOLERANCE)


@pytest.mark.parametrize("kind", ["lora", "qlora", "adalora"])
def test_jvp_with_respect_to_adapter_parameters(kind):
    torch.manual_seed(0)
    layer = LAYERS32[kind]().eval()
    params = {name: p.detach() for name, p in layer.named_parameters() if p.requires_grad}
    tangents = {name: torch.randn_like(p) for name, p in params.items()}
    x = torch.randn(4, 64)

    def through(parameters):
        return torch.func.functional_call(layer, parameters, (x,))

    _, tangent = torch.func.jvp(through, (params,), (tangents,))
    # The same directional derivative by central differences in float64 on the
    # reference math: exact for the bilinear LoRA term up to rounding.
    step = 1e-3
    def shifted(sign):
        moved = {name: (p + sign * step * tangents[name]) for name, p in params.items()}
        with torch.no_grad():
            return torch.func.functional_call(layer, moved, (x,)).double()
    numeric = (shifted(1) - shifted(-1)) / (2 * step)
    assert tangent.abs().max() > 0.1
    # Central differences of a function quadratic in the step are exact; what
    # is left is fp32 rounding of the outputs divided by the step: ~1e-6/1e-3.
    torch.testing.assert_close(tangent.double(), numeric, rtol=1e-2, atol=1e-2)


def test_forward_ad_through_dropout_uses_the_forward_mask():
    layer = LoRALinear(nn.Linear(64, 8), r=3, alpha=6, dropout=0.5, init=False).train()
    x, tangent = torch.randn(4, 64), torch.randn(4, 64)
    torch.manual_seed(7)
    plain = layer(x)
    torch.manual_seed(7)
    out, out_tangent = torch.func.jvp(layer, (x,), (tangent,))
    torch.manual_seed(7)
    # With its dropout mask fixed the layer is affine in x: the tangent is the
    # layer applied to the tangent, less the bias.
    expected_tangent = layer(tangent) - layer.base_layer.bias
    torch.testing.assert_close(out, plain, **FP32_TOLERANCE)
    torch.testing.assert_close(out_tangent, expected_tangent, **FP32_TOLERANCE)


def test_forward_ad_on_mixed_adapter_batches_raises():
    layer = LoRALinear(nn.Linear(16, 8), r=2, init=False)
    layer.set_row_adapters(["default", "__base__"])
    with pytest.raises(RuntimeError, match="does not support forward-mode AD"):
        torch.func.jvp(layer, (torch.randn(2, 16),), (torch.randn(2, 16),))

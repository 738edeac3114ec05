"""The ``lowrank-ext`` command: info, bench, finetune on a small file, clean errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lowrank_ext
from lowrank_ext import cli

# Subprocesses import the same lowrank_ext as this test session (a source
# checkout's python/ folder or an installed package).
PYTHON_ROOT = Path(lowrank_ext.__file__).resolve().parents[1]


def _environment() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(PYTHON_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


def _run(*arguments, timeout=300):
    return subprocess.run([sys.executable, "-m", "lowrank_ext.cli", *arguments],
                          env=_environment(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def small_csv(tmp_path):
    """A two-label file built from stdlib docstrings (a small, real task)."""
    from lowrank_ext.finetune.data import stdlib_docstring_splits

    splits = stdlib_docstring_splits()
    rows = [(text, splits.label_names[label])
            for text, label in zip(splits.train.texts, splits.train.labels)
            if splits.label_names[label] in ("email", "unittest")][:80]
    import csv

    path = tmp_path / "small.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def test_info_prints_build_information():
    completed = _run("info")
    assert completed.returncode == 0, completed.stderr
    import lowrank_ext

    assert f"version: {lowrank_ext.build_info()['version']}" in completed.stdout
    assert "cpu_isa:" in completed.stdout


def test_builtin_bench_prints_ratio_table(capsys):
    assert cli.main(["bench", "--builtin", "--repeats", "1"]) == 0
    output = capsys.readouterr().out
    assert "NF4 matmul, 1 row(s)" in output and "torch dense ms" in output
    assert "4096x4096" in output


@pytest.mark.parametrize("arguments, message", [
    (["finetune", "--method", "dora"], "unknown method 'dora'"),
    (["finetune", "--data", "does-not-exist.csv"], "data file not found"),
    (["finetune", "--epochs", "0"], "expected a positive integer"),
    (["finetune", "--lr", "fast"], "expected a positive number"),
    (["finetune", "--dropout", "1.5"], "argument --dropout: expected a number in [0, 1)"),
    (["finetune", "--compare", "--resume", "somewhere"], "cannot be combined"),
    (["finetune", "--resume", "no-such-adapter"], "adapter directory not found"),
    (["train"], "invalid choice"),
    (["bench", "no-such-benchmark"], "unknown benchmark(s) no-such-benchmark"),
])
def test_user_errors_are_one_line_with_status_2(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        status = cli.main(arguments)
        raise SystemExit(status)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert message in error
    assert len(error.splitlines()) == 1 and "Traceback" not in error


@pytest.mark.parametrize("content, message", [
    ("", "no examples"),
    ("sentence,label\nhello,a\n", "missing column 'text'"),
])
def test_bad_data_files_are_clean_errors(tmp_path, content, message, capsys):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert cli.main(["finetune", "--data", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    completed = _run("finetune", "--data", str(tmp_path / "missing.jsonl"))
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().endswith("data file not found: " + str(tmp_path / "missing.jsonl"))


def test_compare_on_a_file_runs_every_method_and_prints_one_table(tmp_path, small_csv):
    """One subprocess per method: also the end-to-end test of ``finetune`` itself."""
    pytest.importorskip("transformers")
    output = tmp_path / "compare"
    completed = _run("finetune", "--compare", "--data", str(small_csv), "--epochs", "1",
                     "--batch-size", "8", "--max-length", "16", "--max-train-samples", "16",
                     "--rank", "4", "--target-modules", "query,value", "--threads", "2",
                     "--output-dir", str(output), timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    reports = json.loads((output / "compare.json").read_text())
    assert [report["method"] for report in reports] == ["qlora", "lora", "adalora", "full"]
    by_method = {report["method"]: report for report in reports}
    for method, report in by_method.items():
        assert report["data"]["labels"] == ["email", "unittest"]
        assert report["data"]["train_used"] == 16 and report["steps"] == 2
        # The adapter options go to the adapter methods; full has none.
        assert report["settings"]["target_modules"] == (
            None if method == "full" else ["query", "value"])
        assert (output / method / "loss.png").is_file()
        assert (output / method / "adapter" / "finetune_run.json").is_file()
    config = json.loads((output / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["query", "value"]
    assert config["modules_to_save"] == ["classifier"]
    assert by_method["full"]["trainable_parameters"] == by_method["full"]["base_parameters"]
    assert by_method["lora"]["trainable_parameters"] < 0.05 * by_method["full"]["trainable_parameters"]
    assert by_method["qlora"]["trainable_parameters"] == by_method["lora"]["trainable_parameters"]
    assert by_method["qlora"]["weight_bytes"] < by_method["lora"]["weight_bytes"]
    assert by_method["full"]["train_memory_bytes"] > by_method["lora"]["train_memory_bytes"]
    # The progress bars report loss and throughput; the table lists every method.
    assert "samples_per_s=" in completed.stderr and "loss=" in completed.stderr
    for method in ("qlora", "lora", "adalora", "full"):
        assert f"| {method} |" in (output / "compare.md").read_text()
        assert any(line.startswith(method + " ") for line in completed.stdout.splitlines())


def test_group_by_length_reaches_the_run_and_every_compare_child(tmp_path):
    from lowrank_ext import cli

    # On by default (it halves the padded tokens of the built-in task).
    for grouped in (cli.build_parser().parse_args(["finetune"]),
                    cli.build_parser().parse_args(["finetune", "--group-by-length"])):
        assert cli._settings(grouped, "qlora", None).group_by_length
        child = cli._child_arguments(grouped, "lora", tmp_path)
        assert "--group-by-length" in child and "--no-group-by-length" not in child
    plain = cli.build_parser().parse_args(["finetune", "--no-group-by-length"])
    assert not cli._settings(plain, "qlora", None).group_by_length
    child = cli._child_arguments(plain, "lora", tmp_path)
    assert "--no-group-by-length" in child and "--group-by-length" not in child


def test_cli_defaults_are_the_job_defaults():
    # cli.py keeps its own argparse defaults (it imports no torch for --help):
    # they must stay those of FinetuneSettings, which run_finetune and the
    # PEFT baseline use.
    from lowrank_ext import cli
    from lowrank_ext.finetune.train import FinetuneSettings

    arguments = cli.build_parser().parse_args(["finetune"])
    settings = cli._settings(arguments, arguments.method, None)
    job = FinetuneSettings()
    for name in ("method", "epochs", "batch_size", "max_length", "seed", "group_by_length",
                 "learning_rate", "rank", "alpha", "dropout", "target_modules"):
        assert getattr(settings, name) == getattr(job, name), name

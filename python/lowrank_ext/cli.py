"""The ``lowrank-ext`` command: ``finetune``, ``bench`` and ``info``.

User errors (bad options, missing or malformed data, missing optional
packages) print one line, ``lowrank-ext: error: ...``, and exit with status 2;
they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

USAGE_ERROR = 2


class UsageError(Exception):
    """A problem the user can fix; reported as one line with exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _dropout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def _module_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names, e.g. query,value")
    return names


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line with exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lowrank-ext`` and its subcommands."""
    from .finetune.methods import DEFAULT_TARGET_MODULES, METHODS

    import lowrank_ext

    parser = _Parser(prog="lowrank-ext",
                     description="LoRA, AdaLoRA and QLoRA fine-tuning on lowrank_ext kernels.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {lowrank_ext.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{finetune,bench,info}",
                                     parser_class=_Parser)
    commands.required = True

    finetune = commands.add_parser(
        "finetune", help="fine-tune a text classifier (default: QLoRA, all-MiniLM-L6-v2, "
                         "stdlib docstrings -> package)",
        description="Fine-tune all-MiniLM-L6-v2 with a linear head on a text classification "
                    "task. Without --data the task is built offline from docstrings of "
                    "Python's standard library, labeled by package.")
    finetune.add_argument("--method", default="qlora",
                          help=f"one of {', '.join(METHODS)} (default: qlora)")
    finetune.add_argument("--compare", action="store_true",
                          help="run every method on the same data and seed, print one table")
    finetune.add_argument("--data", metavar="FILE",
                          help="CSV or JSONL file with columns text,label (default: built-in task)")
    finetune.add_argument("--epochs", type=_positive_int, default=1,
                          help="passes over the training set (default: 1; the built-in task "
                               "reaches ~87%% test accuracy with --epochs 2 --max-length 64)")
    finetune.add_argument("--batch-size", type=_positive_int, default=32)
    finetune.add_argument("--lr", type=_positive_float, default=None,
                          help="learning rate of the adapted weights and the head (default: 2e-3; "
                               "adalora: 1e-2 for its triplets, full: 1e-4 for the encoder, "
                               "2e-3 for the head)")
    # The adapter options default to None: with --resume an unset option
    # takes the saved run's value, and a set one must agree with it.
    resumed = "; with --resume: the saved run's"
    finetune.add_argument("--rank", type=_positive_int, default=None,
                          help=f"LoRA rank r; AdaLoRA's final average rank (default: 8{resumed})")
    finetune.add_argument("--alpha", type=_positive_float, default=None,
                          help="LoRA alpha; the update is scaled by alpha/r "
                               f"(default: 16{resumed})")
    finetune.add_argument("--dropout", type=_dropout, default=None,
                          help=f"LoRA dropout, in [0, 1) (default: 0{resumed})")
    finetune.add_argument("--target-modules", type=_module_list, default=None,
                          help="comma-separated module names to adapt "
                               f"(default: {','.join(DEFAULT_TARGET_MODULES)}{resumed}); "
                               "not with --method full")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--max-train-samples", type=_positive_int, default=None,
                          help="train on a stratified random sample of N training examples "
                               "(every label keeps its share; drawn with --seed)")
    finetune.add_argument("--max-length", type=_positive_int, default=32,
                          help="truncate texts to this many tokens (default: 32)")
    finetune.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                          default=True,
                          help="batch texts of similar length together (within random groups "
                               "of 8 batches): less padding, about twice the samples/s on "
                               "the built-in task (default: on)")
    finetune.add_argument("--threads", type=_positive_int, default=None,
                          help="torch.set_num_threads (default: torch's choice)")
    finetune.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    finetune.add_argument("--output-dir", metavar="DIR",
                          help="where to write adapter, report.json and loss.png "
                               "(default: runs/<method>-<timestamp>)")
    finetune.add_argument("--resume", metavar="ADAPTER_DIR",
                          help="load an adapter saved by a previous run and continue training")
    finetune.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    bench = commands.add_parser(
        "bench", help="run the benchmarks",
        description="Run the benchmark scripts (bench_*.py) of a source checkout's bench/ "
                    "folder: --bench-dir, else the checkout this package is imported from "
                    "(./run.sh bench passes its own). An installed package without a "
                    "checkout runs a small built-in NF4-vs-dense timing instead.")
    bench.add_argument("names", nargs="*", metavar="NAME",
                       help="benchmarks to run, e.g. nf4 for bench_nf4.py "
                            "(default: all that this machine can run)")
    bench.add_argument("--bench-dir", metavar="DIR",
                       help="folder of the bench_*.py scripts (default: bench/ of the source "
                            "checkout this package is imported from, if any)")
    bench.add_argument("--args", default="", metavar="ARGS",
                       help="arguments for every script, e.g. --args='--steps 5'")
    bench.add_argument("--list", action="store_true",
                       help="print the scripts that would run, and run none")
    bench.add_argument("--builtin", action="store_true",
                       help="run the built-in timing even in a source checkout")
    bench.add_argument("--repeats", type=_positive_int, default=7,
                       help="timed repetitions per case of the built-in timing (default: 7)")

    commands.add_parser("info", help="print build information (version, backends, CPU ISA)")
    return parser


def _settings(arguments: argparse.Namespace, method: str, output_dir: Optional[str]):
    from .finetune.train import FinetuneSettings

    return FinetuneSettings(
        method=method, data=arguments.data, epochs=arguments.epochs,
        batch_size=arguments.batch_size, learning_rate=arguments.lr, rank=arguments.rank,
        alpha=arguments.alpha, dropout=arguments.dropout,
        target_modules=arguments.target_modules, seed=arguments.seed,
        max_train_samples=arguments.max_train_samples, max_length=arguments.max_length,
        threads=arguments.threads, device=arguments.device, output_dir=output_dir,
        resume=arguments.resume, progress=not arguments.no_progress,
        group_by_length=arguments.group_by_length)


def _child_arguments(arguments: argparse.Namespace, method: str, output_dir: Path) -> list[str]:
    """The command line of one --compare run, repeating every shared option.

    The adapter options go to the adapter methods only: ``full`` refuses them.
    """
    command = [sys.executable, "-m", "lowrank_ext.cli", "finetune", "--method", method,
               "--output-dir", str(output_dir), "--epochs", str(arguments.epochs),
               "--batch-size", str(arguments.batch_size),
               "--seed", str(arguments.seed), "--max-length", str(arguments.max_length),
               "--device", arguments.device]
    options = [("--data", arguments.data), ("--lr", arguments.lr),
               ("--max-train-samples", arguments.max_train_samples),
               ("--threads", arguments.threads)]
    if method != "full":
        options += [("--rank", arguments.rank), ("--alpha", arguments.alpha),
                    ("--dropout", arguments.dropout),
                    ("--target-modules", arguments.target_modules
                     and ",".join(arguments.target_modules))]
    for flag, value in options:
        if value is not None:
            command += [flag, str(value)]
    if arguments.no_progress:
        command.append("--no-progress")
    command.append("--group-by-length" if arguments.group_by_length else "--no-group-by-length")
    return command


def _compare(arguments: argparse.Namespace) -> int:
    """Run every method in its own process and print one table.

    A fresh process per method keeps the peak-memory numbers honest: a
    process's freed memory is not always returned to the system, so a second
    run in the same process would be measured against an inflated baseline.
    """
    from .finetune import report as reporting
    from .finetune.methods import METHODS
    from .finetune.train import check_device, check_output_dir

    if arguments.resume:
        raise UsageError("--resume cannot be combined with --compare")
    output_dir = Path(arguments.output_dir or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    # Checked here too: a mistake should stop the comparison, not each run.
    check_device(arguments.device)
    check_output_dir(output_dir)
    reports = []
    for method in METHODS:
        print(f"== {method} ==", flush=True)
        completed = subprocess.run(_child_arguments(arguments, method, output_dir / method))
        if completed.returncode != 0:
            raise UsageError(f"the {method} run failed with exit status {completed.returncode}")
        reports.append(json.loads((output_dir / method / "report.json").read_text(encoding="utf-8")))
    rows = [reporting.result_row(report) for report in reports]
    data = reports[0]["data"]
    headers = reporting.columns(data)
    text = reporting.table(rows, headers)
    (output_dir / "compare.md").write_text(reporting.table(rows, headers, markdown=True) + "\n",
                                           encoding="utf-8")
    (output_dir / "compare.json").write_text(json.dumps(reports, indent=2) + "\n",
                                             encoding="utf-8")
    print(f"\n{reporting.data_line(data)}, seed {arguments.seed}")
    print(text)
    print(reporting.MEMORY_NOTE.format(measures=reports[0]["peak_memory_measures"]))
    print(f"written: {output_dir / 'compare.md'}, {output_dir / 'compare.json'}")
    return 0


def _finetune(arguments: argparse.Namespace) -> int:
    from .finetune import report as reporting
    from .finetune.methods import check_method
    from .finetune.train import run_finetune

    if arguments.compare:
        return _compare(arguments)
    check_method(arguments.method)
    result = run_finetune(_settings(arguments, arguments.method, arguments.output_dir))
    print(reporting.summary(result))
    return 0


def _bench_scripts(names: Sequence[str], directory: Optional[str]) -> list[Path]:
    """``bench_*.py`` of ``directory``, else of the source checkout this package was
    imported from (none for an installed package).

    Without ``names``: all of them, except the CUDA ones on a machine without
    a GPU. Unknown names or a missing ``directory`` raise :class:`UsageError`.
    """
    import torch

    if directory is not None and not Path(directory).is_dir():
        raise UsageError(f"--bench-dir {directory} is not a folder")
    bench = Path(directory or Path(__file__).resolve().parent.parent.parent / "bench")
    scripts = {path.stem[len("bench_"):]: path for path in sorted(bench.glob("bench_*.py"))}
    unknown = [name for name in names if name not in scripts]
    if unknown:
        available = ", ".join(scripts) or "none (not a source checkout; use --builtin)"
        raise UsageError(f"unknown benchmark(s) {', '.join(unknown)}; available: {available}")
    if names:
        return [scripts[name] for name in names]
    return [path for name, path in scripts.items()
            if "cuda" not in name or torch.cuda.is_available()]


def _bench(arguments: argparse.Namespace) -> int:
    scripts = [] if arguments.builtin else _bench_scripts(arguments.names, arguments.bench_dir)
    if not scripts:
        builtin = "the built-in NF4-vs-dense timing"
        if not arguments.builtin:
            # Say so: an installed package cannot see a checkout's bench/.
            builtin += (" (no bench/ folder of a source checkout found; pass --bench-dir or "
                        "use ./run.sh bench for the full benchmarks)")
        if arguments.list:
            print(builtin)
            return 0
        from .finetune import benchmark

        print(f"running {builtin}", flush=True)
        print(benchmark.run(arguments.repeats))
        return 0
    if arguments.list:
        print("\n".join(str(script) for script in scripts))
        return 0
    script_arguments = shlex.split(arguments.args)
    status = 0
    for script in scripts:
        print(f"== {script.name} ==", flush=True)
        completed = subprocess.run([sys.executable, str(script), *script_arguments])
        status = max(status, completed.returncode)
    return status


def _info(arguments: argparse.Namespace) -> int:
    import lowrank_ext

    for key, value in lowrank_ext.build_info().items():
        print(f"{key}: {value}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lowrank-ext``; returns the exit status."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    from .finetune.data import DataError
    from .finetune.methods import MethodError
    from .finetune.model import DependencyError
    from .finetune.train import Interrupted, SettingsError

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{parser.prog}: warning: {message}", file=sys.stderr)

    handlers = {"finetune": _finetune, "bench": _bench, "info": _info}
    try:
        # Warnings (a label missing from training, a plot that cannot be
        # drawn) read as one line, like the errors; the context restores
        # the usual format when main() returns.
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            return handlers[arguments.command](arguments)
    except (UsageError, DataError, MethodError, DependencyError, SettingsError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except Interrupted as interrupted:
        print(f"{parser.prog}: {interrupted}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

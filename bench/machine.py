"""Describe the machine a benchmark ran on, and time callables the same way everywhere."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """One line: CPU model, torch threads, torch version, and lowrank_ext's ISA."""
    import lowrank_ext

    info = lowrank_ext.build_info()
    return (f"machine: {cpu_model()} | torch {torch.__version__} | threads "
            f"{torch.get_num_threads()} | lowrank_ext {info['version']} cpu_isa={info['cpu_isa']}")


def median_seconds(function: Callable[[], object], repeats: int = 7, warmup: int = 2,
                   min_seconds: float = 0.0) -> float:
    """Median wall time of `function()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        function()
    samples = []
    deadline = time.perf_counter() + min_seconds
    while len(samples) < repeats or time.perf_counter() < deadline:
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))

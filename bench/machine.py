"""Describe the machine a benchmark ran on, and time callables the same way everywhere."""

from __future__ import annotations

import platform
import statistics
import threading
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


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (RssAnon, VmHWM, ...) in bytes. Linux only."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakSampler:
    """The highest RssAnon (anonymous resident memory) since construction or the
    last ``reset``, sampled on a daemon thread every ``interval`` seconds (torch
    kernels release the GIL, so it samples during them too)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, status_bytes("RssAnon")
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            self.peak = max(self.peak, status_bytes("RssAnon"))
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = status_bytes("RssAnon")

    def read(self) -> int:
        return max(self.peak, status_bytes("RssAnon"))

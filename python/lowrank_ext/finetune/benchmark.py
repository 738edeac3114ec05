"""A small built-in benchmark: NF4 kernels against dense torch, on this machine.

``lowrank-ext bench`` uses it when the source checkout's ``bench/`` folder is
not available (an installed wheel). It times, as medians of repeated runs,
NF4 quantization and dequantization, and the NF4 matmul against torch's dense
``x @ W.T`` on the same fp32 weight, and prints the ratios.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch

SHAPES = ((1024, 1024), (4096, 4096))
ROWS = (1, 64)


def median_seconds(function: Callable[[], object], repeats: int = 7) -> float:
    """Median wall time of ``function()`` after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(repeats: int = 7) -> str:
    """Time the kernels and return a printable table."""
    import lowrank_ext
    from lowrank_ext import NF4Weight, ops

    from .report import table

    generator = torch.Generator().manual_seed(0)
    rows = []
    for out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features, generator=generator)
        quantized = NF4Weight.from_float(weight)
        dense_bytes = weight.numel() * weight.element_size()
        quantize = median_seconds(lambda: ops.nf4_quantize(weight), repeats)
        dequantize = median_seconds(lambda: quantized.dequantize(torch.float32), repeats)
        shape = f"{out_features}x{in_features}"
        rows.append([shape, "NF4 quantize", f"{quantize * 1e3:.2f}", "", ""])
        rows.append([shape, "NF4 dequantize", f"{dequantize * 1e3:.2f}", "", ""])
        for count in ROWS:
            inputs = torch.randn(count, in_features, generator=generator)
            dense = median_seconds(lambda: inputs @ weight.T, repeats)
            nf4 = median_seconds(lambda: ops.nf4_linear(inputs, *quantized.linear_args()), repeats)
            rows.append([shape, f"NF4 matmul, {count} row(s)", f"{nf4 * 1e3:.2f}",
                         f"{dense * 1e3:.2f}", f"{nf4 / dense:.2f}"])
        rows.append([shape, "weight bytes (NF4 / fp32)", f"{quantized.nbytes()}",
                     f"{dense_bytes}", f"{quantized.nbytes() / dense_bytes:.3f}"])
    info = lowrank_ext.build_info()
    header = (f"machine: {platform.machine()} {platform.processor() or ''}".rstrip()
              + f", {os.cpu_count()} logical CPUs"
              + f", torch threads {torch.get_num_threads()}, lowrank_ext CPU ISA "
              f"{info.get('cpu_isa')}, torch {torch.__version__}")
    body = table(rows, headers=("weight", "work", "lowrank_ext ms", "torch dense ms",
                                "ratio (lower is faster)"))
    return header + "\n" + body

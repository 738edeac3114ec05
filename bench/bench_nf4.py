"""NF4 quantize / dequantize: lowrank_ext vs bitsandbytes, side by side in one run.

    python bench/bench_nf4.py [--size 4096] [--repeats 7]

Prints a table of median times and the ratio bitsandbytes / lowrank_ext
(higher is better for us), for each CPU ISA this machine supports.
Targets (issue 2): quantize >= 25x, dequantize >= 3x faster than
bitsandbytes on fp32 4096x4096; AVX2 >= 3x faster than scalar.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

import lowrank_ext  # noqa: E402
from lowrank_ext import ops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="weight is size x size")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--blocksize", type=int, default=64)
    args = parser.parse_args()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnb_functional

    print(machine.describe())
    weight = torch.randn(args.size, args.size)
    nbytes = weight.numel() * weight.element_size()
    time_of = lambda f: machine.median_seconds(f, repeats=args.repeats)  # noqa: E731

    bnb_quantize = time_of(lambda: bnb_functional.quantize_4bit(
        weight, blocksize=args.blocksize, quant_type="nf4", compress_statistics=False))
    packed_bnb, state = bnb_functional.quantize_4bit(
        weight, blocksize=args.blocksize, quant_type="nf4", compress_statistics=False)
    bnb_dequantize = time_of(lambda: bnb_functional.dequantize_4bit(packed_bnb, state))

    rows = []
    scalar_times = {}
    previous = lowrank_ext.get_cpu_isa()
    try:
        for isa in lowrank_ext.supported_cpu_isas():
            lowrank_ext.set_cpu_isa(isa)
            quantize = time_of(lambda: ops.nf4_quantize(weight, args.blocksize))
            packed, absmax = ops.nf4_quantize(weight, args.blocksize)
            dequantize = time_of(lambda: ops.nf4_dequantize(packed, absmax, weight.shape,
                                                            args.blocksize))
            scalar_times.setdefault("quantize", quantize)
            scalar_times.setdefault("dequantize", dequantize)
            for name, ours, theirs in (("quantize", quantize, bnb_quantize),
                                       ("dequantize", dequantize, bnb_dequantize)):
                rows.append([
                    name, isa, f"{ours * 1e3:.2f}", f"{theirs * 1e3:.2f}", f"{theirs / ours:.1f}x",
                    f"{scalar_times[name] / ours:.1f}x", f"{nbytes / ours / 1e9:.1f}",
                ])
    finally:
        lowrank_ext.set_cpu_isa(previous)

    print(f"NF4, fp32 {args.size}x{args.size}, blocksize {args.blocksize}, medians of {args.repeats}")
    machine.print_table(
        ["op", "isa", "lowrank_ext ms", "bitsandbytes ms", "bnb / ours", "scalar / isa",
         "fp32 GB/s"], rows)


if __name__ == "__main__":
    main()

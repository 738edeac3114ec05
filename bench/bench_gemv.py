"""Few-row NF4 linear (the decode / generation case): lowrank_ext's
``ops.nf4_linear`` against bitsandbytes' eval-mode ``Linear4bit`` holding the
same 4-bit weight, measured in the same run.

For every weight shape, row count (1, 2, 4, 8, 16) and activation dtype
(bf16, fp32) both contenders run the same input, their outputs are checked
close, and the two are timed interleaved (ours, bnb, ours, bnb, ...) so that
load from other processes falls on both alike. A row of the table gives each
one's median and spread (max - min over the repeats, in % of the median) and
the ratio bnb / ours: above 1 means ours is faster.

bitsandbytes' Linear4bit repacks its weight into an inference layout on the
first forward after ``.eval()`` under no_grad / inference_mode; one warm-up
forward builds it before timing, as a generation loop would.

    python bench/bench_gemv.py [--threads 1] [--quick] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

from lowrank_ext import NF4Weight, ops  # noqa: E402

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None

SHAPES = [(8192, 8192), (11008, 4096), (4096, 11008)]  # (out_features, in_features)
ROWS = (1, 2, 4, 8, 16)
DTYPES = (torch.bfloat16, torch.float32)


def bnb_eval_layer(dense: torch.Tensor, dtype: torch.dtype):
    layer = bnb.nn.Linear4bit(dense.shape[1], dense.shape[0], bias=False, compute_dtype=dtype,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)._quantize("cpu")
    return layer.eval()


def interleaved(contenders, repeats: int, min_seconds: float):
    """Per contender, the list of wall times of `repeats` (or more, until
    `min_seconds` have passed) rounds that each run every contender once."""
    for function in contenders:  # warm-up: allocations, lazy repacking
        function()
    samples = [[] for _ in contenders]
    deadline = time.perf_counter() + min_seconds
    while len(samples[0]) < repeats or time.perf_counter() < deadline:
        for function, times in zip(contenders, samples):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return samples


def summary(times):
    median = statistics.median(times)
    return median, (max(times) - min(times)) / median * 100


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds per cell")
    parser.add_argument("--min-seconds", type=float, default=0.0,
                        help="keep adding rounds until a cell has run this long")
    parser.add_argument("--quick", action="store_true",
                        help="one shape (8192x8192), rows 1/4/16, 5 rounds")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated OUTxIN shapes, e.g. 8192x8192,11008x4096")
    parser.add_argument("--rows", default=None, help="comma-separated row counts")
    parser.add_argument("--dtypes", default=None, help="comma-separated: bf16,fp32")
    args = parser.parse_args()
    if bnb is None:
        sys.exit("bench_gemv needs bitsandbytes (the anchor)")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    shapes, rows_list, dtypes, repeats = SHAPES, ROWS, DTYPES, args.repeats
    if args.quick:
        shapes, rows_list, repeats = SHAPES[:1], (1, 4, 16), min(repeats, 5)
    if args.shapes:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    if args.rows:
        rows_list = tuple(int(n) for n in args.rows.split(","))
    if args.dtypes:
        names = {"bf16": torch.bfloat16, "fp32": torch.float32}
        dtypes = tuple(names[n] for n in args.dtypes.split(","))

    print(machine.describe())
    print(f"bitsandbytes {bnb.__version__}; load average at start {os.getloadavg()[0]:.2f}; "
          f"{repeats} interleaved rounds per cell; ratio = bnb / ours (above 1: ours faster)\n")
    headers = ["shape (out x in)", "rows", "dtype", "ours ms", "spread", "bnb eval ms", "spread",
               "bnb / ours"]
    table = []
    torch.manual_seed(0)
    for out_features, in_features in shapes:
        dense = torch.randn(out_features, in_features) * 0.02
        weight = NF4Weight.from_float(dense, blocksize=64, double_quant=True)
        weight_args = weight.linear_args()
        for dtype in dtypes:
            layer = bnb_eval_layer(dense, dtype)
            # Same 4-bit codes on both sides (NF4 is bit-compatible), so the
            # outputs differ only by summation order and rounding.
            if not torch.equal(layer.weight.data.view(torch.uint8).flatten(),
                               weight.packed.view(torch.uint8).flatten()):
                raise SystemExit("bitsandbytes quantized the weight to different codes")
            for rows in rows_list:
                x = torch.randn(rows, in_features).to(dtype)
                with torch.inference_mode():
                    ours_fn = lambda: ops.nf4_linear(x, *weight_args)  # noqa: E731
                    bnb_fn = lambda: layer(x)  # noqa: E731
                    reference = bnb_fn()  # builds bnb's packed layout
                    result = ours_fn()
                    scale = reference.float().abs().max().item()
                    error = (result.float() - reference.float()).abs().max().item()
                    # fp32: summation order over up to 11008 products;
                    # bf16: one bf16 rounding of
                    # each output (2^-8 relative) plus bnb's bf16 arithmetic.
                    tolerance = (1e-3 if dtype == torch.float32 else 3e-2) * scale
                    if error > tolerance:
                        raise SystemExit(f"outputs differ: max |ours - bnb| = {error:.3g} > "
                                         f"{tolerance:.3g} ({out_features}x{in_features}, "
                                         f"{rows} rows, {dtype})")
                    ours_times, bnb_times = interleaved([ours_fn, bnb_fn], repeats,
                                                        args.min_seconds)
                ours_ms, ours_spread = summary(ours_times)
                bnb_ms, bnb_spread = summary(bnb_times)
                row = [f"{out_features}x{in_features}", rows, str(dtype)[6:],
                       f"{ours_ms * 1e3:.3f}", f"{ours_spread:.0f}%", f"{bnb_ms * 1e3:.3f}",
                       f"{bnb_spread:.0f}%", f"{bnb_ms / ours_ms:.2f}"]
                table.append(row)
                print(" ".join(str(c) for c in row), flush=True)
            del layer
    print()
    machine.print_table(headers, table)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

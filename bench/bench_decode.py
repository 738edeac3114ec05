"""Batch-1 decoding latency (one token, no_grad) against PEFT and bitsandbytes.

The same Llama-shaped bf16 model and adapters as ``bench_train_step.py``
(r=16 on all seven projections), in eval mode: one forward of one token
with batch 1, as a generation step runs it. At this size every projection
is a GEMV whose cost is a fraction of a millisecond, so per-call overhead
(Python, autograd bookkeeping) shows. Rounds are interleaved over the
setups; prints the median per setup, the ratio to the adapter-free dense
model, and ours / PEFT.

    python bench/bench_decode.py            # hidden 2048, 2 layers
    python bench/bench_decode.py --quick    # a small shape, for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_train_step import (ADAPTER_SETUPS, PROJECTIONS, build_model, model_shape,
                              print_comparison)
from machine import describe


def time_rounds(models: dict, rounds: int, calls: int) -> dict[str, float]:
    ids = torch.randint(0, 1000, (1, 1), generator=torch.Generator().manual_seed(1))
    samples: dict[str, list[float]] = {label: [] for label in models}
    with torch.no_grad():
        for label, model in models.items():  # warm-up
            model(input_ids=ids, use_cache=False)
        for _ in range(rounds):
            for label, model in models.items():
                start = time.perf_counter()
                for _ in range(calls):
                    model(input_ids=ids, use_cache=False)
                samples[label].append((time.perf_counter() - start) / calls)
    return {label: statistics.median(values) for label, values in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape, for a smoke run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="forwards per timed round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    shape = dict(model_shape(args.quick), length=1)
    vars(args).update(shape)
    if args.threads:
        torch.set_num_threads(args.threads)

    setups = [("dense, no adapters", build_model)] + ADAPTER_SETUPS
    models = {label: build(args).eval() for label, build in setups}
    results = time_rounds(models, args.rounds, args.calls)

    print(describe())
    print(f"shape: {shape}, bf16, batch 1, one token, r=16 on {len(PROJECTIONS)} projections; "
          f"median of {args.rounds} interleaved rounds of {args.calls} forwards")
    print_comparison(setups, results, "ms/token", "x dense", scale=1e3)


if __name__ == "__main__":
    main()

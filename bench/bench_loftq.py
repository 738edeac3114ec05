"""LoftQ initialisation: lowrank_ext vs PEFT's LoftQ, side by side in one run.

    python bench/bench_loftq.py [--shapes 2048x2048,5632x2048,2048x5632] [--iters 1,2,5] [--rank 16]

For each weight shape (out x in, Gaussian, std 0.02) and number of LoftQ
steps, prints the relative error ||W - (Q + s B A)||_F / ||W||_F of plain
QLoRA init (Q = NF4(W), zero adapter), of ours (exact SVD, and the
randomized "lowrank" SVD), and of PEFT's ``loftq_init`` (bits=4), and the
init times with the ratio PEFT / ours (higher is better for us).

Ours uses double quantization off here, as PEFT's LoftQ does (bitsandbytes
NF4, blocksize 64), and s = 1 (lora_alpha = r), the only scaling at which
PEFT's factors are right. The last column shows what PEFT's factors give in
a layer with s = 0.25 (e.g. r = 64, lora_alpha = 16, the LoftQ example's
causal-LM setting): PEFT does not divide its factors by the scaling. Ours at
any s equals ours at s = 1 (tests/test_loftq.py).

PEFT sends LoftQ to "cuda" unconditionally; this runs its code on the CPU
with that one device constant rebound (bitsandbytes quantizes on the CPU).
Each init runs once (they take seconds to minutes); run with
OMP_NUM_THREADS set to the cores you can spare.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

from lowrank_ext.loftq import loftq_init, reconstruction_error  # noqa: E402
from lowrank_ext.quant import NF4Weight  # noqa: E402

MISMATCHED_SCALING = 0.25


def peft_loftq_on_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from peft.utils import loftq_utils
    function = getattr(loftq_utils.loftq_init, "__wrapped__", loftq_utils.loftq_init)
    code = function.__code__
    if "cuda" in code.co_consts:
        code = code.replace(co_consts=tuple("cpu" if c == "cuda" else c
                                            for c in code.co_consts))
    function = types.FunctionType(code, function.__globals__, function.__name__,
                                  function.__defaults__, function.__closure__)
    return torch.no_grad()(function)


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        out_features, in_features = item.lower().split("x")
        shapes.append((int(out_features), int(in_features)))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2048x2048,5632x2048,2048x5632",
                        help="comma-separated OUTxIN weight shapes")
    parser.add_argument("--iters", default="1,2,5", help="comma-separated LoftQ step counts")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    iters = [int(value) for value in args.iters.split(",")]

    print(machine.describe())
    peft_loftq = peft_loftq_on_cpu()
    rows = []
    for out_features, in_features in parse_shapes(args.shapes):
        generator = torch.Generator().manual_seed(args.seed)
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        norm = torch.linalg.matrix_norm(weight.double()).item()
        plain = reconstruction_error(weight, NF4Weight.from_float(weight, 64, False)) / norm
        for num_iter in iters:
            ours, ours_s = timed(lambda: loftq_init(weight, args.rank, num_iter=num_iter,
                                                    double_quant=False))
            fast, fast_s = timed(lambda: loftq_init(weight, args.rank, num_iter=num_iter,
                                                    double_quant=False, svd="lowrank"))
            (peft_Q, peft_A, peft_B), peft_s = timed(
                lambda: peft_loftq(weight, num_bits=4, reduced_rank=args.rank,
                                   num_iter=num_iter))
            peft_base = weight.double() - peft_Q.double()
            peft_delta = peft_B.double() @ peft_A.double()
            peft_error = torch.linalg.matrix_norm(peft_base - peft_delta).item() / norm
            peft_mismatched = torch.linalg.matrix_norm(
                peft_base - MISMATCHED_SCALING * peft_delta).item() / norm
            rows.append([
                f"{out_features}x{in_features}", str(num_iter), f"{plain:.5f}",
                f"{reconstruction_error(weight, *ours) / norm:.5f}",
                f"{reconstruction_error(weight, *fast) / norm:.5f}",
                f"{peft_error:.5f}", f"{ours_s:.2f}", f"{fast_s:.2f}", f"{peft_s:.2f}",
                f"{peft_s / ours_s:.2f}x", f"{peft_s / fast_s:.1f}x", f"{peft_mismatched:.5f}",
            ])
            print("  " + " | ".join(rows[-1]), flush=True)  # kept if a later shape fails

    print(f"LoftQ, rank {args.rank}, NF4 blocksize 64 without double quantization, "
          f"Gaussian weights (std 0.02), relative Frobenius error, one run per init")
    machine.print_table(
        ["shape", "iters", "plain QLoRA err", "ours err", "ours lowrank err", "PEFT err",
         "ours s", "lowrank s", "PEFT s", "PEFT / ours", "PEFT / lowrank",
         f"PEFT err at s={MISMATCHED_SCALING}"], rows)


if __name__ == "__main__":
    main()

"""DoRA / QDoRA against LoRA / QLoRA (ours) and PEFT: training step, decode step, peak memory.

Issue 13's setup: a Llama-shaped model (transformers ``LlamaConfig``, random
weights) of one decoder layer, hidden 2048, MLP 5632, adapters r=16,
alpha=32 on all seven projections, a batch of 2 x 256 tokens, AdamW. One
run, side by side; the training steps of all setups are interleaved (step 1
of every setup, then step 2, ...) so a drift in the machine's load touches
them alike, and each setup's median is reported. Ratios printed:

* our DoRA step / our LoRA step (target <= 1.15)
* our QDoRA step / our QLoRA step (target <= 1.15)
* PEFT DoRA step / our DoRA step, PEFT + bitsandbytes QDoRA / our QDoRA
* peak memory QDoRA / QLoRA (target <= 1.05): anonymous memory (RssAnon,
  sampled every 2 ms) of a fresh subprocess per case, its peak over two
  training steps, less its level before the model was built (the torch
  runtime); building the model (a dense one, then quantized) is not counted
* eval decode step DoRA / LoRA, batch 1, one token (target <= 1.05)

``--dtype`` chooses the compute dtype (float32 by default: bfloat16 GEMMs are
slow on CPUs without AVX512-BF16); ``--dropout`` the adapters' dropout (0 by
default; with dropout DoRA needs the base product of the dropped-out input
too, PEFT's function, so its step costs one more base GEMM pass).

    python bench/bench_dora.py                       # the issue's shape, fp32
    python bench/bench_dora.py --quick               # a small shape, smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import PROJECTIONS, bitsandbytes_model, build_model  # noqa: E402
from machine import PeakSampler, describe, median_seconds, print_table, status_bytes  # noqa: E402



def adapter(args, dora: bool) -> dict:
    return dict(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules=PROJECTIONS,
                use_dora=dora)


def ours(args, dora: bool):
    import lowrank_ext

    return lowrank_ext.LoRAModule(build_model(args), **adapter(args, dora))


def ours_quantized(args, dora: bool):
    import lowrank_ext

    return lowrank_ext.QLoRAModule(build_model(args), lowrank_ext.QLoRAConfig(
        quantize_modules=None, double_quant=True, **adapter(args, dora)))


def peft_dense(args, dora: bool):
    import peft

    return peft.get_peft_model(build_model(args), peft.LoraConfig(**adapter(args, dora)))


def peft_bitsandbytes(args, dora: bool):
    import peft

    return peft.get_peft_model(bitsandbytes_model(args), peft.LoraConfig(**adapter(args, dora)))


SETUPS = {
    "ours LoRA": lambda args: ours(args, False),
    "ours DoRA": lambda args: ours(args, True),
    "PEFT DoRA": lambda args: peft_dense(args, True),
    "ours QLoRA": lambda args: ours_quantized(args, False),
    "ours QDoRA": lambda args: ours_quantized(args, True),
    "PEFT + bitsandbytes QDoRA": lambda args: peft_bitsandbytes(args, True),
}


def batch(args) -> torch.Tensor:
    return torch.randint(0, 1000, (args.batch, args.length),
                         generator=torch.Generator().manual_seed(1))


class Trainer:
    """One setup's model and optimizer; ``step()`` times one training step."""

    def __init__(self, model):
        self.model = model
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=1e-4)

    def step(self, ids) -> float:
        start = time.perf_counter()
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()}")
        return elapsed


def time_training(args, labels) -> dict[str, float]:
    ids = batch(args)
    trainers = {label: Trainer(SETUPS[label](args)) for label in labels}
    samples = {label: [] for label in labels}
    for step in range(args.warmup + args.steps):
        for label, trainer in trainers.items():
            elapsed = trainer.step(ids)
            if step >= args.warmup:
                samples[label].append(elapsed)
    return {label: statistics.median(values) for label, values in samples.items()}


def time_decode(args, labels) -> dict[str, float]:
    """Eval forward of one token, batch 1, no autograd (the layer work of a decode step)."""
    token = torch.randint(0, 1000, (1, 1), generator=torch.Generator().manual_seed(2))
    models = {label: SETUPS[label](args).eval() for label in labels}
    results = {label: [] for label in labels}
    with torch.inference_mode():
        for _ in range(args.decode_rounds):  # interleaved rounds, as the training steps
            for label, model in models.items():
                results[label].append(median_seconds(lambda: model(input_ids=token),
                                                     repeats=args.decode_repeats, warmup=3))
    return {label: statistics.median(values) for label, values in results.items()}


# ------------------------------------------------------------------ memory

def memory_case(args) -> dict:
    """In a fresh process: anonymous memory before the model, peak over two steps."""
    import transformers  # noqa: F401  (the runtime's own memory is in the baseline)

    import lowrank_ext  # noqa: F401

    gc.collect()
    baseline = status_bytes("RssAnon")
    trainer = Trainer(SETUPS[args.memory_case](args))
    ids = batch(args)
    gc.collect()
    ready = status_bytes("RssAnon")
    sampler = PeakSampler()  # the steps' peak (building the model, from a dense one, is not)
    for _ in range(2):
        trainer.step(ids)
    return dict(baseline=baseline, ready=ready, peak=sampler.read())


def measure_memory(args, label: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--memory-case", label,
               *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"memory case {label!r} exited with {done.returncode}:\n"
                           f"{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape, for a smoke run")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setup")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-rounds", type=int, default=3)
    parser.add_argument("--decode-repeats", type=int, default=15)
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT setups")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (dict(hidden=256, intermediate=704, layers=1, heads=4) if args.quick
             else dict(hidden=2048, intermediate=5632, layers=1, heads=16))
    vars(args).update(shape)
    if args.memory_case is not None:
        print(json.dumps(memory_case(args)))
        return

    labels = [label for label in SETUPS if not (args.no_peft and label.startswith("PEFT"))]
    train = time_training(args, labels)
    decode = time_decode(args, ["ours LoRA", "ours DoRA"])
    memory = {label: measure_memory(args, label) for label in ("ours QLoRA", "ours QDoRA")}

    print(describe())
    print(f"shape: {shape}, {args.dtype}, batch {args.batch}x{args.length}, r=16 alpha=32 "
          f"dropout={args.dropout} on {len(PROJECTIONS)} projections, AdamW; median of "
          f"{args.steps} interleaved steps after {args.warmup} warm-up")
    print_table(["setup", "train step s"], [[label, f"{train[label]:.3f}"] for label in labels])
    rows = [["our DoRA / our LoRA step", f"{train['ours DoRA'] / train['ours LoRA']:.3f}",
             "<= 1.15"],
            ["our QDoRA / our QLoRA step", f"{train['ours QDoRA'] / train['ours QLoRA']:.3f}",
             "<= 1.15"]]
    if not args.no_peft:
        rows += [["PEFT DoRA / our DoRA step", f"{train['PEFT DoRA'] / train['ours DoRA']:.2f}",
                  "~3"],
                 ["PEFT + bnb QDoRA / our QDoRA step",
                  f"{train['PEFT + bitsandbytes QDoRA'] / train['ours QDoRA']:.2f}", "~3"]]
    used = {label: value["peak"] - value["baseline"] for label, value in memory.items()}
    rows += [["peak memory QDoRA / QLoRA", f"{used['ours QDoRA'] / used['ours QLoRA']:.3f}",
              "<= 1.05"],
             ["eval decode DoRA / LoRA (batch 1)",
              f"{decode['ours DoRA'] / decode['ours LoRA']:.3f}", "<= 1.05"]]
    print_table(["ratio", "value", "target"], rows)
    print(f"peak anonymous memory over 2 steps above the runtime: QLoRA "
          f"{used['ours QLoRA'] / 2**20:.0f} MiB, QDoRA {used['ours QDoRA'] / 2**20:.0f} MiB; "
          f"decode step: LoRA {decode['ours LoRA'] * 1e3:.2f} ms, "
          f"DoRA {decode['ours DoRA'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()

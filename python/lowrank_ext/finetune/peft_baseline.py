"""The main job's task trained with PEFT + bitsandbytes QLoRA, for a speed comparison.

``lowrank-ext finetune`` (QLoRA, our kernels) is meant to train at least as
many samples per second as the usual stack does on the same task. This
module trains that stack on exactly the job's data, tokenization, batch
order, adapter (r, alpha, dropout, target layers, trained head), optimizer
(AdamW with the job's two parameter groups and weight decay), gradient
clipping and schedule: bitsandbytes ``Linear4bit`` (NF4, double
quantization, fp32 compute) under a PEFT ``LoraConfig``, in a plain loop
that measures nothing but time, the way a PEFT user would write it.

    python -m lowrank_ext.finetune.peft_baseline --pairs 3 --epochs 1 --max-train-samples 640

runs ``lowrank-ext finetune`` and this reference alternately, each in a
fresh process (A, B, A, B, ...: load on a shared machine hits both alike),
and prints both samples/s, their ratio per pair, and the median and range
of the ratios. ``--reference-only`` trains the reference once and prints
its report as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as functional

from . import methods
from .model import HEAD_NAME, Tokenized, build_classifier, load_tokenizer
from .train import (DEFAULT_LEARNING_RATES, HEAD_LEARNING_RATE, FinetuneSettings,
                    _linear_schedule, epoch_batches, evaluate, load_splits)


def peft_bnb_qlora(num_labels: int, seed: int, rank: int = 8, alpha: float = 16.0,
                   dropout: float = 0.0,
                   target_modules=methods.DEFAULT_TARGET_MODULES) -> torch.nn.Module:
    """The job's classifier, its adapted Linears stored by bitsandbytes, wrapped by PEFT."""
    import bitsandbytes as bnb
    import peft

    model = build_classifier(num_labels, seed=seed)
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if child not in target_modules or not isinstance(module, torch.nn.Linear):
            continue
        quantized = bnb.nn.Linear4bit(module.in_features, module.out_features,
                                      bias=module.bias is not None, compute_dtype=torch.float32,
                                      compress_statistics=True, quant_type="nf4")
        quantized.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False,
                                             quant_type="nf4",
                                             compress_statistics=True)._quantize("cpu")
        if module.bias is not None:
            quantized.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        setattr(model.get_submodule(parent), child, quantized)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=list(target_modules), modules_to_save=[HEAD_NAME])
    return peft.get_peft_model(model, config)


_JOB = FinetuneSettings()  # the job's defaults, which the reference trains by default too


def train_reference(epochs: int = _JOB.epochs, batch_size: int = _JOB.batch_size,
                    max_length: int = _JOB.max_length, max_train_samples=None,
                    seed: int = _JOB.seed, threads=None,
                    group_by_length: bool = _JOB.group_by_length) -> dict:
    """Train the PEFT + bitsandbytes reference on the job's task; its headline numbers."""
    if threads:
        torch.set_num_threads(threads)
    wall_start = time.perf_counter()
    splits = load_splits(None)
    train_set = splits.train.sample(max_train_samples, seed)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer()
    train = Tokenized(tokenizer, train_set.texts, train_set.labels, max_length)
    test = Tokenized(tokenizer, splits.test.texts, splits.test.labels, max_length)
    module = peft_bnb_qlora(len(splits.label_names), seed)
    head, encoder = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (head if f"{HEAD_NAME}." in name else encoder).append(parameter)
    parameters = head + encoder
    optimizer = torch.optim.AdamW([{"params": encoder, "lr": DEFAULT_LEARNING_RATES["qlora"]},
                                   {"params": head, "lr": HEAD_LEARNING_RATE}],
                                  weight_decay=0.01)
    total_steps = max(1, math.ceil(len(train_set) / batch_size) * epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(total_steps))
    order_generator = torch.Generator().manual_seed(seed)
    module.train()
    samples, train_seconds = 0, 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        for indices in epoch_batches(train.lengths(), batch_size, order_generator,
                                     group_by_length):
            batch = train.batch(indices)
            logits = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            loss = functional.cross_entropy(logits.float(), batch.labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            samples += len(indices)
        train_seconds += time.perf_counter() - start
    result = evaluate(module, test, 2 * batch_size, "cpu")
    return {"method": "peft+bitsandbytes qlora", "steps": total_steps,
            "train_seconds": train_seconds,
            "train_samples_per_second": samples / max(train_seconds, 1e-9),
            "test_accuracy": result.accuracy, "wall_seconds": time.perf_counter() - wall_start,
            "torch_threads": torch.get_num_threads()}


def _run_json(command: list[str]) -> str:
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    return completed.stdout


def compare(pairs: int, shared: list[str]) -> str:
    """``pairs`` runs of the job and of the reference, alternately; a printable table."""
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for pair in range(pairs):
            output = Path(scratch) / f"job-{pair}"
            _run_json([sys.executable, "-m", "lowrank_ext.cli", "finetune", "--no-progress",
                       "--output-dir", str(output), *shared])
            ours = json.loads((output / "report.json").read_text(encoding="utf-8"))
            reference = json.loads(_run_json([sys.executable, "-m", __spec__.name,
                                              "--reference-only", *shared]))
            ratio = ours["train_samples_per_second"] / reference["train_samples_per_second"]
            ratios.append(ratio)
            rows.append(f"{pair + 1:>4}  {ours['train_samples_per_second']:>12.2f}  "
                        f"{reference['train_samples_per_second']:>14.2f}  {ratio:>6.3f}  "
                        f"{100 * ours['after']['test']['accuracy']:.1f}% / "
                        f"{100 * reference['test_accuracy']:.1f}%  "
                        f"{ours['wall_seconds']:.0f} s / {reference['wall_seconds']:.0f} s")
            print(rows[-1], flush=True)
    header = ("pair  job samples/s  PEFT+bnb samples/s  ratio  test acc (job / PEFT+bnb)  "
              "wall (job / PEFT+bnb)")
    summary = (f"ratio job / PEFT+bnb: median {statistics.median(ratios):.3f}, "
               f"range {min(ratios):.3f}-{max(ratios):.3f} over {pairs} pairs")
    return "\n".join([header, *rows, summary])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=_JOB.epochs)
    parser.add_argument("--batch-size", type=int, default=_JOB.batch_size)
    parser.add_argument("--max-length", type=int, default=_JOB.max_length)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=_JOB.seed)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                        default=_JOB.group_by_length)
    parser.add_argument("--reference-only", action="store_true")
    arguments = parser.parse_args(argv)
    if arguments.reference_only:
        print(json.dumps(train_reference(arguments.epochs, arguments.batch_size,
                                         arguments.max_length, arguments.max_train_samples,
                                         arguments.seed, arguments.threads,
                                         arguments.group_by_length)))
        return 0
    shared = ["--epochs", str(arguments.epochs), "--batch-size", str(arguments.batch_size),
              "--max-length", str(arguments.max_length), "--seed", str(arguments.seed)]
    shared.append("--group-by-length" if arguments.group_by_length else "--no-group-by-length")
    for flag, value in (("--max-train-samples", arguments.max_train_samples),
                        ("--threads", arguments.threads)):
        if value is not None:
            shared += [flag, str(value)]
    print(compare(arguments.pairs, shared))
    return 0


if __name__ == "__main__":
    sys.exit(main())

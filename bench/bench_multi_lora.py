"""Mixed-adapter LoRA batches: lowrank_ext vs PEFT, side by side in one run.

    python bench/bench_multi_lora.py [--size 4096] [--rows 64] [--rank 16] [--repeats 7]
                                     [--threads N]

One size x size linear layer and a batch of `rows` rows spread evenly (in
shuffled order) over 8 and over 32 LoRA adapters of rank `rank`, in fp32 and
bf16. Prints median times of the base op alone (F.linear), of our whole
mixed-batch forward (F.linear + multi_lora_linear), of the adapter term alone,
each as a ratio to the base op; then model calls: the base model (the same
one-layer model without adapters), our model wrapper (a LoRAModule holding the
same adapters, called with adapter_names=[...]) and PEFT's (a PEFT LoRA model
called the same way), the last two as ratios to the base model.
Target (issue 5): ours <= 1.1x the base op. A model call adds module calls,
the per-row names and the check of the cached factor stack, all paid with
cold caches right after the GEMM. LOWRANK_CPU_ISA=avx2 measures the AVX2
kernels (what laptops run). On a machine whose cores are busy with other work, multi-threaded timings of every column swing by whole
milliseconds (a thread waits for a descheduled partner); --threads 1 gives
stable ratios there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

from lowrank_ext import ops  # noqa: E402


def linear_model(weight: torch.Tensor) -> torch.nn.Module:
    """A one-layer model whose weight *is* `weight` (same memory as the base-op
    column, so every column runs the very same GEMM)."""
    size = weight.shape[0]
    base = torch.nn.Sequential(torch.nn.Linear(size, size, bias=False, device="meta"))
    base[0].weight = torch.nn.Parameter(weight, requires_grad=False)
    return base


def peft_model(weight: torch.Tensor, num_adapters: int, rank: int):
    """A PEFT LoRA model over one linear layer with `num_adapters` random adapters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import peft
    base = linear_model(weight)
    names = [f"adapter{index}" for index in range(num_adapters)]
    config = lambda: peft.LoraConfig(  # noqa: E731
        r=rank, lora_alpha=2 * rank, target_modules=["0"], init_lora_weights=False)
    model = peft.get_peft_model(base, config(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config())
    model.to(weight.dtype).eval()
    return model, names


def our_model(weight: torch.Tensor, layer, names: list[str], rank: int):
    """Our LoRAModule over the same linear layer, holding PEFT layer's adapters."""
    import lowrank_ext
    base = linear_model(weight)
    options = dict(r=rank, lora_alpha=2 * rank, target_modules=["0"])
    model = lowrank_ext.LoRAModule(base, adapter_name=names[0], **options)
    for name in names[1:]:
        model.add_adapter(name, **options)
    ours = model.model[0]
    with torch.no_grad():
        for name in names:
            ours.lora_A[name].weight.copy_(layer.lora_A[name].weight)
            ours.lora_B[name].weight.copy_(layer.lora_B[name].weight)
    return model.eval()


def interleaved_medians(functions: dict, repeats: int) -> dict:
    """Median seconds of each callable, timed round-robin so that load drifting
    during the run (other processes on the machine) hits every column alike."""
    samples = {name: [] for name in functions}
    for round_index in range(repeats + 2):  # two warm-up rounds
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if round_index >= 2:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the layer is size x size")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for every column (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(machine.describe())
    print(f"{args.rows} rows, {args.size}x{args.size} layer, rank {args.rank}; "
          "times are medians in ms, (x) = ratio to the base op / to the base model")
    header = (f"{'dtype':6} {'adapters':>8} | {'base F.linear':>13} | {'ours (whole)':>18} | "
              f"{'adapter term':>18} | {'base model':>10} | {'ours, model':>18} | "
              f"{'PEFT model':>18}")
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        weight = (torch.randn(args.size, args.size, generator=generator) / args.size ** 0.5).to(dtype)
        x = torch.randn(args.rows, args.size, generator=generator).to(dtype)
        for num_adapters in (8, 32):
            model, names = peft_model(weight, num_adapters, args.rank)
            layer = model.base_model.model[0]
            lora_A, lora_B, ranks = ops.stack_lora_factors(
                [layer.lora_A[name].weight.detach() for name in names],
                [layer.lora_B[name].weight.detach() for name in names])
            scalings = torch.tensor([layer.scaling[name] for name in names], dtype=torch.float32)
            indices = torch.arange(args.rows) % num_adapters
            indices = indices[torch.randperm(args.rows, generator=generator)]
            adapter_names = [names[index] for index in indices.tolist()]

            def ours():
                return ops.multi_lora_linear(x, F.linear(x, weight), lora_A, lora_B, ranks,
                                             scalings, indices)

            base_output = F.linear(x, weight)
            wrapper = our_model(weight, layer, names, args.rank)
            base_model = linear_model(weight).eval()
            with torch.no_grad():
                expected = model(x, adapter_names=adapter_names)
                tolerance = 1e-4 if dtype == torch.float32 else 3e-2
                torch.testing.assert_close(ours(), expected, rtol=tolerance, atol=tolerance)
                torch.testing.assert_close(wrapper(x, adapter_names=adapter_names), expected,
                                           rtol=tolerance, atol=tolerance)
                times = interleaved_medians({
                    "base": lambda: F.linear(x, weight),
                    "ours": ours,
                    "term": lambda: ops.multi_lora_linear(
                        x, base_output, lora_A, lora_B, ranks, scalings, indices),
                    "base model": lambda: base_model(x),
                    "model": lambda: wrapper(x, adapter_names=adapter_names),
                    "peft": lambda: model(x, adapter_names=adapter_names),
                }, args.repeats)
            def cell(name, reference="base"):
                return f"{times[name] * 1e3:8.2f} ({times[name] / times[reference]:5.2f}x)"

            print(f"{str(dtype).removeprefix('torch.'):6} {num_adapters:8d} | "
                  f"{times['base'] * 1e3:10.2f} ms | {cell('ours'):>18} | {cell('term'):>18} | "
                  f"{times['base model'] * 1e3:7.2f} ms | {cell('model', 'base model'):>18} | "
                  f"{cell('peft', 'base model'):>18}")
            del model, wrapper, base_model


if __name__ == "__main__":
    main()

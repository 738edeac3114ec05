"""Side-by-side CPU benchmark: lowrank_ext's NF4 / LoRA / QLoRA linear ops
against dense torch, bitsandbytes and PEFT, measured in the same run.

Prints the machine, then one table row per workload with the median wall
time of each implementation and the ratio of ours to each anchor (below 1.0
means ours is faster). Default arguments finish in one to two minutes on two
cores.

    python bench/bench_linear.py [--repeats 5] [--threads N] [--clock wall|cpu]

On a machine shared with other work, OpenMP threads spinning at barriers take
time from the threads doing the work, which penalizes ops with several
parallel regions (the panel GEMM path) far more than one dense GEMM; run with
OMP_WAIT_POLICY=passive, or with --threads 1 --clock cpu, to compare the work
itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import lowrank_ext
from lowrank_ext import NF4Weight, ops

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
except ImportError:  # the anchors are optional; their columns then read "-"
    bnb = None
try:
    import peft
except ImportError:
    peft = None


# Wall-clock by default. --clock cpu reads the process's CPU time instead: with
# --threads 1 that is the work done, unaffected by other processes taking the
# core, which makes ratios reproducible on a shared machine.
CLOCK = time.perf_counter


def median_ms(work, repeats):
    work()  # warm-up: allocations, primitive caches, lazy repacking
    times = []
    for _ in range(repeats):
        start = CLOCK()
        work()
        times.append(CLOCK() - start)
    return statistics.median(times) * 1e3


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


class Table:
    def __init__(self):
        self.rows = []

    def add(self, workload, ours, anchors):
        """anchors: list of (name, milliseconds or None)."""
        self.rows.append((workload, ours, anchors))
        cells = [f"{name} {ms:8.2f} ms (x{ours / ms:5.2f})" if ms else f"{name} -"
                 for name, ms in anchors]
        print(f"{workload:<44} ours {ours:8.2f} ms | " + " | ".join(cells), flush=True)


def bnb_quantized(dense):
    return bnb_functional.quantize_4bit(dense, blocksize=64, quant_type="nf4",
                                        compress_statistics=True)


def bench_nf4_linear(table, repeats):
    for rows, size, dtype in [(1, 8192, torch.bfloat16), (1, 8192, torch.float32),
                              (512, 4096, torch.float32), (512, 4096, torch.bfloat16)]:
        dense = random(size, size, scale=0.02)
        weight = NF4Weight.from_float(dense, blocksize=64, double_quant=True)
        x = random(rows, size, dtype=dtype)
        dense_typed = dense.to(dtype)
        with torch.no_grad():
            ours = median_ms(lambda: ops.nf4_linear(x, *weight.linear_args()), repeats)
            torch_ms = median_ms(lambda: F.linear(x, dense_typed), repeats)
            bnb_ms = eval_ms = None
            if bnb is not None:
                packed, state = bnb_quantized(dense)
                bnb_ms = median_ms(lambda: bnb.matmul_4bit(x, packed.t(), state), repeats)
                # An eval-mode Linear4bit on the CPU repacks its weight on the
                # first forward into an inference layout with its own kernel:
                # the path bitsandbytes users run for generation.
                layer = bnb_eval_layer(dense, dtype)
                eval_ms = median_ms(lambda: layer(x), repeats)
        name = f"nf4_linear {rows} row{'s' if rows > 1 else ''} {size}x{size} {str(dtype)[6:]}"
        table.add(name, ours, [("torch dense", torch_ms), ("bnb matmul_4bit", bnb_ms),
                               ("bnb Linear4bit eval", eval_ms)])


def bnb_eval_layer(dense, dtype):
    layer = bnb.nn.Linear4bit(dense.shape[1], dense.shape[0], bias=False, compute_dtype=dtype,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)._quantize("cpu")
    return layer.eval()


def bench_grad_input(table, repeats):
    for dtype in (torch.float32, torch.bfloat16):
        dense = random(4096, 4096, scale=0.02)
        weight = NF4Weight.from_float(dense, blocksize=64, double_quant=True)
        grad_output = random(512, 4096, dtype=dtype)
        dense_typed = dense.to(dtype)
        ours = median_ms(lambda: ops.nf4_linear_grad_input(grad_output, *weight.linear_args()),
                         repeats)
        torch_ms = median_ms(lambda: grad_output @ dense_typed, repeats)
        table.add(f"nf4_linear_grad_input 512 rows 4096^2 {str(dtype)[6:]}", ours,
                  [("torch dense", torch_ms)])


def peft_lora(base, rank):
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"], lora_dropout=0.0)
    model = peft.get_peft_model(torch.nn.Sequential(base), config)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; time a trained adapter
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def bench_lora_forward(table, repeats, rank=16):
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.nn.Linear(4096, 4096, bias=True).to(dtype)
        x = random(512, 4096, dtype=dtype)
        lora_A = random(rank, 4096, dtype=dtype, scale=0.02)
        lora_B = random(4096, rank, dtype=dtype, scale=0.02)
        with torch.no_grad():
            ours = median_ms(lambda: ops.lora_linear(x, base.weight, base.bias, lora_A, lora_B,
                                                     1.0), repeats)
            base_ms = median_ms(lambda: F.linear(x, base.weight, base.bias), repeats)
            peft_ms = None
            if peft is not None:
                model = peft_lora(base, rank)
                peft_ms = median_ms(lambda: model(x), repeats)
        table.add(f"lora_linear fwd r={rank} 512 rows 4096^2 {str(dtype)[6:]}", ours,
                  [("base F.linear", base_ms), ("PEFT LoRA", peft_ms)])


def bench_qlora_training_step(table, repeats, rank=16):
    dtype = torch.bfloat16
    dense = random(4096, 4096, scale=0.02)
    weight = NF4Weight.from_float(dense, blocksize=64, double_quant=True)
    lora_A = random(rank, 4096, dtype=dtype, scale=0.02).requires_grad_()
    lora_B = random(4096, rank, dtype=dtype, scale=0.02).requires_grad_()
    x = random(512, 4096, dtype=dtype).requires_grad_()
    grad_output = random(512, 4096, dtype=dtype)

    def ours_step():
        ops.qlora_linear(x, *weight.linear_args(), None, lora_A, lora_B, 1.0).backward(grad_output)

    ours = median_ms(ours_step, repeats)
    peft_ms = None
    if bnb is not None and peft is not None:
        layer = bnb.nn.Linear4bit(4096, 4096, bias=False, compute_dtype=dtype,
                                  compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
        layer = layer.to("cpu")
        model = peft_lora(layer, rank)
        model.train()  # bnb repacks weights for inference after eval(); keep training layout

        def peft_step():
            model(x).backward(grad_output)

        peft_ms = median_ms(peft_step, repeats)
    table.add(f"qlora fwd+bwd r={rank} 512 rows 4096^2 bf16", ours,
              [("PEFT+bnb Linear4bit", peft_ms)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or process CPU time (use with --threads 1)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads "
          f"{torch.get_num_threads()}, load average at start {load[0]:.2f}" if load else "")
    print(f"torch {torch.__version__}, lowrank_ext {lowrank_ext.__version__} "
          f"(CPU kernels: {lowrank_ext.get_cpu_isa()}), bitsandbytes "
          f"{getattr(bnb, '__version__', 'absent')}, peft {getattr(peft, '__version__', 'absent')}")
    print(f"median {args.clock} time of {args.repeats} runs; (xR) = ours / anchor, "
          "below 1 is faster\n")
    table = Table()
    bench_nf4_linear(table, args.repeats)
    bench_grad_input(table, args.repeats)
    bench_lora_forward(table, args.repeats)
    bench_qlora_training_step(table, args.repeats)
    if load:
        print(f"\nload average at end {os.getloadavg()[0]:.2f} (other work on the machine "
              "inflates and scatters every column alike)")


if __name__ == "__main__":
    main()

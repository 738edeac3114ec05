"""Side-by-side CUDA benchmark of lowrank_ext's NF4 kernels against cuBLAS.

Prints one table (device, date, versions) with each measurement, the anchor
measured in the same run, the ratio and the target:

* dequantize bandwidth vs a device-to-device copy (target >= 80%),
* GEMV, 1 row, 8192x8192 bf16 vs cuBLAS ``x @ W.T`` (target >= 3x faster),
* GEMM, 4096 rows, 8192x8192 bf16 vs cuBLAS (target <= 1.25x the time),
  for the default path and the fused tensor-core kernel,
* QLoRA layer forward+backward vs dequantize + cuBLAS + separate LoRA
  matmuls (target >= 1.5x faster), at 16 and 4096 rows.
* a mixed-adapter batch (multi_lora_linear): 64 rows over 8 and over 32
  rank-16 adapters on a 4096x4096 bf16 layer, F.linear + multi_lora_linear vs
  F.linear alone (target <= 1.1x the time).

The table goes to stdout, to bench/results/ and to $OUT when that is set.
Times are medians of CUDA-event-timed runs after warm-up.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import statistics

import torch
import torch.nn.functional as F

import lowrank_ext
from lowrank_ext import NF4Weight, ops

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def cuda_median_ms(function, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `function()` timed with CUDA events."""
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


class DequantizeThenLinear(torch.autograd.Function):
    """The baseline's base layer: dequantize (8-bit scales, then NF4, separate
    launches), cuBLAS, and the same again in backward (the weight is frozen)."""

    @staticmethod
    def forward(ctx, input, weight: NF4Weight):
        ctx.weight = weight
        return F.linear(input, weight.dequantize(input.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output @ ctx.weight.dequantize(grad_output.dtype), None


def baseline_qlora(input, weight, lora_A, lora_B, scaling):
    base = DequantizeThenLinear.apply(input, weight)
    return base + scaling * F.linear(F.linear(input, lora_A), lora_B)


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    size = 8192
    dtype = torch.bfloat16
    rows_gemm = 4096
    rank, scaling = 16, 2.0
    lines = []
    rows_table = []

    def add(name, ours_ms, anchor_name, anchor_ms, ratio_text, target):
        rows_table.append((name, f"{ours_ms:.4f}", anchor_name, f"{anchor_ms:.4f}", ratio_text,
                           target))

    dense_fp32 = torch.randn(size, size, device=device) * 0.02
    weight = NF4Weight.from_float(dense_fp32, 64, double_quant=True)
    dense = weight.dequantize(dtype)
    absmax = weight.block_absmax()
    del dense_fp32

    # Dequantize bandwidth vs a plain device copy of the same output size.
    source = torch.empty(size * size, dtype=dtype, device=device)
    target = torch.empty_like(source)
    copy_ms = cuda_median_ms(lambda: target.copy_(source))
    copy_bandwidth = 2 * source.numel() * source.element_size() / (copy_ms * 1e-3)
    dequantize_ms = cuda_median_ms(
        lambda: ops.nf4_dequantize(weight.packed, absmax, (size, size), 64, dtype))
    dequantize_bytes = (weight.packed.numel() + absmax.numel() * 4 + size * size * 2)
    dequantize_bandwidth = dequantize_bytes / (dequantize_ms * 1e-3)
    add("dequantize 8192x8192 -> bf16 (GB/s: ours / copy)", dequantize_ms, "device copy",
        copy_ms, f"{dequantize_bandwidth / 1e9:.0f} / {copy_bandwidth / 1e9:.0f} GB/s = "
        f"{dequantize_bandwidth / copy_bandwidth:.0%}", ">= 80%")
    del source, target

    # GEMV, one row.
    x1 = torch.randn(1, size, device=device, dtype=dtype)
    args = weight.linear_args()
    gemv_ms = cuda_median_ms(lambda: ops.nf4_linear(x1, *args), repeats=50)
    cublas_gemv_ms = cuda_median_ms(lambda: x1 @ dense.T, repeats=50)
    add("nf4_linear 1 row (GEMV)", gemv_ms, "cuBLAS x @ W.T bf16", cublas_gemv_ms,
        f"{cublas_gemv_ms / gemv_ms:.2f}x faster", ">= 3x faster")

    # GEMM, 4096 rows: default path, then the fused kernel forced.
    x = torch.randn(rows_gemm, size, device=device, dtype=dtype)
    cublas_gemm_ms = cuda_median_ms(lambda: x @ dense.T, repeats=10)
    for path in ("auto", "fused"):
        os.environ["LOWRANK_CUDA_GEMM"] = path
        gemm_ms = cuda_median_ms(lambda: ops.nf4_linear(x, *args), repeats=10)
        add(f"nf4_linear {rows_gemm} rows ({path})", gemm_ms, "cuBLAS bf16", cublas_gemm_ms,
            f"{gemm_ms / cublas_gemm_ms:.2f}x the time", "<= 1.25x")
    os.environ.pop("LOWRANK_CUDA_GEMM", None)

    # QLoRA layer forward + backward.
    for rows in (16, rows_gemm):
        input = torch.randn(rows, size, device=device, dtype=dtype, requires_grad=True)
        lora_A = (torch.randn(rank, size, device=device, dtype=dtype) * 0.01).requires_grad_()
        lora_B = (torch.randn(size, rank, device=device, dtype=dtype) * 0.01).requires_grad_()
        grad = torch.randn(rows, size, device=device, dtype=dtype)

        def ours():
            ops.qlora_linear(input, *args, None, lora_A, lora_B, scaling).backward(grad)

        def baseline():
            baseline_qlora(input, weight, lora_A, lora_B, scaling).backward(grad)

        ours_ms = cuda_median_ms(ours, repeats=10)
        baseline_ms = cuda_median_ms(baseline, repeats=10)
        add(f"qlora_linear fwd+bwd {rows} rows, r={rank}", ours_ms,
            "dequant + cuBLAS + LoRA matmuls", baseline_ms,
            f"{baseline_ms / ours_ms:.2f}x faster", ">= 1.5x faster")

    # Mixed-adapter batch: the adapter term on top of the base layer, timed in
    # inference mode (the serving case) for both columns alike.
    with torch.inference_mode():
        mixed_size, mixed_rows = 4096, 64
        mixed_weight = torch.randn(mixed_size, mixed_size, device=device, dtype=dtype) * 0.02
        mixed_input = torch.randn(mixed_rows, mixed_size, device=device, dtype=dtype)
        base_ms = cuda_median_ms(lambda: F.linear(mixed_input, mixed_weight), repeats=50)
        for num_adapters in (8, 32):
            mixed_A = torch.randn(num_adapters, rank, mixed_size, device=device, dtype=dtype) * 0.01
            mixed_B = torch.randn(num_adapters, mixed_size, rank, device=device, dtype=dtype) * 0.01
            mixed_ranks = torch.full((num_adapters,), rank, device=device, dtype=torch.int64)
            mixed_scalings = torch.full((num_adapters,), scaling, device=device)
            # Rows spread evenly over the adapters, in shuffled order.
            indices = torch.arange(mixed_rows, device=device) % num_adapters
            indices = indices[torch.randperm(mixed_rows, device=device)]
            mixed_ms = cuda_median_ms(
                lambda: ops.multi_lora_linear(
                    mixed_input, F.linear(mixed_input, mixed_weight), mixed_A, mixed_B, mixed_ranks,
                    mixed_scalings, indices),
                repeats=50)
            add(f"mixed batch {mixed_rows} rows, {num_adapters} adapters r={rank}, "
                f"{mixed_size}x{mixed_size}", mixed_ms, "F.linear alone", base_ms,
                f"{mixed_ms / base_ms:.2f}x the time", "<= 1.1x")

    properties = torch.cuda.get_device_properties(device)
    lines.append(f"# lowrank_ext CUDA benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    lines.append("")
    lines.append(f"device: {properties.name} (sm_{properties.major}{properties.minor}, "
                 f"{properties.total_memory / 2**30:.0f} GiB) | torch {torch.__version__} | "
                 f"lowrank_ext {lowrank_ext.build_info()['version']} "
                 f"archs {lowrank_ext.build_info()['cuda_archs']}")
    lines.append("weight 8192x8192 NF4 (blocksize 64, double-quantized), bf16 activations; "
                 "times are CUDA-event medians in ms")
    lines.append("")
    header = ("work", "ours ms", "anchor", "anchor ms", "ratio", "target")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows_table:
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    print(text)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"cuda-{stamp}.md").write_text(text)
    if os.environ.get("OUT"):
        out_dir = pathlib.Path(os.environ["OUT"])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"bench-cuda-{stamp}.md").write_text(text)


if __name__ == "__main__":
    main()

"""Side-by-side CUDA benchmark of lowrank_ext's NF4 kernels against cuBLAS.

Prints one table (device, date, versions) with each measurement, the anchor
measured in the same run, the ratio and the target:

* dequantize bandwidth vs a device-to-device copy (target >= 80%),
* GEMV, 1 row, 8192x8192 bf16 vs cuBLAS ``x @ W.T`` (target >= 3x faster),
* GEMM, 4096 rows, 8192x8192 bf16 vs cuBLAS (target <= 1.25x the time),
  for the default path and the fused tensor-core kernel,
* the fused tensor-core GEMM vs dequantize + cuBLAS at 32, 64, 128 and 256
  rows on 4096- and 8192-wide layers (dense cuBLAS alongside), with the
  LOWRANK_CUDA_FUSED_MAX_ROWS these figures suggest (the default 256 is
  unmeasured until such a run),
* QLoRA layer forward+backward vs dequantize + cuBLAS + separate LoRA
  matmuls (target >= 1.5x faster), at 16 and 4096 rows.
* a mixed-adapter batch (multi_lora_linear): 64 rows over 8 and over 32
  rank-16 adapters on a 4096x4096 bf16 layer, F.linear + multi_lora_linear vs
  F.linear alone (target <= 1.1x the time).

The table goes to stdout, to bench/results/ and to $OUT when that is set.

Timing: a single call between two CUDA events measures the host's launch
latency as much as the kernel when the kernel takes microseconds (the 1-row
GEMV, the mixed batch). Small ops are therefore captured `calls` times into a
CUDA graph whose replay is timed (device time only, as a serving loop that
replays graphs sees it); large ones (dequantize, 4096-row GEMMs, forward +
backward) are timed as `calls` back-to-back eager calls between two events,
which the host enqueues ahead of the device. Each figure is the median over
several such samples of the time per call.
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
# Row counts between the GEMV (<= 16) and the default fused limit (256).
SWEEP_ROWS = (32, 64, 128, 256)


def cuda_median_ms(function, calls: int = 10, samples: int = 7, warmup: int = 3) -> float:
    """Milliseconds per call of `calls` back-to-back `function()` calls between
    two CUDA events, median over `samples`."""
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()

    def back_to_back():
        for _ in range(calls):
            function()

    return _event_median_ms(back_to_back, calls, samples)


def _event_median_ms(run, calls: int, samples: int) -> float:
    """Milliseconds per call of `run()` (which makes `calls` calls) between two
    CUDA events, median over `samples` runs."""
    times = []
    for _ in range(samples):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def graph_median_ms(function, calls: int = 50, samples: int = 7) -> float:
    """Milliseconds per call of `function()` captured `calls` times into one
    CUDA graph and replayed between two CUDA events, median over `samples`.
    The op's path (LOWRANK_CUDA_GEMM etc.) is the one in effect at capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture, on a side stream
        for _ in range(3):
            function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            function()
    graph.replay()
    torch.cuda.synchronize()
    milliseconds = _event_median_ms(graph.replay, calls, samples)
    del graph
    return milliseconds


def with_gemm_path(path: str, function):
    """`function()` with LOWRANK_CUDA_GEMM set to `path`, restored afterwards."""
    previous = os.environ.get("LOWRANK_CUDA_GEMM")
    os.environ["LOWRANK_CUDA_GEMM"] = path
    try:
        return function()
    finally:
        if previous is None:
            os.environ.pop("LOWRANK_CUDA_GEMM", None)
        else:
            os.environ["LOWRANK_CUDA_GEMM"] = previous


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
    notes = []

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
    gemv_ms = graph_median_ms(lambda: ops.nf4_linear(x1, *args))
    cublas_gemv_ms = graph_median_ms(lambda: x1 @ dense.T)
    add("nf4_linear 1 row (GEMV)", gemv_ms, "cuBLAS x @ W.T bf16", cublas_gemv_ms,
        f"{cublas_gemv_ms / gemv_ms:.2f}x faster", ">= 3x faster")

    # GEMM, 4096 rows: default path, then the fused kernel forced.
    x = torch.randn(rows_gemm, size, device=device, dtype=dtype)
    cublas_gemm_ms = cuda_median_ms(lambda: x @ dense.T)
    for path in ("auto", "fused"):
        gemm_ms = with_gemm_path(path, lambda: cuda_median_ms(lambda: ops.nf4_linear(x, *args)))
        add(f"nf4_linear {rows_gemm} rows ({path})", gemm_ms, "cuBLAS bf16", cublas_gemm_ms,
            f"{gemm_ms / cublas_gemm_ms:.2f}x the time", "<= 1.25x")
    del x

    # 17-256 rows: the fused kernel against dequantize + cuBLAS, per width, to
    # set LOWRANK_CUDA_FUSED_MAX_ROWS (the largest row count where fused wins).
    fused_wins = {}
    for width in (4096, size):
        sweep_weight = weight if width == size else NF4Weight.from_float(
            torch.randn(width, width, device=device) * 0.02, 64, double_quant=True)
        sweep_args = sweep_weight.linear_args()
        sweep_dense = sweep_weight.dequantize(dtype)
        for rows in SWEEP_ROWS:
            xs = torch.randn(rows, width, device=device, dtype=dtype)
            timed = {path: with_gemm_path(path, lambda: graph_median_ms(
                lambda: ops.nf4_linear(xs, *sweep_args), calls=20)) for path in ("fused", "dequantize")}
            dense_ms = graph_median_ms(lambda: xs @ sweep_dense.T, calls=20)
            fused_wins[(width, rows)] = timed["fused"] < timed["dequantize"]
            add(f"nf4_linear {rows} rows, {width}x{width}, fused WMMA", timed["fused"],
                "dequantize + cuBLAS", timed["dequantize"],
                f"{timed['fused'] / timed['dequantize']:.2f}x the time "
                f"({timed['fused'] / dense_ms:.2f}x dense cuBLAS {dense_ms:.4f} ms)",
                "< 1x: fused wins")
        del sweep_dense
    suggested = max([rows for rows in SWEEP_ROWS
                     if all(fused_wins[(width, rows)] for width in (4096, size))], default=16)
    notes.append(f"suggested LOWRANK_CUDA_FUSED_MAX_ROWS={suggested} (largest swept row count "
                 f"where the fused kernel beat dequantize + cuBLAS at both widths; 16 = never)")

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

        ours_ms = cuda_median_ms(ours)
        baseline_ms = cuda_median_ms(baseline)
        add(f"qlora_linear fwd+bwd {rows} rows, r={rank}", ours_ms,
            "dequant + cuBLAS + LoRA matmuls", baseline_ms,
            f"{baseline_ms / ours_ms:.2f}x faster", ">= 1.5x faster")

    # Mixed-adapter batch: the adapter term on top of the base layer, timed in
    # inference mode (the serving case) for both columns alike.
    with torch.inference_mode():
        mixed_size, mixed_rows = 4096, 64
        mixed_weight = torch.randn(mixed_size, mixed_size, device=device, dtype=dtype) * 0.02
        mixed_input = torch.randn(mixed_rows, mixed_size, device=device, dtype=dtype)
        base_ms = graph_median_ms(lambda: F.linear(mixed_input, mixed_weight))
        for num_adapters in (8, 32):
            mixed_A = torch.randn(num_adapters, rank, mixed_size, device=device, dtype=dtype) * 0.01
            mixed_B = torch.randn(num_adapters, mixed_size, rank, device=device, dtype=dtype) * 0.01
            mixed_ranks = torch.full((num_adapters,), rank, device=device, dtype=torch.int64)
            mixed_scalings = torch.full((num_adapters,), scaling, device=device)
            # Rows spread evenly over the adapters, in shuffled order.
            indices = torch.arange(mixed_rows, device=device) % num_adapters
            indices = indices[torch.randperm(mixed_rows, device=device)]
            mixed_ms = graph_median_ms(
                lambda: ops.multi_lora_linear(
                    mixed_input, F.linear(mixed_input, mixed_weight), mixed_A, mixed_B, mixed_ranks,
                    mixed_scalings, indices))
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
    lines.append("weight 8192x8192 NF4 (blocksize 64, double-quantized) unless stated, bf16 "
                 "activations; ms per call, medians of CUDA-event-timed batches of calls "
                 "(CUDA-graph replays for the GEMV, the row sweep and the mixed batch)")
    lines.append("")
    header = ("work", "ours ms", "anchor", "anchor ms", "ratio", "target")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows_table:
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.extend(notes)
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

"""Per-rank memory of a QLoRA step under FSDP2 on CPU, 1 and 2 ranks (gloo).

The checkpoint is the TinyLlama-shaped one bench/make_tinyllama_checkpoint.py
writes (random bf16 weights); ``--layers`` loads only its first N decoder
layers (the loading on a shared 2-core machine is what limits this), so the
table also gives per-layer figures. Two implementations:

- ours: ``from_pretrained(quantization_config=lowrank_ext.NF4Config(...))``,
  ``QLoRAModule`` (r=16 on the seven projections), then
  ``lowrank_ext.distributed.fully_shard_model`` (one FSDP group per decoder
  layer, one for the input embedding, one for the output head, the root
  holds the final norm);
- torchao: a bf16 load whose projections become torchao ``NF4Tensor``
  parameters (``to_nf4``, double-quantized scales, the FSDP2 extension hooks
  torchtune uses) with the same LoRA factors, computed by ``linear_nf4``,
  sharded the same way. Only when torchao can be imported.

With one rank neither is sharded: that row is the plain single-process
QLoRA step (FSDP2 with one rank would only add copies; torchao 0.18's
NF4Tensor also fails there, in ``fsdp_post_all_gather``).

Each rank reports: the 4-bit bytes it holds between steps (exact, from the
tensors; torchao's NF4Tensor inner tensors likewise); anonymous memory
(RssAnon) once sharded; and the peak RssAnon during two AdamW steps on
1 x ``--tokens`` tokens per rank, computed in ``--dtype`` (default float32,
the unquantized embeddings, norms and output head too: torch's CPU bfloat16
matmul takes a slow path for the backward's ``grad @ W`` on CPUs without
AVX512-BF16, 27 s for one 16x32000x2048 product on an AVX2 EPYC against
0.5 s in float32) (sampled every 2 ms on a thread; file-backed
pages, e.g. the mmapped checkpoint, are not in it). Linux only.

    python bench/make_tinyllama_checkpoint.py CKPT    # once, 2.2 GB
    python bench/bench_fsdp_memory.py CKPT [--layers 4] [--impls ours,torchao]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import PeakSampler, describe, status_bytes  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
MIB = 2**20


# ------------------------------------------------------------------ builders


def _world() -> int:
    import torch.distributed as distributed

    return distributed.get_world_size()


def build_ours(path: str, layers: int, dtype: torch.dtype) -> nn.Module:
    import transformers

    import lowrank_ext
    from lowrank_ext.distributed import fully_shard_model

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, num_hidden_layers=layers,
        quantization_config=lowrank_ext.NF4Config(compute_dtype=dtype))
    wrapper = lowrank_ext.QLoRAModule(model, r=RANK, lora_alpha=ALPHA,
                                      target_modules=PROJECTIONS)
    wrapper.to(dtype)  # embeddings, norms, head; 4-bit codes and scales stay as they are
    return fully_shard_model(wrapper) if _world() > 1 else wrapper


class TorchaoQLoRALinear(nn.Module):
    """A frozen torchao NF4Tensor weight plus fp32 LoRA factors (B = 0 at start)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        self.weight = nn.Parameter(to_nf4(linear.weight.detach()), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(RANK, linear.in_features))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, RANK))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)

    def forward(self, x):
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        base = linear_nf4(input=x, weight=self.weight)
        down = x.to(self.lora_A.dtype) @ self.lora_A.T
        return base + ((down @ self.lora_B.T) * (ALPHA / RANK)).to(base.dtype)


def build_torchao(path: str, layers: int, dtype: torch.dtype) -> nn.Module:
    import transformers

    from lowrank_ext.distributed import fully_shard_model

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, num_hidden_layers=layers)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in PROJECTIONS:
                    setattr(parent, name, TorchaoQLoRALinear(child))
    for module in model.modules():  # model.to(dtype) would dequantize the NF4Tensors
        for name, parameter in module.named_parameters(recurse=False):
            if type(parameter.data).__name__ != "NF4Tensor" and parameter.dtype != dtype:
                module.register_parameter(name, nn.Parameter(
                    parameter.detach().to(dtype), requires_grad=parameter.requires_grad))
    gc.collect()
    # The same FSDP groups as ours (decoder layers, embedding, head, root).
    return fully_shard_model(model) if _world() > 1 else model


BUILDERS = {"ours": build_ours, "torchao": build_torchao}


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(this rank's bytes of 4-bit codes and scales, the whole's)."""
    from lowrank_ext.distributed import nf4_resident_bytes

    resident, whole = nf4_resident_bytes(model)
    for module in model.modules():
        if isinstance(module, TorchaoQLoRALinear):
            weight = module.weight
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            inner = [getattr(local, name) for name in local.__tensor_flatten__()[0]]
            resident += sum(t.untyped_storage().nbytes() for t in inner)
            whole += sum(t.numel() * t.element_size() for t in inner) * (
                weight.numel() // max(local.numel(), 1))
    return resident, whole


def child(arguments) -> None:
    import torch.distributed as distributed

    distributed.init_process_group("gloo")
    rank, world = distributed.get_rank(), distributed.get_world_size()
    torch.set_num_threads(1)
    sampler = PeakSampler()
    start = time.perf_counter()
    model = BUILDERS[arguments.impl](arguments.checkpoint, arguments.layers,
                                     getattr(torch, arguments.dtype))
    gc.collect()
    ready_seconds = time.perf_counter() - start
    resident, whole = quantized_bytes(model)
    anon_ready = status_bytes("RssAnon")
    distributed.barrier()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, 32000, (1, arguments.tokens),
                           generator=torch.Generator().manual_seed(rank))
    sampler.reset()
    steps = []
    for _ in range(2):
        begin = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - begin)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()}")
    result = dict(impl=arguments.impl, world=world, rank=rank, layers=arguments.layers,
                  nf4_resident=resident, nf4_whole=whole, anon_ready=anon_ready,
                  anon_step_peak=sampler.read(), vm_hwm=status_bytes("VmHWM"),
                  ready_s=ready_seconds, step_s=steps)
    print("RESULT " + json.dumps(result), flush=True)
    distributed.barrier()
    distributed.destroy_process_group()


def torchrun() -> list[str]:
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if os.path.exists(launcher):
        return [launcher]
    return [shutil.which("torchrun") or sys.executable, *(
        [] if shutil.which("torchrun") else ["-m", "torch.distributed.run"])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="directory from make_tinyllama_checkpoint.py")
    parser.add_argument("--layers", type=int, default=22, help="decoder layers to load")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per rank per step")
    parser.add_argument("--impls", default="ours,torchao")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype and dtype of the unquantized weights (default "
                             "float32: torch's CPU bfloat16 matmul takes a slow path on "
                             "CPUs without AVX512-BF16 for the backward's grad @ W)")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--impl", help=argparse.SUPPRESS)  # set in the torchrun children
    arguments = parser.parse_args()
    if arguments.impl:
        child(arguments)
        return

    rows = []
    for impl in arguments.impls.split(","):
        if impl == "torchao":
            try:
                import torchao  # noqa: F401
            except ImportError:
                print("torchao is not importable here: its rows are left out", file=sys.stderr)
                continue
        for world in (int(w) for w in arguments.worlds.split(",")):
            command = torchrun() + ["--standalone", "--nproc_per_node", str(world),
                                    os.path.abspath(__file__), arguments.checkpoint,
                                    "--layers", str(arguments.layers), "--tokens",
                                    str(arguments.tokens), "--dtype", arguments.dtype,
                                    "--impl", impl]
            environment = dict(os.environ, OMP_NUM_THREADS="1")
            completed = subprocess.run(command, capture_output=True, text=True, env=environment)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode or len(lines) != world:
                sys.exit(f"{impl} x{world} failed (exit status {completed.returncode}):\n"
                         f"{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
            for line in lines:
                rows.append(json.loads(line[len("RESULT "):]))
            print(f"{impl} x{world}: done", file=sys.stderr, flush=True)


    print(describe())
    print(f"TinyLlama shape, first {arguments.layers} decoder layers; LoRA r={RANK} on 7 "
          f"projections; {arguments.dtype} compute, embeddings, norms and head; 2 AdamW steps "
          f"of 1x{arguments.tokens} tokens per rank; MiB")
    print("| impl | ranks | rank | 4-bit held | 4-bit whole | held / whole | anon sharded | "
          "peak anon in steps | step 2 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['impl']} | {row['world']} | {row['rank']} | {row['nf4_resident'] / MIB:.1f} "
              f"| {row['nf4_whole'] / MIB:.1f} | {row['nf4_resident'] / row['nf4_whole']:.3f} | "
              f"{row['anon_ready'] / MIB:.0f} | {row['anon_step_peak'] / MIB:.0f} | "
              f"{row['step_s'][1]:.1f} |")
    print("RAW " + json.dumps(rows))


if __name__ == "__main__":
    main()

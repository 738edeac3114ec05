"""One LoRA / QLoRA training step (forward + backward + AdamW) against PEFT and bitsandbytes.

A Llama-shaped model (transformers ``LlamaConfig``, random weights, bf16)
with adapters r=16, alpha=32, dropout 0.05 on all seven linear projections.
Prints the median step time of each setup and the ratios ours / PEFT
(targets: <= 0.75 for LoRA and for QLoRA), plus the machine it ran on. The
"PEFT + lowrank_ext kernels" rows are PEFT's own ``get_peft_model`` with
``lowrank_ext.use_fused_kernels(config)``, against our wrappers (target <= 1.05).

    python bench/bench_train_step.py            # hidden 2048, 2 layers, batch 4x256
    python bench/bench_train_step.py --quick    # a small shape for a smoke run
    python bench/bench_train_step.py --dtype float32   # on CPUs without AVX512-BF16

``--dtype`` is the model's dtype and the 4-bit layers' compute dtype, for every
setup alike. Without AVX512-BF16, ATen's bf16 GEMMs (PEFT's dense layers, the
LM head, every setup's attention projections in LoRA) have no native
instructions and run several times slower than fp32's, so the bf16 default
there measures mostly that.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=PROJECTIONS)


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=1000,
                         max_position_embeddings=max(512, args.length))
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(model_dtype(args)).train()


def model_dtype(args) -> torch.dtype:
    """The dtype every setup runs in (bench_decode.py's arguments have none: bf16)."""
    return getattr(torch, getattr(args, "dtype", "bfloat16"))


def floor_setup(args):
    model = build_model(args)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    # Something must train for backward to run: the final norm (a few KB).
    model.model.norm.weight.requires_grad_(True)
    return model


def peft_lora(args):
    import peft

    return peft.get_peft_model(build_model(args), peft.LoraConfig(**ADAPTER))


def ours_lora(args):
    import lowrank_ext

    return lowrank_ext.LoRAModule(build_model(args), **ADAPTER)


def bitsandbytes_model(args):
    """The model with every projection a bitsandbytes NF4 ``Linear4bit`` (double
    quantization, computing in the model's dtype)."""
    import bitsandbytes as bnb

    model = build_model(args)
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if child not in PROJECTIONS:
            continue
        quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                                      compute_dtype=model_dtype(args), compress_statistics=True,
                                      quant_type="nf4")
        quantized.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False,
                                             quant_type="nf4",
                                             compress_statistics=True)._quantize("cpu")
        setattr(model.get_submodule(parent), child, quantized)
    return model


def peft_qlora(args):
    import peft

    return peft.get_peft_model(bitsandbytes_model(args), peft.LoraConfig(**ADAPTER))


def ours_qlora(args):
    import lowrank_ext

    return lowrank_ext.QLoRAModule(build_model(args), lowrank_ext.QLoRAConfig(
        quantize_modules=None, double_quant=True, **ADAPTER))


def peft_fused_lora(args):
    import lowrank_ext
    import peft

    return peft.get_peft_model(build_model(args),
                               lowrank_ext.use_fused_kernels(peft.LoraConfig(**ADAPTER)))


def peft_fused_qlora(args):
    import lowrank_ext
    import peft

    # The projections stored as lowrank_ext's NF4Linear, as ours_qlora stores them
    # (blocksize 64, double quantization, compute dtype of the input).
    model = build_model(args)
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if child in PROJECTIONS:
            setattr(model.get_submodule(parent), child,
                    lowrank_ext.nn.NF4Linear.from_linear(module, 64, double_quant=True))
    return peft.get_peft_model(model, lowrank_ext.use_fused_kernels(peft.LoraConfig(**ADAPTER)))


# PEFT as the front end to our kernels, each against our own wrapper.
FRONT_END_SETUPS = [("PEFT + lowrank_ext kernels LoRA", peft_fused_lora, "lowrank_ext LoRA"),
                    ("PEFT + lowrank_ext kernels QLoRA", peft_fused_qlora, "lowrank_ext QLoRA")]

# The adapter setups both this benchmark and bench_decode.py compare, each
# after its own reference setup.
ADAPTER_SETUPS = [("PEFT LoRA", peft_lora), ("lowrank_ext LoRA", ours_lora),
                  ("PEFT + bitsandbytes QLoRA", peft_qlora), ("lowrank_ext QLoRA", ours_qlora)]


def model_shape(quick: bool) -> dict:
    """The Llama model's sizes: the benchmark's, or a small one for a smoke run."""
    if quick:
        return dict(hidden=256, intermediate=704, layers=2, heads=4)
    return dict(hidden=2048, intermediate=5632, layers=2, heads=16)


def print_comparison(setups, results: dict, column: str, reference: str, scale: float = 1.0,
                     target: str = "") -> None:
    """One row per setup: its time times ``scale`` (headed ``column``) and its ratio to
    the first setup (headed ``reference``); then ours / PEFT for LoRA and QLoRA."""
    width = max(len(label) for label, _ in setups) + 2
    first = results[setups[0][0]]
    print(f"{'setup':{width}s} {column:>9s} {reference:>8s}")
    for label, _ in setups:
        print(f"{label:{width}s} {results[label] * scale:9.3f} {results[label] / first:8.2f}")
    lora = results["lowrank_ext LoRA"] / results["PEFT LoRA"]
    qlora = results["lowrank_ext QLoRA"] / results["PEFT + bitsandbytes QLoRA"]
    print(f"ours/PEFT LoRA  = {lora:.3f}{target}")
    print(f"ours/PEFT QLoRA = {qlora:.3f}{target}")


def time_step(model, args) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (args.batch, args.length), generator=generator)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape, for a smoke run")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setup")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    shape = dict(model_shape(args.quick), **(dict(batch=2, length=64) if args.quick
                                             else dict(batch=4, length=256)))
    vars(args).update(shape)
    if args.threads:
        torch.set_num_threads(args.threads)

    # Each front-end row runs right after the wrapper it is compared with,
    # so that a drift in the machine's load affects both alike.
    setups = [("frozen base, no adapters (floor)", floor_setup)]
    for label, build in ADAPTER_SETUPS:
        setups.append((label, build))
        setups += [(front, setup) for front, setup, wrapper in FRONT_END_SETUPS
                   if wrapper == label]
    results = {}
    for label, build in setups:
        model = build(args)
        results[label] = time_step(model, args)
        del model

    import lowrank_ext

    info = lowrank_ext.build_info()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"lowrank_ext CPU ISA {info['cpu_isa']}")
    print(f"shape: {shape}, {args.dtype}, r=16 alpha=32 dropout=0.05 on {len(PROJECTIONS)} projections, "
          f"AdamW; median of {args.steps} steps after {args.warmup} warm-up")
    print_comparison(setups, results, "step s", "x floor", target=" (target <= 0.75)")
    for label, _, wrapper in FRONT_END_SETUPS:
        print(f"{label} / {wrapper} = {results[label] / results[wrapper]:.3f} "
              "(target <= 1.05)")


if __name__ == "__main__":
    main()

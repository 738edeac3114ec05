"""Load a TinyLlama-shaped checkpoint in 4 bits and take two QLoRA steps: time and memory.

Three ways to a trainable 4-bit model from the same bf16 safetensors shards
(bench/make_tinyllama_checkpoint.py writes them):

- ours: ``from_pretrained(quantization_config=lowrank_ext.NF4Config())``
  (quantized layer by layer while loading), then ``QLoRAModule``;
- anchor: ``from_pretrained(quantization_config=BitsAndBytesConfig(nf4,
  double quant, compute in --dtype))``, then PEFT ``get_peft_model``;
- old route: dense ``from_pretrained``, then ``QLoRAModule`` quantizes.

Adapters r=16, alpha=32, dropout 0.05 on all seven projections; two AdamW
steps on a batch of 1x64 tokens. ``--dtype`` (default bfloat16) is the dtype
the model loads in and the 4-bit layers compute in, for every case alike;
float32 suits CPUs without AVX512-BF16, where ATen's bf16 GEMMs (the
unquantized LM head's among them) run without native instructions (one
step of this model took minutes there). Each case runs in a fresh subprocess, cases
interleaved, ``--repeats`` times; the table gives the range over repeats.
Memory is anonymous memory (RssAnon, sampled every 5 ms from
/proc/self/status: the mmapped checkpoint pages are file-backed and not in
it): its peak while loading, its level once the wrapped model is ready, and
its peak over the two steps. VmHWM (peak resident, file pages included) is
printed too. Linux only.

    python bench/make_tinyllama_checkpoint.py CKPT   # once, 2.2 GB
    python bench/bench_hf_load.py CKPT [--repeats 2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import PeakSampler, describe, print_table, status_bytes  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=PROJECTIONS)
GIB = 2**30


def load_ours(path, dtype):
    import transformers

    import lowrank_ext

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=lowrank_ext.NF4Config(compute_dtype=dtype))
    return model, lambda: lowrank_ext.QLoRAModule(model, **ADAPTER)


def load_bitsandbytes(path, dtype):
    import peft
    import transformers

    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=config)
    return model, lambda: peft.get_peft_model(model, peft.LoraConfig(**ADAPTER))


def load_bf16(path, dtype):
    import transformers

    import lowrank_ext

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, lambda: lowrank_ext.QLoRAModule(model, **ADAPTER)


CASES = {
    "ours": ("lowrank_ext NF4Config load + QLoRAModule", load_ours),
    "bnb": ("transformers + bitsandbytes 4-bit + PEFT LoRA", load_bitsandbytes),
    "bf16": ("dense load + QLoRAModule (old route)", load_bf16),
}


def run_case(path: str, case: str, dtype: torch.dtype) -> dict:
    """One case in this process: load, wrap, two steps; the measurements."""
    import bitsandbytes  # noqa: F401  (imports are not part of the load time)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lowrank_ext  # noqa: F401

    lowrank_ext.NF4Config  # noqa: B018  (imports transformers' quantizer side too)
    sampler = PeakSampler()
    sampler.reset()
    start = time.perf_counter()
    model, wrap = CASES[case][1](path, dtype)
    loaded = time.perf_counter()
    wrapped = wrap()
    ready = time.perf_counter()
    gc.collect()
    result = dict(load_s=loaded - start, wrap_s=ready - loaded, load_peak=sampler.read(),
                  after_load=status_bytes("RssAnon"))

    sampler.reset()
    wrapped.train()
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad],
                                  lr=1e-4)
    ids = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(1))
    steps = []
    for _ in range(2):
        begin = time.perf_counter()
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - begin)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{case}: loss is {loss.item()}")
    result.update(steps_peak=sampler.read(), step_s=steps, vm_hwm=status_bytes("VmHWM"))
    return result


def spread(values, scale=1.0, digits=2) -> str:
    low, high = min(values) * scale, max(values) * scale
    return f"{low:.{digits}f}" if round(low, digits) == round(high, digits) \
        else f"{low:.{digits}f}-{high:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="directory from make_tinyllama_checkpoint.py")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="load and compute dtype of every case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child process's one case
    args = parser.parse_args()
    if args.case:
        result = run_case(args.checkpoint, args.case, getattr(torch, args.dtype))
        print("RESULT " + json.dumps(result), flush=True)
        return

    cases = args.cases.split(",")
    results: dict[str, list[dict]] = {case: [] for case in cases}
    for repeat in range(args.repeats):
        for case in cases:  # interleaved, so a load spike on the machine hits all cases
            child = subprocess.run([sys.executable, os.path.abspath(__file__), args.checkpoint,
                                    "--dtype", args.dtype, "--case", case],
                               capture_output=True, text=True)
            lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if child.returncode or not lines:
                sys.exit(f"{case} failed (exit status {child.returncode}):\n"
                         f"{child.stdout[-2000:]}\n{child.stderr[-3000:]}")
            results[case].append(json.loads(lines[-1][len("RESULT "):]))
            print(f"repeat {repeat + 1}/{args.repeats} {case}: done", file=sys.stderr, flush=True)

    print(describe())
    with open(os.path.join(args.checkpoint, "config.json"), encoding="utf-8") as config_file:
        config = json.load(config_file)
    shape = ", ".join(f"{key} {config[key]}" for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "vocab_size"))
    print(f"checkpoint: {shape}; loaded and computed in {args.dtype}; adapters r=16 on 7 "
          f"projections; steps: 1x64 tokens, AdamW; ranges over {args.repeats} runs")
    headers = ["setup", "load s", "wrap s", "load+wrap s", "peak anon load GiB",
               "anon ready GiB", "peak anon 2 steps GiB", "step 1 s", "step 2 s", "VmHWM GiB"]
    rows = []
    for case in cases:
        runs = results[case]
        rows.append([CASES[case][0], spread([r["load_s"] for r in runs], digits=1),
                     spread([r["wrap_s"] for r in runs], digits=1),
                     spread([r["load_s"] + r["wrap_s"] for r in runs], digits=1),
                     spread([r["load_peak"] for r in runs], 1 / GIB),
                     spread([r["after_load"] for r in runs], 1 / GIB),
                     spread([r["steps_peak"] for r in runs], 1 / GIB),
                     spread([r["step_s"][0] for r in runs], digits=1),
                     spread([r["step_s"][1] for r in runs], digits=1),
                     spread([r["vm_hwm"] for r in runs], 1 / GIB)])
    print_table(headers, rows)
    if "ours" in results and "bnb" in results:
        mean = lambda case, key: sum(  # noqa: E731
            key(r) for r in results[case]) / len(results[case])
        for label, key in [("load+wrap", lambda r: r["load_s"] + r["wrap_s"]),
                           ("anon ready", lambda r: r["after_load"]),
                           ("peak anon 2 steps", lambda r: r["steps_peak"]),
                           ("step 2", lambda r: r["step_s"][1])]:
            print(f"ours / bitsandbytes {label}: {mean('ours', key) / mean('bnb', key):.2f}")


if __name__ == "__main__":
    main()

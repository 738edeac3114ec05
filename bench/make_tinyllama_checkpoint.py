"""Write a TinyLlama-shaped Llama checkpoint with random bf16 weights, for bench_hf_load.py.

hidden 2048, MLP 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000 (1.1B
parameters, 2.2 GB): config.json plus safetensors shards and their index, as
``save_pretrained`` writes them. Weights are N(0, 0.02) (norms 1), drawn one
tensor at a time from a fixed seed, so the model never sits in memory whole.

    python bench/make_tinyllama_checkpoint.py DIR [--shard-gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import save_file

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
             max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)


def tinyllama_config():
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPE, dtype="bfloat16")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="size of one shard")
    args = parser.parse_args()

    from transformers import LlamaForCausalLM

    config = tinyllama_config()
    with torch.device("meta"):  # names and shapes only
        shapes = {name: tensor.shape for name, tensor in
                  LlamaForCausalLM(config).state_dict().items()}
    os.makedirs(args.directory, exist_ok=True)
    config.save_pretrained(args.directory)

    # Shards planned from the shapes first (the file names count them), then
    # written one at a time.
    shard_bytes = int(args.shard_gb * 2**30)
    plan: list[list[str]] = [[]]
    size = total = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * 2  # bf16
        if size and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
        total += nbytes

    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, names in enumerate(plan, 1):
        shard = {}
        for name in names:
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                shard[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(
                    torch.bfloat16)
        filename = f"model-{index:05d}-of-{len(plan):05d}.safetensors"
        save_file(shard, os.path.join(args.directory, filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in names})
        del shard
    with open(os.path.join(args.directory, "model.safetensors.index.json"), "w",
              encoding="utf-8") as index_file:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, index_file,
                  indent=2)
    print(f"{total / 2 / 1e9:.2f}B parameters, {total / 2**30:.2f} GiB in {len(plan)} shards "
          f"-> {args.directory}")


if __name__ == "__main__":
    main()

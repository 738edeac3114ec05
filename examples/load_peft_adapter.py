"""Train and save a LoRA adapter with Hugging Face PEFT, load it with lowrank_ext.

1. Build the ``lowrank-ext finetune`` classifier (all-MiniLM-L6-v2 + linear
   head), wrap it with ``peft.get_peft_model`` and train a few steps on the
   stdlib-docstring task; ``save_pretrained`` writes the adapter.
2. Load that directory into a fresh copy of the base model with
   ``lowrank_ext.load_adapter`` -- no PEFT code involved.
3. Compare logits of the two models, then merge the adapter into the base
   weights with ``.merge()`` and compare again.

Needs ``peft`` and the ``finetune`` extra. Run
``python examples/load_peft_adapter.py`` (``--quick`` for a smoke test).
"""

import argparse
import tempfile
import time

import torch
import torch.nn.functional as functional

import lowrank_ext
from lowrank_ext.finetune.data import stdlib_docstring_splits
from lowrank_ext.finetune.model import Tokenized, build_classifier, load_tokenizer

TARGETS = ["query", "value"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps (a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    steps = 3 if arguments.quick else 30
    import peft

    start = time.perf_counter()
    splits = stdlib_docstring_splits()
    tokenizer = load_tokenizer()
    train_set = Tokenized(tokenizer, splits.train.texts, splits.train.labels, max_length=48)
    probe = Tokenized(tokenizer, splits.test.texts[:32], splits.test.labels[:32], max_length=48)
    probe_batch = probe.batch(range(len(probe)))
    num_labels = len(splits.label_names)

    torch.manual_seed(arguments.seed)
    peft_model = peft.get_peft_model(
        build_classifier(num_labels, seed=arguments.seed),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                        modules_to_save=["classifier"]))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(arguments.seed)
    peft_model.train()
    for _ in range(steps):
        batch = train_set.batch(torch.randint(0, len(train_set), (16,), generator=generator))
        loss = functional.cross_entropy(
            peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask), batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peft_model.eval()

    with tempfile.TemporaryDirectory() as directory, torch.no_grad():
        peft_model.save_pretrained(directory)
        expected = peft_model(input_ids=probe_batch.input_ids,
                              attention_mask=probe_batch.attention_mask)

        loaded = lowrank_ext.load_adapter(build_classifier(num_labels, seed=arguments.seed),
                                          directory)
        loaded.eval()
        actual = loaded(input_ids=probe_batch.input_ids, attention_mask=probe_batch.attention_mask)
        loaded.merge()
        merged = loaded(input_ids=probe_batch.input_ids, attention_mask=probe_batch.attention_mask)

    scale = expected.abs().max().item()
    loaded_difference = (actual - expected).abs().max().item()
    merged_difference = (merged - expected).abs().max().item()
    agreement = (actual.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"PEFT LoRA r=8 on {TARGETS} + classifier, trained {steps} steps and saved")
    print(f"loaded with lowrank_ext.load_adapter: max |logit difference| {loaded_difference:.2e} "
          f"(logits up to {scale:.2f}), predictions agree on {agreement:.0%} of {len(probe)}")
    print(f"after .merge(): max |logit difference| {merged_difference:.2e}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return {"loaded_difference": loaded_difference, "merged_difference": merged_difference,
            "logit_scale": scale, "prediction_agreement": agreement}


if __name__ == "__main__":
    main()

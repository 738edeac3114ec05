"""FSDP2 QLoRA check: sharded 4-bit bases train like one process.

Run under torchrun (gloo on CPU, NCCL on GPUs)::

    torchrun --nproc_per_node 2 -m lowrank_ext.finetune.fsdp_check

Every rank builds the same tiny random Llama from the same seed, wraps it in
a :class:`~lowrank_ext.QLoRAModule` and shards it with
:func:`lowrank_ext.distributed.fully_shard_model` (one FSDP group per decoder
layer, the 4-bit codes and scales sharded with the rest), then trains a few
AdamW steps in which each rank sees an equal share of every global batch.
FSDP2 averages the gradients over ranks in its reduce-scatter, which equals
the gradient of the mean loss over the global batch, so rank 0 compares with
one process training on the whole global batches. Per scenario it checks

* ``resident_fraction``: the 4-bit bytes this rank holds between steps over
  the whole (about 1/world plus FSDP's padding);
* losses (the mean over ranks) and the gathered adapter against the single
  process, within ``--tolerance`` (absolute, default 1e-5: only the order of
  fp32 sums differs, ranks sum half batches and FSDP adds the two halves'
  gradients; AdamW's step is lr * m / sqrt(v), insensitive to such
  relative differences, and 1e-5 is 1000 times below the lr);
* the frozen 4-bit base, gathered, equal bit for bit to the single
  process's, in bitsandbytes' keys;
* the adapter saved from rank 0 in PEFT's format equal to the gathered one;
* a ``torch.distributed.checkpoint`` save of the sharded state, loaded into a
  differently initialized sharded model: every tensor equal, and equal
  outputs.

Scenarios (``--scenarios``, comma-separated): ``qlora`` (double-quantized
NF4 on every projection), ``mixed`` (fp32 scales, no double quantization;
dense LoRA on o_proj next to 4-bit layers; gradient checkpointing) and
``compile`` (the first sharded decoder layer under ``torch.compile``,
``--compile-backend``; no checkpoint round trip).

It writes ``fsdp_check.json`` to ``--output-dir`` and exits with status 1
when a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as distributed
from torch import nn

from .ddp_check import start_process_group

VOCABULARY = 128
SEQUENCE = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCENARIOS = ("qlora", "mixed", "compile")


def build(scenario: str, seed: int, device: torch.device) -> nn.Module:
    """A tiny random Llama as a QLoRAModule, identical for a given seed."""
    import transformers

    from lowrank_ext import QLoRAConfig, QLoRAModule

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=VOCABULARY, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).to(device)
    mixed = scenario == "mixed"
    # QLoRAModule quantizes every layer it adapts; in "mixed" o_proj stays
    # dense and gets lowrank_ext's dense LoRALinear, in the same FSDP groups.
    targets = tuple(name for name in TARGETS if not (mixed and name == "o_proj"))
    adapter = QLoRAConfig(r=4, lora_alpha=8, target_modules=list(targets),
                          quantize_modules=list(targets), double_quant=not mixed)
    wrapper = QLoRAModule(model, adapter)
    if mixed:
        from lowrank_ext.nn import LoRALinear

        for layer in model.model.layers:
            layer.self_attn.o_proj = LoRALinear(layer.self_attn.o_proj, r=4, alpha=8)
    # Non-zero B factors, so that every adapter tensor gets a gradient from step 1.
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, parameter in wrapper.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    if mixed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return wrapper


def global_batches(steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, VOCABULARY, (batch_size, SEQUENCE), generator=generator)
            for _ in range(steps)]


def train(model: nn.Module, batches, rank: int, world_size: int, device,
          learning_rate: float) -> list[float]:
    """AdamW over ``batches``, this process taking rows ``rank::world_size``;
    returns the loss per step averaged over the ranks."""
    model.train()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
    losses = []
    for tokens in batches:
        tokens = tokens[rank::world_size].to(device)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world_size > 1:
            distributed.all_reduce(mean)
            mean /= world_size
        losses.append(mean.item())
    return losses


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, gathered whole (a collective for a sharded model)."""
    from lowrank_ext.nn.nf4_linear import _is_dtensor

    state = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            value = parameter.full_tensor() if _is_dtensor(parameter) else parameter
            state[name] = value.detach().cpu().clone()
    return state


def _max_difference(first: dict, second: dict) -> float:
    if sorted(first) != sorted(second):
        raise AssertionError(f"different keys: {sorted(set(first) ^ set(second))[:5]}")
    return max((first[key].double() - second[key].double()).abs().max().item() for key in first)


def _all_equal(first: dict, second: dict) -> bool:
    return sorted(first) == sorted(second) and all(
        first[key].dtype == second[key].dtype and torch.equal(first[key], second[key])
        for key in first)


def _same_base_tensor(key: str, first: torch.Tensor, second: torch.Tensor) -> bool:
    """Equal tensors; quant states (JSON, padded with spaces when sharded) equal as JSON."""
    if key.endswith(".quant_state.bitsandbytes__nf4"):
        decode = lambda tensor: json.loads(bytes(tensor.tolist()).decode("utf-8"))  # noqa: E731
        return decode(first) == decode(second)
    return first.dtype == second.dtype and torch.equal(first, second)


def _normalized_key(key: str) -> str:
    # Checkpoint wrappers and compiled modules add their own names to paths.
    for part in ("_checkpoint_wrapped_module.", "_orig_mod."):
        key = key.replace(part, "")
    return key


def compile_layers(model: nn.Module, scenario: str, arguments) -> None:
    """In scenario "compile", ``torch.compile`` the first sharded decoder layer's
    forward (FSDP's unshard/reshard hooks run around it, outside the graph)."""
    from lowrank_ext.distributed import decoder_layers

    if scenario == "compile":
        layer = decoder_layers(model)[0]
        layer.forward = torch.compile(layer.forward, backend=arguments.compile_backend)


def check_checkpoint(model: nn.Module, scenario: str, arguments, device, output: Path,
                     full: dict, probe: torch.Tensor) -> dict:
    """Save the sharded state with torch.distributed.checkpoint, load it into a
    model built from another seed (its base and adapters all differ) and
    sharded the same way; compare gathered states and outputs."""
    import torch.distributed.checkpoint as dcp

    from lowrank_ext.distributed import full_state_dict, fully_shard_model

    checkpoint = output / f"{scenario}_dcp"
    dcp.save(model.state_dict(), checkpoint_id=str(checkpoint))
    other = build(scenario, arguments.seed + 100, device)
    fully_shard_model(other)
    differed_before = not _all_equal(full_state_dict(other), full)
    loaded_state = other.state_dict()
    dcp.load(loaded_state, checkpoint_id=str(checkpoint))
    incompatible = other.load_state_dict(loaded_state)
    reloaded_equal = _all_equal(full_state_dict(other), full) and not \
        incompatible.missing_keys and not incompatible.unexpected_keys
    model.eval()
    other.eval()
    with torch.no_grad():
        outputs_equal = torch.equal(model(input_ids=probe).logits, other(input_ids=probe).logits)
    return {"dcp_differed_before_load": differed_before, "dcp_reload_equal": reloaded_equal,
            "dcp_outputs_equal": outputs_equal}


def check_mixed_precision(scenario: str, arguments, device, probe: torch.Tensor) -> bool:
    """Shard another copy with ``MixedPrecisionPolicy(param_dtype=bfloat16)``: the
    codes and scales its 4-bit layers receive inside forward are bit for bit
    the unsharded layer's (FSDP casts floating-point parameters; fp32 scales
    are held as int32 bits, so it leaves them alone), and the norms do get
    cast (the policy is in effect)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lowrank_ext.distributed import fully_shard_model
    from lowrank_ext.nn import NF4Linear

    reference = build(scenario, arguments.seed, device)
    expected = {name: module.linear_args() for name, module in reference.named_modules()
                if isinstance(module, NF4Linear)}
    model = build(scenario, arguments.seed, device)
    fully_shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    seen, norm_dtypes = {}, set()

    def record(name, layer):
        # QLoRALinear hands its base's linear_args() to the fused op itself.
        # Copies: FSDP frees the gathered storage after the forward.
        return lambda module, _: seen.__setitem__(name, tuple(
            argument.clone() if isinstance(argument, torch.Tensor) else argument
            for argument in layer.linear_args()))

    hooks = []
    for name, module in model.named_modules():
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, NF4Linear) and not name.endswith("base_layer"):
            base_name = name if layer is module else name + ".base_layer"
            hooks.append(module.register_forward_pre_hook(record(base_name, layer)))
        if type(module).__name__.endswith("RMSNorm"):
            hooks.append(module.register_forward_pre_hook(
                lambda module, _: norm_dtypes.add(module.weight.dtype)))
    with torch.no_grad():
        model(input_ids=probe)
    for hook in hooks:
        hook.remove()
    same = sorted(seen) == sorted(expected) and len(seen) > 0 and all(
        (a is None and b is None) or (isinstance(a, torch.Tensor) and a.dtype == b.dtype
                                      and torch.equal(a, b)) or a == b
        for name in seen for a, b in zip(seen[name], expected[name]))
    return same and norm_dtypes == {torch.bfloat16}


def _checkpoint_passed(result: dict) -> bool:
    keys = ("dcp_differed_before_load", "dcp_reload_equal", "dcp_outputs_equal")
    if result["scenario"] == "mixed":
        keys += ("mixed_precision_keeps_scales",)
    return result["scenario"] == "compile" or all(result.get(key) is True for key in keys)


def run_scenario(scenario: str, arguments, rank: int, world_size: int, device,
                 output: Path) -> dict:
    from lowrank_ext import NF4Weight, QLoRAModule
    from lowrank_ext.distributed import (full_state_dict, fully_shard_model, nf4_resident_bytes,
                                         save_adapter_sharded)
    from lowrank_ext.nn import LoRALinear, NF4Linear
    from lowrank_ext.tuners.serialization import read_adapter_weights

    started = time.perf_counter()
    batches = global_batches(arguments.steps, arguments.global_batch_size, arguments.seed)
    model = build(scenario, arguments.seed, device)
    assert isinstance(model, QLoRAModule)
    kinds = {type(module).__name__ for module in model.modules()}
    fully_shard_model(model)
    compile_layers(model, scenario, arguments)
    losses = train(model, batches, rank, world_size, device, arguments.learning_rate)
    resident, whole = nf4_resident_bytes(model)
    state = trained_state(model)
    full = full_state_dict(model)
    adapter_directory = output / f"{scenario}_adapter"
    save_adapter_sharded(model, str(adapter_directory))

    # The checkpoint round trip does not depend on compilation; the compile
    # scenario skips it (compiling a second model costs minutes on CPU).
    checkpoint = (check_checkpoint(model, scenario, arguments, device, output, full,
                                   batches[0][rank::world_size].to(device))
                  if scenario != "compile" else {})
    if scenario == "mixed":
        checkpoint["mixed_precision_keeps_scales"] = check_mixed_precision(
            scenario, arguments, device, batches[0][rank::world_size].to(device))
    result = {"scenario": scenario, "layer_kinds": sorted(kinds & {"QLoRALinear", "LoRALinear",
                                                                   "NF4Linear"}),
              "rank": rank, "resident_nf4_bytes": resident, "whole_nf4_bytes": whole,
              "resident_fraction": resident / whole, "losses": losses, **checkpoint}
    if rank == 0:
        reference = build(scenario, arguments.seed, device)
        reference_losses = train(reference, batches, 0, 1, device, arguments.learning_rate)
        reference_state = trained_state(reference)
        initial = trained_state(build(scenario, arguments.seed, device))
        reference_full = {_normalized_key(key): value.detach().cpu()
                          for key, value in reference.state_dict().items()}
        gathered = {_normalized_key(key): value for key, value in full.items()}
        state_normalized = {_normalized_key(key): value for key, value in state.items()}
        reference_normalized = {_normalized_key(key): value
                                for key, value in reference_state.items()}
        nf4_paths = [path for path, module in reference.named_modules()
                     if isinstance(module, NF4Linear)]
        base_keys = [key for key in reference_full if ".base_layer." in key or any(
            key.startswith(path + ".") for path in nf4_paths)]
        base_equal = all(_same_base_tensor(key, gathered[key], reference_full[key])
                         for key in base_keys)
        quant_keys = sorted(key[len(nf4_paths[0]) + 1:] for key in gathered
                            if key.startswith(nf4_paths[0] + "."))
        # The gathered 4-bit layer parses as bitsandbytes' format.
        parsed = NF4Weight.from_state_dict(gathered, nf4_paths[0] + ".weight")
        dense_ok = torch.equal(parsed.dequantize(torch.float32),
                               reference.get_submodule(nf4_paths[0]).dequantize(torch.float32))
        saved = read_adapter_weights(str(adapter_directory))
        reference_adapter = {key: value.detach().cpu()
                             for key, value in reference.adapter_state_dict().items()}
        result.update({
            "reference_losses": reference_losses,
            "max_abs_loss_difference": max(abs(a - b) for a, b in zip(losses, reference_losses)),
            "max_abs_adapter_difference": _max_difference(state_normalized, reference_normalized),
            "max_abs_change_from_initial": _max_difference(
                state_normalized, {_normalized_key(k): v for k, v in initial.items()}),
            "trainable_tensors": len(state),
            "base_equal_to_single_process": base_equal and len(base_keys) > 0,
            "nf4_state_keys": quant_keys,
            "gathered_nf4_parses": dense_ok,
            "saved_adapter_keys_match": sorted(saved) == sorted(reference_adapter),
            "max_abs_saved_adapter_difference": _max_difference(saved, reference_adapter),
            "has_dense_lora": any(isinstance(m, LoRALinear) and not isinstance(
                getattr(m, "base_layer", None), NF4Linear) for m in reference.modules()),
            "gradient_checkpointing": bool(reference.model.is_gradient_checkpointing),
        })
        tolerance = arguments.tolerance
        result["passed"] = bool(
            result["resident_fraction"] <= 0.55 and result["max_abs_loss_difference"] <= tolerance
            and result["max_abs_adapter_difference"] <= tolerance
            and result["max_abs_saved_adapter_difference"] <= tolerance
            and result["max_abs_change_from_initial"] > 100 * tolerance
            and result["base_equal_to_single_process"] and dense_ok
            and result["saved_adapter_keys_match"] and _checkpoint_passed(result) and (scenario != "mixed" or (
                result["has_dense_lora"] and result["gradient_checkpointing"])))
    result["seconds"] = time.perf_counter() - started
    del model
    gc.collect()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="qlora,mixed")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of scenario compile (inductor, aot_eager)")
    parser.add_argument("--output-dir", default="fsdp_check")
    arguments = parser.parse_args(argv)
    scenarios = [name for name in arguments.scenarios.split(",") if name]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    rank, world_size, device = start_process_group(parser, arguments, "lowrank_ext.finetune.fsdp_check")
    output = Path(arguments.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    results = []
    for scenario in scenarios:
        try:
            results.append(run_scenario(scenario, arguments, rank, world_size, device, output))
        except Exception as error:  # reported per scenario; the other ranks may hang otherwise
            import traceback

            traceback.print_exc()
            results.append({"scenario": scenario, "rank": rank, "error": repr(error)[:2000],
                            "passed": False})
            break
    gathered = [None] * world_size
    distributed.all_gather_object(gathered, results)
    status = 0
    if rank == 0:
        summary = {"world_size": world_size, "backend": distributed.get_backend(),
                   "torch": torch.__version__, "tolerance": arguments.tolerance,
                   "steps": arguments.steps, "global_batch_size": arguments.global_batch_size,
                   "ranks": gathered}
        scenario_results = {}
        for index, scenario in enumerate(scenarios):
            entries = [ranked[index] for ranked in gathered if index < len(ranked)]
            main_entry = entries[0] if entries else {"passed": False}
            passed = bool(main_entry.get("passed")) and all(
                "error" not in entry and entry["resident_fraction"] <= 0.55
                and _checkpoint_passed(entry) for entry in entries) and len(entries) == world_size
            scenario_results[scenario] = passed
            print(f"{scenario}: resident fraction "
                  f"{[round(e.get('resident_fraction', -1), 3) for e in entries]}, "
                  f"max |loss diff| {main_entry.get('max_abs_loss_difference')}, max |adapter "
                  f"diff| {main_entry.get('max_abs_adapter_difference')}, "
                  f"{main_entry.get('seconds', 0):.1f} s: {'PASS' if passed else 'FAIL'}")
        summary["passed"] = scenario_results
        (output / "fsdp_check.json").write_text(json.dumps(summary, indent=2) + "\n",
                                                encoding="utf-8")
        status = 0 if all(scenario_results.values()) and scenario_results else 1
    status_tensor = torch.tensor([status], device=device)
    distributed.broadcast(status_tensor, src=0)
    distributed.barrier()
    distributed.destroy_process_group()
    return int(status_tensor.item())


if __name__ == "__main__":
    sys.exit(main())

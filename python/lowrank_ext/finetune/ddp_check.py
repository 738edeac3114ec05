"""Data-parallel LoRA / QLoRA check: DDP ranks end with the single-process adapter.

Run under torchrun (gloo on CPU, NCCL on GPUs)::

    torchrun --nproc_per_node 2 -m lowrank_ext.finetune.ddp_check --method qlora

Every rank builds the same small model from the same seed, wraps it for the
method and then in ``DistributedDataParallel``, and trains a few steps in
which each rank sees its equal share of every global batch. DDP averages the
gradients, which equals the gradient of the mean loss over the global batch,
so the adapter must match one process training on the whole global batches.
Rank 0 runs that single-process reference too, then checks that

* all ranks hold bitwise-identical adapters (DDP keeps replicas in sync), and
* they equal the reference within ``--tolerance`` (absolute, default 1e-5;
  only the order of the fp32 gradient sums differs, and the AdamW update
  divides by sqrt of the second moment, so agreement is far tighter than
  the learning rate but not bitwise).

It writes ``ddp_check.json`` to ``--output-dir`` and exits with status 1 when
a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as distributed
import torch.nn.functional as functional
from torch import nn

from . import methods

VOCABULARY = 64
SEQUENCE = 12
WIDTH = 32
CLASSES = 4


class TinyClassifier(nn.Module):
    """Embedding, two residual Linear blocks, mean pooling and a head (all small)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, WIDTH)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(WIDTH, 2 * WIDTH), "down": nn.Linear(2 * WIDTH, WIDTH)})
            for _ in range(2))
        self.classifier = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(tokens)
        for block in self.blocks:
            hidden = hidden + block["down"](functional.gelu(block["up"](hidden)))
        return self.classifier(hidden.mean(dim=1))


def global_batches(steps: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same random token batches and labels in every process."""
    generator = torch.Generator().manual_seed(seed + 1)
    return [(torch.randint(0, VOCABULARY, (batch_size, SEQUENCE), generator=generator),
             torch.randint(0, CLASSES, (batch_size,), generator=generator))
            for _ in range(steps)]


def start_process_group(parser: argparse.ArgumentParser, arguments: argparse.Namespace,
                        module_name: str) -> tuple[int, int, torch.device]:
    """Under torchrun: joins the process group (NCCL with GPUs, else gloo) and
    returns (rank, world size, this rank's device), one torch thread per rank.
    Stops with the parser's error outside torchrun or when
    ``arguments.global_batch_size`` does not split over the processes."""
    if "RANK" not in os.environ:
        parser.error(f"run under torchrun, e.g. torchrun --nproc_per_node 2 -m {module_name}")
    use_cuda = torch.cuda.is_available()
    distributed.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    if arguments.global_batch_size % world_size:
        parser.error(f"--global-batch-size {arguments.global_batch_size} is not divisible by "
                     f"the {world_size} processes")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    return rank, world_size, device


def build(method: str, seed: int, device: torch.device) -> nn.Module:
    """The tiny model wrapped for ``method``, identical for a given seed."""
    torch.manual_seed(seed)
    model = TinyClassifier()
    options = methods.MethodOptions(rank=4, alpha=8.0, target_modules=("up", "down"),
                                    modules_to_save=("classifier",))
    return methods.prepare(model, method, options).to(device)


def trained_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors (adapter factors and head), detached on CPU."""
    return {name: parameter.detach().cpu().clone()
            for name, parameter in module.named_parameters() if parameter.requires_grad}


def train(module: nn.Module, batches, rank: int, world_size: int, device,
          learning_rate: float) -> list[float]:
    """AdamW over ``batches``, this process taking rows ``rank::world_size``.

    Returns this process's loss per step.
    """
    parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
    losses = []
    for tokens, labels in batches:
        tokens, labels = tokens[rank::world_size].to(device), labels[rank::world_size].to(device)
        loss = functional.cross_entropy(module(tokens), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _max_difference(first: dict, second: dict) -> float:
    return max((first[name] - second[name]).abs().max().item() for name in first)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("lora", "qlora"), default="lora")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--output-dir", default="ddp_check")
    arguments = parser.parse_args(argv)

    rank, world_size, device = start_process_group(parser, arguments, "lowrank_ext.finetune.ddp_check")

    batches = global_batches(arguments.steps, arguments.global_batch_size, arguments.seed)
    module = build(arguments.method, arguments.seed, device)
    parallel = nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)
    losses = train(parallel, batches, rank, world_size, device, arguments.learning_rate)
    state = trained_state(module)
    # Drop DDP's reducer while the process group is still registered. Otherwise
    # the reducer can hold the group's last reference until the interpreter
    # frees it with the GIL held; gloo's destructor then joins its worker
    # thread, which may still need the GIL to release the tensors of the last
    # collective: a deadlock after all the work is done (seen about one run in
    # six on two cores). destroy_process_group below frees the group with the
    # GIL released.
    del parallel
    gc.collect()

    gathered = [None] * world_size
    distributed.all_gather_object(gathered, state)
    status = 0
    if rank == 0:
        reference_module = build(arguments.method, arguments.seed, device)
        reference_losses = train(reference_module, batches, 0, 1, device, arguments.learning_rate)
        reference = trained_state(reference_module)
        initial = trained_state(build(arguments.method, arguments.seed, device))
        ranks_identical = all(
            all(torch.equal(other[name], state[name]) for name in state) for other in gathered)
        difference = max(_max_difference(other, reference) for other in gathered)
        moved = _max_difference(state, initial)
        passed = ranks_identical and difference <= arguments.tolerance and moved > 0
        result = {
            "method": arguments.method,
            "world_size": world_size,
            "backend": distributed.get_backend(),
            "steps": arguments.steps,
            "global_batch_size": arguments.global_batch_size,
            "trainable_tensors": sorted(state),
            "ranks_identical": ranks_identical,
            "max_abs_difference_to_single_process": difference,
            "max_abs_change_from_initial": moved,
            "tolerance": arguments.tolerance,
            "rank0_losses": losses,
            "single_process_losses": reference_losses,
            "passed": passed,
        }
        output = Path(arguments.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / "ddp_check.json").write_text(json.dumps(result, indent=2) + "\n",
                                               encoding="utf-8")
        print(f"{arguments.method}: {world_size} ranks identical: {ranks_identical}; "
              f"max |DDP - single process| = {difference:.2e} (tolerance "
              f"{arguments.tolerance:.0e}); adapter moved by up to {moved:.2e}: "
              f"{'PASS' if passed else 'FAIL'}")
        status = 0 if passed else 1
    status_tensor = torch.tensor([status], device=device)
    distributed.broadcast(status_tensor, src=0)
    # Every rank past its last collective before any tears down the group
    # (gloo aborts a process whose peer disappears mid-operation).
    distributed.barrier()
    distributed.destroy_process_group()
    return int(status_tensor.item())


if __name__ == "__main__":
    sys.exit(main())

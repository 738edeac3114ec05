"""The fine-tuning run: data, model, method, training loop, evaluation, outputs."""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as functional
from torch import nn

from ..nn.dropout import use_hash_dropout
from . import methods
from .data import DataSplits, load_file_splits, stdlib_docstring_splits
from .memory import ActivationPeak, PeakMemory, gradient_and_optimizer_bytes
from .model import (HEAD_NAME, Tokenized, build_classifier, check_dependencies, load_tokenizer,
                    max_positions)

# Learning rates for this task and model (see docs/finetune.md): adapters
# train a few small matrices and tolerate a large step; updating all 22.7M
# weights at that step would wreck the pretrained encoder. AdaLoRA's
# singular values start at zero between two N(0, 0.02) factors, so its
# update starts slowly: 1e-2 there (76.4% -> 86.4% test accuracy; LoRA at
# 1e-2 drops to 78.4%). The freshly initialised head trains at 2e-3 in
# every method, so the methods differ only in how the encoder is adapted.
DEFAULT_LEARNING_RATES = {"qlora": 2e-3, "lora": 2e-3, "adalora": 1e-2, "full": 1e-4}
HEAD_LEARNING_RATE = 2e-3


@dataclass
class FinetuneSettings:
    """Everything that determines a run (the CLI's options)."""

    method: str = "qlora"
    data: Optional[str] = None
    epochs: int = 1
    batch_size: int = 32
    learning_rate: Optional[float] = None
    # The adapter options: None means the saved run's value with ``resume``,
    # else the default of :data:`methods.ADAPTER_OPTIONS`.
    rank: Optional[int] = None
    alpha: Optional[float] = None
    dropout: Optional[float] = None
    target_modules: Optional[Sequence[str]] = None
    seed: int = 0
    max_train_samples: Optional[int] = None
    max_length: int = 32
    threads: Optional[int] = None
    device: str = "cpu"
    output_dir: Optional[str] = None
    resume: Optional[str] = None
    progress: bool = True
    group_by_length: bool = True

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return DEFAULT_LEARNING_RATES[self.method]


class SettingsError(ValueError):
    """An option the run cannot use (a user error), found before any work."""


def check_device(text: str) -> torch.device:
    """``text`` as a device this build can train on, else :class:`SettingsError`."""
    import lowrank_ext

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SettingsError(f"--device {text!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"--device {text}: no CUDA device is available to torch "
                                f"{torch.__version__}; use --device cpu")
        if "cuda" not in lowrank_ext.build_info()["backends"]:
            raise SettingsError(f"--device {text}: lowrank_ext was built without CUDA kernels; "
                                "use --device cpu or a CUDA build")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingsError(f"--device {text}: this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def check_output_dir(path: Path) -> None:
    """Refuse an output folder that cannot be written, before hours of training are lost.

    Nothing is created: the check writes (and removes) a temporary file in
    the folder, or in its nearest existing parent.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is below a file, {existing}"
        raise SettingsError(f"--output-dir {path} {where}; pass a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise SettingsError(f"--output-dir {path}: cannot write in {existing} "
                            f"({error.strerror or error})") from None


def check_settings(settings: FinetuneSettings, output_dir: Path) -> torch.device:
    """Every check that needs no data and no model; the device to train on."""
    check_dependencies()
    device = check_device(settings.device)
    positions = max_positions()
    if settings.max_length > positions:
        raise SettingsError(f"--max-length {settings.max_length} exceeds the model's "
                            f"{positions} positions")
    check_output_dir(output_dir)
    return device


class Interrupted(Exception):
    """Training was stopped by Ctrl-C after ``step`` of ``total_steps`` steps;
    the adapter trained so far is saved in ``adapter_dir``."""

    def __init__(self, step: int, total_steps: int, adapter_dir: Path):
        super().__init__(f"interrupted after step {step} of {total_steps}; the adapter trained "
                         f"so far is saved in {adapter_dir}: continue with --resume {adapter_dir}")
        self.step, self.total_steps, self.adapter_dir = step, total_steps, adapter_dir


@dataclass
class Evaluation:
    """Mean cross-entropy and accuracy over a data set."""

    loss: float
    accuracy: float


@dataclass
class History:
    """Loss curves: one training loss per step, validation loss per epoch."""

    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    validation_steps: list[int] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    validation_accuracy: list[float] = field(default_factory=list)


def resolve_adapter_options(settings: FinetuneSettings,
                            saved: Optional[dict] = None) -> FinetuneSettings:
    """``settings`` with every adapter option set.

    An option left unset takes the value saved with the run being resumed
    (``saved``), else its default. An option set to another value than the
    saved one raises :class:`methods.MethodError`: a resumed adapter keeps
    its rank, scale, dropout and layers, and the report must describe the
    adapter that was trained. ``full`` trains no adapter: its options stay
    None, and setting one is an error.
    """
    values = {}
    for field_name, flag, default in methods.ADAPTER_OPTIONS:
        value = getattr(settings, field_name)
        if settings.method == "full":
            if value is not None:
                raise methods.MethodError(f"{flag} does not apply to --method full "
                                          "(it trains every weight, no adapter)")
            continue
        if field_name == "target_modules" and value is not None:
            value = tuple(value)
        if saved is not None:
            if value is not None and value != saved[field_name]:
                shown = ",".join(value) if field_name == "target_modules" else value
                kept = (",".join(saved[field_name]) if field_name == "target_modules"
                        else saved[field_name])
                raise methods.MethodError(
                    f"{flag} {shown} differs from the adapter in --resume {settings.resume} "
                    f"({kept}); omit {flag} to continue with the saved value")
            value = saved[field_name]
        values[field_name] = default if value is None else value
    return replace(settings, **values)


def load_splits(data: Optional[str]) -> DataSplits:
    """The built-in stdlib-docstring task, or a user's file."""
    return stdlib_docstring_splits() if data is None else load_file_splits(data)


@torch.no_grad()
def evaluate(module: nn.Module, tokenized: Tokenized, batch_size: int, device) -> Evaluation:
    """Loss and accuracy of ``module`` on all of ``tokenized`` (eval mode, no grad)."""
    was_training = module.training
    module.eval()
    total_loss, correct = 0.0, 0
    # Batching texts of similar length wastes less work on padding; the
    # order does not change the sums.
    order = sorted(range(len(tokenized)), key=lambda index: tokenized.ids[index].numel())
    for start in range(0, len(order), batch_size):
        batch = tokenized.batch(order[start:start + batch_size]).to(device)
        logits = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        total_loss += functional.cross_entropy(logits.float(), batch.labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == batch.labels).sum().item()
    module.train(was_training)
    count = max(1, len(tokenized))
    return Evaluation(total_loss / count, correct / count)


def _linear_schedule(total_steps: int):
    """Linear warm-up over the first 6% of steps, then linear decay to zero."""
    warmup = max(1, int(0.06 * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


# With --group-by-length, each run of this many batches of the shuffled
# training set is sorted by length before it is cut into batches.
LENGTH_GROUP_BATCHES = 8


def epoch_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                  group_by_length: bool = False) -> list[torch.Tensor]:
    """One epoch's batches of example indices, drawn from ``generator``.

    Plain: a random permutation cut into batches. ``group_by_length``: the
    permutation is cut into groups of :data:`LENGTH_GROUP_BATCHES` batches,
    each group is sorted by token count and cut into batches, and the
    batches are shuffled, as Hugging Face's ``group_by_length`` does. A
    batch is padded to its longest text, so similar lengths waste less
    work on padding, while every batch still mixes texts from a random
    eighth of the data. Either way each example is in exactly one batch,
    and there are ``ceil(len(lengths) / batch_size)`` batches.
    """
    order = torch.randperm(len(lengths), generator=generator)
    if not group_by_length:
        return list(order.split(batch_size))
    batches = []
    for group in order.split(LENGTH_GROUP_BATCHES * batch_size):
        ranked = sorted(group.tolist(), key=lambda index: lengths[index])
        batches += [torch.tensor(ranked[start:start + batch_size], dtype=torch.long)
                    for start in range(0, len(ranked), batch_size)]
    return [batches[index] for index in torch.randperm(len(batches), generator=generator)]


def default_output_dir(method: str) -> Path:
    """``runs/<method>-<YYYYmmdd-HHMMSS>`` under the current directory."""
    return Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_finetune(settings: FinetuneSettings, splits: Optional[DataSplits] = None) -> dict:
    """Fine-tune, evaluate before and after, save adapter, report and plot.

    Returns the report (also written to ``<output_dir>/report.json``).

    Options are checked before any work (data, model, training), so a
    mistake costs seconds, not a run.

    Raises:
        DataError, MethodError, DependencyError, SettingsError: user-facing
        problems.
        Interrupted: Ctrl-C during training, after saving the adapter.
    """
    from . import report as reporting

    methods.check_method(settings.method)
    wall_start = time.perf_counter()
    output_dir = Path(settings.output_dir) if settings.output_dir else default_output_dir(settings.method)
    device = check_settings(settings, output_dir)
    # Only the plot needs matplotlib: without it the run still trains and reports.
    plot = reporting.plot_available()
    if not plot:
        warnings.warn(reporting.PLOT_MISSING, UserWarning, stacklevel=2)
    if settings.threads:
        torch.set_num_threads(settings.threads)

    resume_info = None
    if settings.resume:
        resume_info = methods.read_run_info(Path(settings.resume))
        if resume_info["method"] != settings.method:
            raise methods.MethodError(
                f"--resume {settings.resume} holds a {resume_info['method']!r} run, "
                f"but --method is {settings.method!r}")
    settings = resolve_adapter_options(
        settings, resume_info and methods.saved_adapter_options(Path(settings.resume), resume_info))

    splits = splits or load_splits(settings.data)
    if resume_info and resume_info["labels"] != splits.label_names:
        raise methods.MethodError(f"--resume {settings.resume} was trained on labels "
                                  f"{resume_info['labels']}, this data has {splits.label_names}")
    train_set = splits.train.sample(settings.max_train_samples, settings.seed)

    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer()
    tokenized = {name: Tokenized(tokenizer, part.texts, part.labels, settings.max_length)
                 for name, part in (("train", train_set), ("validation", splits.validation),
                                    ("test", splits.test))}

    steps_per_epoch = math.ceil(len(train_set) / settings.batch_size)
    total_steps = max(1, steps_per_epoch * settings.epochs)
    # ``full`` has no adapter options; MethodOptions' defaults stand in, unused.
    adapter_options = {name: getattr(settings, name) for name, _, _ in methods.ADAPTER_OPTIONS
                       if getattr(settings, name) is not None}
    options = methods.MethodOptions(**adapter_options, modules_to_save=(HEAD_NAME,),
                                    total_step=total_steps)

    model = build_classifier(len(splits.label_names), seed=settings.seed)
    # The model's own dropout layers with the hashed-mask kernel: torch's
    # CPU dropout (a generator draw per element) took ~5% of a QLoRA step.
    hashed_dropouts = use_hash_dropout(model)
    if settings.method != "full":
        methods.check_target_modules(model, settings.target_modules, (HEAD_NAME,))
    _, base_parameters = methods.count_parameters(model)
    # The base model's fp32 footprint, the reference the methods are compared to.
    base_weight_bytes = methods.weight_bytes(model)
    # Adapter initialisation draws from the global generator: seed it so every
    # run with the same seed starts identically, whatever ran before.
    torch.manual_seed(settings.seed)
    if resume_info:
        module = methods.load(model, settings.method, Path(settings.resume), options)
    else:
        module = methods.prepare(model, settings.method, options)
    module.to(device)
    trainable, _ = methods.count_parameters(module)
    stored_weight_bytes = methods.weight_bytes(module)
    setup_seconds = time.perf_counter() - wall_start

    before = {name: evaluate(module, tokenized[name], 2 * settings.batch_size, device)
              for name in ("validation", "test")}

    learning_rate = settings.resolved_learning_rate()
    head, encoder = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (head if f"{HEAD_NAME}." in name else encoder).append(parameter)
    parameters = head + encoder
    head_learning_rate = learning_rate if settings.learning_rate is not None else HEAD_LEARNING_RATE
    optimizer = torch.optim.AdamW([{"params": encoder, "lr": learning_rate},
                                   {"params": head, "lr": head_learning_rate}],
                                  weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(total_steps))
    methods.attach_optimizer(module, settings.method, optimizer)
    order_generator = torch.Generator().manual_seed(settings.seed)

    activation_peak = ActivationPeak()
    training_state_bytes = 0
    history = History(validation_steps=[0], validation_loss=[before["validation"].loss],
                      validation_accuracy=[before["validation"].accuracy])
    progress = reporting.progress_bar(total_steps, settings.method, settings.progress)
    step = 0
    samples = 0
    train_seconds = 0.0
    module.train()
    adapter_dir = output_dir / "adapter"
    run_info = {"method": settings.method, "labels": splits.label_names,
                "max_length": settings.max_length, "rank": settings.rank,
                "alpha": settings.alpha, "dropout": settings.dropout,
                "target_modules": settings.target_modules and list(settings.target_modules)}
    try:
        with PeakMemory(device) as peak_memory:
            for _ in range(settings.epochs):
                epoch_start = time.perf_counter()
                for indices in epoch_batches(tokenized["train"].lengths(), settings.batch_size,
                                             order_generator, settings.group_by_length):
                    batch = tokenized["train"].batch(indices).to(device)
                    saved = activation_peak.measure(batch.input_ids.shape, module)
                    with saved:
                        logits = module(input_ids=batch.input_ids,
                                        attention_mask=batch.attention_mask)
                        loss = functional.cross_entropy(logits.float(), batch.labels)
                        regularization = methods.regularization_loss(module, settings.method)
                        objective = loss if regularization is None else loss + regularization
                    activation_peak.add(saved)
                    objective.backward()
                    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                    optimizer.step()
                    training_state_bytes = max(training_state_bytes,
                                               gradient_and_optimizer_bytes(optimizer))
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                    samples += len(indices)
                    history.train_steps.append(step)
                    history.train_loss.append(loss.item())
                    elapsed = train_seconds + time.perf_counter() - epoch_start
                    progress.set_postfix(loss=f"{loss.item():.3f}",
                                         samples_per_s=f"{samples / max(elapsed, 1e-9):.1f}")
                    progress.update(1)
                train_seconds += time.perf_counter() - epoch_start
                validation = evaluate(module, tokenized["validation"], 2 * settings.batch_size,
                                      device)
                history.validation_steps.append(step)
                history.validation_loss.append(validation.loss)
                history.validation_accuracy.append(validation.accuracy)
    except KeyboardInterrupt:
        # Ctrl-C: keep what was trained, so --resume can continue from it.
        progress.close()
        if not step:
            raise
        methods.save(module, settings.method, adapter_dir,
                     {**run_info, "interrupted_at_step": step})
        raise Interrupted(step, total_steps, adapter_dir) from None
    progress.close()
    # AdaLoRA shrinks its factors in place at the end: count what is left.
    trainable_after, _ = methods.count_parameters(module)

    after = {"validation": validation if settings.epochs else before["validation"],
             "test": evaluate(module, tokenized["test"], 2 * settings.batch_size, device)}

    methods.save(module, settings.method, adapter_dir, run_info)

    report = {
        "method": settings.method,
        "settings": {**asdict(settings), "learning_rate": learning_rate,
                     "head_learning_rate": head_learning_rate,
                     "target_modules": run_info["target_modules"]},
        "data": {**splits.summary(), "train_used": len(train_set)},
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "before": {name: asdict(value) for name, value in before.items()},
        "after": {name: asdict(value) for name, value in after.items()},
        "hash_dropout_layers": hashed_dropouts,
        "trainable_parameters": trainable_after,
        "trainable_parameters_at_start": trainable,
        "base_parameters": base_parameters,
        "weight_bytes": stored_weight_bytes,
        "base_weight_bytes": base_weight_bytes,
        "train_memory_bytes": activation_peak.bytes + training_state_bytes,
        "activation_bytes": activation_peak.bytes,
        "activation_measured_steps": activation_peak.steps,
        "gradient_and_optimizer_bytes": training_state_bytes,
        "peak_memory_bytes": peak_memory.peak_bytes,
        "peak_memory_measures": peak_memory.kind,
        "steps": step,
        "train_seconds": train_seconds,
        "train_samples_per_second": samples / max(train_seconds, 1e-9),
        "setup_seconds": setup_seconds,
        "history": asdict(history),
        "adapter_dir": str(adapter_dir),
        "resumed_from": settings.resume,
        "plot": str(output_dir / "loss.png") if plot else None,
    }
    report["wall_seconds"] = time.perf_counter() - wall_start
    # CPU time of this process (all threads) since it started, model loading
    # included: next to the wall time it shows how contended the machine was.
    report["process_cpu_seconds"] = time.process_time()
    output_dir.mkdir(parents=True, exist_ok=True)
    if plot:
        reporting.plot_history(history, output_dir / "loss.png", settings.method)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report

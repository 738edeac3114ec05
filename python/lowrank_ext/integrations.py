"""Our wrappers in Hugging Face's Trainer, TRL's trainers and Accelerate, as PEFT models are.

The tools give a ``peft.PeftModel`` special treatment found by ``isinstance``:
its checkpoints hold only the adapter (``save_pretrained``) and resuming loads
the adapter back (``load_adapter``). Any other model is saved whole and
reloaded with ``load_state_dict``, which for a QLoRA model means writing the
4-bit base into every checkpoint. The wrappers themselves show the wrapped
model's forward signature (column pruning) and pass gradient checkpointing
through; this module adds the saving and loading:

- :func:`adapter_trainer` turns a ``Trainer`` class (``transformers.Trainer``,
  ``trl.SFTTrainer``, ...) into one whose checkpoints, ``save_model`` and
  ``resume_from_checkpoint`` use PEFT's adapter files for our wrappers (and
  stay as they were for other models). ``AdapterTrainer`` and
  ``AdapterSFTTrainer`` are the two common ones.
- :func:`register_adapter_state_hooks` makes ``Accelerator.save_state`` /
  ``load_state`` do the same, through Accelerate's documented state hooks.

transformers, trl and accelerate are imported only when used.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch

from .tuners.model import AdapterModel
from .tuners.serialization import WEIGHTS_NAME, read_adapter_weights

__all__ = ["AdapterTrainerMixin", "adapter_trainer", "register_adapter_state_hooks",
           "AdapterTrainer", "AdapterSFTTrainer"]

# transformers.trainer.TRAINING_ARGS_NAME: the Trainer saves its arguments under it.
TRAINING_ARGS_NAME = "training_args.bin"


def _adapter_directory(directory: str, adapter_name: str) -> str:
    """Where ``save_pretrained`` puts an adapter: PEFT's layout (``default`` at the top)."""
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def _holds_adapters(wrapper: AdapterModel, directory: str) -> bool:
    return all(os.path.isfile(os.path.join(_adapter_directory(directory, name), WEIGHTS_NAME))
               for name in wrapper.peft_config)


def load_adapter_weights(wrapper: AdapterModel, directory: str) -> None:
    """Copy every adapter of ``wrapper`` from ``directory`` (as ``save_pretrained`` wrote it)
    into the existing parameters, so optimizers holding them stay valid.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one that does
    not fit; nothing is copied then.
    """
    states = {name: read_adapter_weights(_adapter_directory(directory, name))
              for name in wrapper.peft_config}
    destinations = {name: wrapper._state_destinations(name, state)
                    for name, state in states.items()}
    for name, state in states.items():
        AdapterModel._copy_state(destinations[name], state)


class AdapterTrainerMixin:
    """Put before a ``transformers.Trainer`` class (see :func:`adapter_trainer`).

    With one of our wrappers as ``model``: checkpoints and ``save_model`` write
    the adapters in PEFT's format (``adapter_config.json`` +
    ``adapter_model.safetensors``, other adapters in ``<dir>/<name>/``) plus the
    tokenizer and training arguments, as for a PeftModel;
    ``resume_from_checkpoint`` and ``load_best_model_at_end`` load them back into
    the live adapter (the Trainer restores optimizer, scheduler and RNG itself).
    Any other model is handled by the Trainer unchanged.
    """

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        if not isinstance(self.model, AdapterModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        wrapper = self.model if model is None else model
        if isinstance(wrapper, AdapterModel) and _holds_adapters(wrapper, resume_from_checkpoint):
            load_adapter_weights(wrapper, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if isinstance(self.model, AdapterModel) and _holds_adapters(self.model, best):
            load_adapter_weights(self.model, best)
            return
        super()._load_best_model()


@functools.lru_cache(maxsize=None)
def adapter_trainer(trainer_class: type) -> type:
    """``trainer_class`` (a ``transformers.Trainer`` subclass) with :class:`AdapterTrainerMixin`.

    ``adapter_trainer(trl.DPOTrainer)(model=QLoRAModule(...), ...)`` trains and
    checkpoints our wrapper as that trainer does a PeftModel. The same class
    comes back for the same argument.
    """
    name = f"Adapter{trainer_class.__name__}"
    return type(name, (AdapterTrainerMixin, trainer_class), {
        "__module__": __name__, "__qualname__": name,
        "__doc__": f"{trainer_class.__name__} that saves and resumes our wrappers' adapters "
                   "in PEFT's format (see AdapterTrainerMixin)."})


def __getattr__(name: str) -> Any:
    # Built on first use, so importing this module needs neither transformers nor trl.
    if name == "AdapterTrainer":
        import transformers

        return adapter_trainer(transformers.Trainer)
    if name == "AdapterSFTTrainer":
        import trl

        return adapter_trainer(trl.SFTTrainer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_adapter_state_hooks(accelerator) -> tuple:
    """Make ``accelerator.save_state`` / ``load_state`` keep only our wrappers' adapters.

    Our prepared wrappers' full state dicts (4-bit base included) are left out
    of ``save_state``; their adapters are written in PEFT's format instead, in
    ``<dir>`` for the first prepared model and ``<dir>/adapter_<i>`` for the
    ``i``-th, and ``load_state`` copies them back into the live adapters.
    Optimizers, schedulers, RNG and other models are saved as Accelerate does.
    Returns the two hook handles (``handle.remove()`` undoes this).
    """

    def directory(output_dir: str, index: int) -> str:
        return output_dir if index == 0 else os.path.join(output_dir, f"adapter_{index}")

    def wrappers(models: list) -> list[tuple[int, AdapterModel]]:
        found = []
        for index, model in enumerate(models):
            unwrapped = accelerator.unwrap_model(model)
            if isinstance(unwrapped, AdapterModel):
                found.append((index, unwrapped))
        return found

    def save(models: list, weights: list, output_dir: str) -> None:
        # `models` is the accelerator's own list: only `weights` may change.
        found = wrappers(models)
        if accelerator.is_main_process:
            for index, wrapper in found:
                wrapper.save_pretrained(directory(output_dir, index))
        for index, _ in reversed(found):
            del weights[index]

    def load(models: list, input_dir: str) -> None:
        found = wrappers(models)
        for index, wrapper in found:
            load_adapter_weights(wrapper, directory(input_dir, index))
        for index, _ in reversed(found):
            del models[index]

    return (accelerator.register_save_state_pre_hook(save),
            accelerator.register_load_state_pre_hook(load))

"""Peak memory of a stretch of work, as the operating system or CUDA sees it.

On CPU this is the peak resident set size (RSS) of the process during the
stretch minus the RSS when it began: activations, gradients, optimizer state,
temporaries and whatever the allocator keeps cached, but not memory that was
already resident (the loaded model). On Linux the kernel keeps the peak
itself: the stretch starts by resetting the process's RSS high-water mark
(writing ``5`` to ``/proc/self/clear_refs``) and ends by reading it
(``VmHWM`` in ``/proc/self/status``), which is exact and costs the work
nothing. Where the mark cannot be reset, the RSS is sampled every 5 ms from
``/proc/self/statm`` by a thread (which can miss a peak shorter than that);
where that file does not exist either (macOS, Windows), the process's
lifetime high-water mark from ``resource.getrusage`` is used, which makes
the delta a lower bound. On CUDA it is ``torch.cuda.max_memory_allocated``
over the stretch, minus the allocation at its start.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

import torch

_STATM = Path("/proc/self/statm")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SAMPLE_SECONDS = 0.005


def resident_bytes() -> int:
    """Current RSS in bytes (the high-water mark where RSS cannot be read)."""
    if _STATM.exists():
        pages = int(_STATM.read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    return peak if sys.platform == "darwin" else peak * 1024


def reset_high_water_mark() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux); whether it worked."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return high_water_bytes() is not None


def high_water_bytes() -> int | None:
    """The kernel's RSS high-water mark of this process (``VmHWM``), None where unknown."""
    try:
        status = _STATUS.read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


class PeakMemory:
    """Context manager measuring peak memory growth; read ``peak_bytes`` after exit.

    On Linux the peak is the kernel's RSS high-water mark, reset on entry;
    elsewhere a thread samples the RSS every 5 ms (see the module's notes).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._high_water = False
        self._start = 0
        self._peak = 0

    @property
    def kind(self) -> str:
        """What is measured, for reports."""
        if self.device.type == "cuda":
            return "cuda max_memory_allocated delta"
        if self._high_water:
            return "process RSS peak delta (kernel high-water mark)"
        return "process RSS peak delta" if _STATM.exists() else "process RSS high-water delta"

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_SECONDS):
            self._peak = max(self._peak, resident_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._high_water = reset_high_water_mark()
            self._start = self._peak = resident_bytes()
            if not self._high_water:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exception) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._high_water:
            peak = max(self._start, high_water_bytes() or 0, resident_bytes())
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, resident_bytes())
        self.peak_bytes = max(0, peak - self._start)


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """Identifies the memory block behind a tensor (views share one key)."""
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


class SavedActivations:
    """Counts the bytes autograd keeps for backward during one forward pass.

    Use as a context manager around the forward; ``bytes`` is then the total
    size of the distinct storages saved for backward, leaving out storages in
    ``resident`` (the model's own weights, which are saved by reference and
    cost nothing extra). Unlike RSS this is exact and independent of the
    allocator, so it compares methods fairly.
    """

    def __init__(self, resident: set[tuple[str, int]]):
        self.resident = resident
        self.bytes = 0
        self._seen: set[tuple[str, int]] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in self._seen and key not in self.resident:
            self._seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exception) -> None:
        self._hooks.__exit__(*exception)


class ActivationPeak:
    """The most bytes saved for backward by any training step, measured on few steps.

    What a forward pass saves depends only on the model and the shape of
    its batch (rows x padded length): a batch with no more rows and no more
    tokens per row than one already measured saves no more (each saved
    tensor grows with both). So only steps whose batch shape is not covered
    by a measured one are counted with :class:`SavedActivations` (the first
    step, and later ones with a longer or larger batch); the peak over them
    is the peak over all steps, without paying the hooks on every step.
    The model's weight storages are looked up at each measured step
    (AdaLoRA swaps its factors for smaller ones during training).
    """

    def __init__(self):
        self.bytes = 0
        self.shapes: list[tuple[int, ...]] = []

    @property
    def steps(self) -> int:
        """How many steps were measured."""
        return len(self.shapes)

    def measure(self, shape, module) -> "SavedActivations | contextlib.nullcontext":
        """A context to run a step's forward in: counting for a new shape, else a no-op."""
        shape = tuple(shape)
        covered = any(len(seen) == len(shape) and all(a <= b for a, b in zip(shape, seen))
                      for seen in self.shapes)
        if covered:
            return contextlib.nullcontext()
        from .methods import weight_storages

        self.shapes.append(shape)
        return SavedActivations(weight_storages(module))

    def add(self, saved) -> None:
        """Take the bytes of a :meth:`measure` context after the forward."""
        if isinstance(saved, SavedActivations):
            self.bytes = max(self.bytes, saved.bytes)


def gradient_and_optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the gradients of ``optimizer``'s parameters plus its state (AdamW: two moments)."""
    total = 0
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                total += parameter.grad.numel() * parameter.grad.element_size()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total

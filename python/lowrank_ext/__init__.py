"""lowrank_ext: LoRA, AdaLoRA and QLoRA on fast NF4 and fused low-rank kernels.

Import order matters: torch first (it loads libtorch), then a check that it is
a torch the compiled library can load into, then the library (which registers
the ops; ``_library``, also known as ``_C``), then the Python layers built on
them.
"""

import torch

from ._torch_check import check_running_torch

check_running_torch()

from . import _library as _C  # noqa: E402  (only after the torch version check)
from . import ops  # noqa: E402
from .quant import NF4Weight, dynamic_map, nf4_codebook
from .loftq import LoftQConfig, loftq_init
from . import nn, tuners  # noqa: E402  (layers need the ops registered first)
from .tuners import (
    AdaLoRAConfig,
    AdaLoRAModule,
    LoRAConfig,
    LoRAModule,
    QLoRAConfig,
    QLoRAModule,
    load_adapter,
    prepare_for_kbit_training,
    save_adapter,
)

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """Version, torch version, compiled backends, CPU ISA in use and CUDA archs."""
    info = dict(_C.build_info())
    info["cpu_isa"] = _C.get_cpu_isa()
    info["torch_runtime_version"] = torch.__version__
    return info


def use_fused_kernels(config, model=None):
    """Make ``peft.get_peft_model`` build lowrank_ext's fused layers from a
    ``peft.LoraConfig``; returns the config. See :mod:`lowrank_ext.peft_integration`
    (imported here on first use, so that ``import lowrank_ext`` does not import PEFT).
    """
    from .peft_integration import use_fused_kernels as register

    return register(config, model)


def get_cpu_isa() -> str:
    """The CPU kernel set in use: ``"scalar"``, ``"avx2"`` or ``"avx512"``."""
    return _C.get_cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Switch the CPU kernel set (``LOWRANK_CPU_ISA`` sets the initial one).

    Raises ``ValueError`` for an unknown name or one this CPU cannot run.
    """
    _C.set_cpu_isa(name)


def supported_cpu_isas() -> list[str]:
    """The CPU kernel sets this machine can run, slowest first."""
    return list(_C.supported_cpu_isas())


def __getattr__(name: str):
    # transformers is imported (and the quantizer registered with it) on first
    # use: it costs seconds and is an optional dependency.
    if name in ("NF4Config", "NF4HfQuantizer"):
        from . import hf_quantizer

        return getattr(hf_quantizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# NF4Config is left out: a star import would import transformers.
__all__ = [
    "AdaLoRAConfig",
    "AdaLoRAModule",
    "LoRAConfig",
    "LoRAModule",
    "LoftQConfig",
    "NF4Weight",
    "QLoRAConfig",
    "QLoRAModule",
    "build_info",
    "dynamic_map",
    "get_cpu_isa",
    "load_adapter",
    "loftq_init",
    "nf4_codebook",
    "nn",
    "ops",
    "prepare_for_kbit_training",
    "save_adapter",
    "set_cpu_isa",
    "supported_cpu_isas",
    "tuners",
    "use_fused_kernels",
]

"""Refuse to load the compiled library next to a torch it cannot run with.

The library is built on torch's stable ABI for the oldest torch it serves
(``TORCH_TARGET_VERSION``), so it loads into that torch and every later one;
an older torch lacks the C shims it calls and fails on an undefined symbol
deep in the dynamic loader. A CUDA build also needs a CUDA torch of the same
CUDA major (it links libtorch_cuda and that CUDA runtime). The build records
all this in ``_build_config.py``; this check runs before the library is loaded
and names the versions and the way out.
"""

from __future__ import annotations

import os
import re
from typing import Optional

#: Set to 1 to load the library whatever the versions say (at your own risk).
SKIP_VARIABLE = "LOWRANK_SKIP_TORCH_CHECK"

REBUILD_COMMAND = "pip install --no-build-isolation --no-deps --force-reinstall <lowrank_ext source or sdist>"


def _version(version: str) -> Optional[tuple[int, int]]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _cuda_major(version: Optional[str]) -> Optional[str]:
    return version.split(".")[0] if version else None


def mismatch(built: str, minimum: str, built_cuda: Optional[str], running: str,
             running_cuda: Optional[str]) -> Optional[str]:
    """The reason the library cannot load beside the running torch, or ``None``.

    ``built`` / ``running`` are ``torch.__version__`` strings, ``minimum`` the
    oldest torch the library is built for (``2.10``), ``built_cuda`` the CUDA
    version a CUDA build was compiled with (``None`` or ``""`` for a CPU
    build), ``running_cuda`` the running torch's ``torch.version.cuda``.
    """
    running_version, minimum_version = _version(running), _version(minimum)
    if running_version is None or minimum_version is None or running_version < minimum_version:
        return (f"lowrank_ext needs torch>={minimum} (the oldest torch whose stable ABI it is "
                f"built for; compiled with torch {built}), but torch {running} is installed. "
                f"Install torch>={minimum}, e.g. pip install 'torch>={minimum}'")
    if built_cuda and not running_cuda:
        return (f"lowrank_ext was compiled with CUDA {built_cuda} kernels (against torch "
                f"{built}), but the installed torch {running} is a CPU build, which lacks the "
                f"CUDA libraries they link. Install a CUDA {_cuda_major(built_cuda)} build of "
                f"torch>={minimum}, or rebuild lowrank_ext for this torch: {REBUILD_COMMAND}")
    if built_cuda and _cuda_major(built_cuda) != _cuda_major(running_cuda):
        return (f"lowrank_ext was compiled with CUDA {built_cuda} kernels (against torch "
                f"{built}), but the installed torch {running} is built for CUDA {running_cuda}: "
                f"the library links CUDA {_cuda_major(built_cuda)}'s runtime. Install a CUDA "
                f"{_cuda_major(built_cuda)} build of torch>={minimum}, or rebuild lowrank_ext "
                f"for this torch: {REBUILD_COMMAND}")
    return None


def check_running_torch() -> None:
    """Raise ``ImportError`` if the installed library cannot load beside this torch."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        return
    try:
        from . import _build_config
    except ImportError:
        # A source tree without a build: loading the library fails with its own message.
        return
    import torch

    reason = mismatch(_build_config.TORCH_VERSION, _build_config.MIN_TORCH_VERSION,
                      _build_config.CUDA_VERSION, torch.__version__, torch.version.cuda)
    if reason is not None:
        raise ImportError(f"{reason} (set {SKIP_VARIABLE}=1 to try anyway)")

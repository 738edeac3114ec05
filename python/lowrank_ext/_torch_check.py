"""Refuse to load the compiled extension next to a torch it was not built for.

``_C`` links torch's C++ library, whose ABI is only stable within a minor
version. Loading it beside another torch fails on an undefined symbol deep in
the dynamic loader, or — when no symbol happens to be missing — runs against
class layouts it was not compiled for. The build records its torch in
``_build_config.py``; this check runs before ``_C`` is imported and names
both versions and the way out.
"""

from __future__ import annotations

import os
import re
from typing import Optional

#: Set to 1 to load ``_C`` whatever the versions say (at your own risk).
SKIP_VARIABLE = "LOWRANK_SKIP_TORCH_CHECK"

REBUILD_COMMAND = "pip install --no-build-isolation --no-deps --force-reinstall <lowrank_ext source or sdist>"


def _minor(version: str) -> Optional[tuple[int, int]]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def mismatch(built: str, built_with_cuda: bool, running: str,
             running_cuda: Optional[str]) -> Optional[str]:
    """The reason ``_C`` cannot load beside the running torch, or ``None``.

    ``built`` / ``running`` are ``torch.__version__`` strings, ``built_with_cuda``
    whether CUDA kernels were compiled in, ``running_cuda`` the running torch's
    ``torch.version.cuda``.
    """
    if _minor(built) != _minor(running):
        return (f"lowrank_ext was compiled against torch {built}, but torch {running} is "
                f"installed: its C++ extension works only with the torch minor version it "
                f"was built for. Install torch=={built.split('+')[0]} (same minor version), "
                f"or rebuild lowrank_ext for torch {running}: {REBUILD_COMMAND}")
    if built_with_cuda and not running_cuda:
        return (f"lowrank_ext was compiled with CUDA kernels against torch {built}, but the "
                f"installed torch {running} is a CPU build, which lacks the CUDA libraries "
                f"they link. Install a CUDA build of torch {built.split('+')[0]}, or rebuild "
                f"lowrank_ext for this torch: {REBUILD_COMMAND}")
    return None


def check_running_torch() -> None:
    """Raise ``ImportError`` if the installed ``_C`` was built for another torch."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        return
    try:
        from . import _build_config
    except ImportError:
        # A source tree without a build: importing _C fails with its own message.
        return
    import torch

    reason = mismatch(_build_config.TORCH_VERSION, _build_config.WITH_CUDA,
                      torch.__version__, torch.version.cuda)
    if reason is not None:
        raise ImportError(f"{reason} (set {SKIP_VARIABLE}=1 to try anyway)")

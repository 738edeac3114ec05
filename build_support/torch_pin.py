"""Wheel metadata: pin the torch minor version the extension is compiled against.

The extension links torch's C++ library, whose ABI changes between minor
versions (2.13 -> 2.14 removed symbols and changed layouts). A wheel that
only said ``torch>=2.6`` let pip install it beside any torch, and the import
then failed on an undefined symbol (or, worse, loaded against layouts it was
not built for). Built with ``--no-build-isolation``, the build environment's
torch is the one the extension is compiled against, so its version becomes
``torch==<major>.<minor>.*`` in the wheel's ``Requires-Dist``. A prefix match
ignores local labels (``+cpu``, ``+cu130``), so a CPU wheel installs beside a
CUDA torch of the same minor without pip replacing it.

scikit-build-core calls :func:`dynamic_metadata` for the ``dependencies``
field (``[tool.scikit-build.metadata.dependencies]`` in pyproject.toml); the
table's ``base`` list holds the other requirements.
"""

from __future__ import annotations

import re
from typing import Any


def torch_requirement(version: str) -> str:
    """``torch==<major>.<minor>.*`` for a torch version string such as ``2.13.0+cpu``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a major.minor version from torch {version!r}")
    return f"torch=={match.group(1)}.{match.group(2)}.*"


def dynamic_metadata(field: str, settings: dict[str, Any], project: Any = None) -> list[str]:
    if field != "dependencies":
        raise ValueError(f"torch_pin provides 'dependencies', not {field!r}")
    unknown = set(settings) - {"base"}
    if unknown:
        raise ValueError(f"torch_pin takes only a 'base' list, got {sorted(unknown)}")
    try:
        import torch
    except ImportError as error:
        raise RuntimeError(
            "lowrank_ext is compiled against the torch of the build environment: install torch "
            "first and build with `pip install --no-build-isolation .`") from error
    return [*settings.get("base", []), torch_requirement(torch.__version__)]

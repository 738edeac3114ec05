"""Wheel metadata: require the oldest torch whose stable ABI the library uses.

The compiled library is built on torch's stable ABI (``torch/csrc/stable``
and the C shims) for ``TORCH_TARGET_VERSION`` = :data:`MIN_TORCH_VERSION`,
and links no C++ symbol of libtorch, so one wheel loads into every torch from
that version on: the wheel requires ``torch>=<MIN_TORCH_VERSION>``. An
installed torch that satisfies it (a CUDA build included) is never replaced
by pip. CMakeLists.txt reads :data:`MIN_TORCH_VERSION` from this file, so the
target version and the requirement cannot drift apart.

scikit-build-core calls :func:`dynamic_metadata` for the ``dependencies``
field (``[tool.scikit-build.metadata.dependencies]`` in pyproject.toml); the
table's ``base`` list holds the other requirements.
"""

from __future__ import annotations

import re
from typing import Any

#: The oldest torch the library loads into (its stable ABI's target version).
MIN_TORCH_VERSION = "2.10"


def torch_requirement(minimum: str = MIN_TORCH_VERSION) -> str:
    """``torch>=<major>.<minor>`` for a version string such as ``2.10``."""
    match = re.match(r"(\d+)\.(\d+)", minimum)
    if match is None:
        raise ValueError(f"cannot read a major.minor version from {minimum!r}")
    return f"torch>={match.group(1)}.{match.group(2)}"


def dynamic_metadata(field: str, settings: dict[str, Any], project: Any = None) -> list[str]:
    if field != "dependencies":
        raise ValueError(f"torch_pin provides 'dependencies', not {field!r}")
    unknown = set(settings) - {"base"}
    if unknown:
        raise ValueError(f"torch_pin takes only a 'base' list, got {sorted(unknown)}")
    return [*settings.get("base", []), torch_requirement()]

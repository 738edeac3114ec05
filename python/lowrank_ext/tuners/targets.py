"""Which modules of a model an adapter config targets."""

from __future__ import annotations

import re
import warnings
from typing import Iterator, Optional, Sequence, Union

from torch import nn

from ..nn import AdapterLayer, NF4Linear, is_transformers_conv1d

TargetSpec = Optional[Union[list[str], str]]
ALL_LINEAR = "all-linear"


def is_linear_like(module: nn.Module) -> bool:
    """Linear layers an ``"all-linear"`` spec covers: nn.Linear, Conv1D, NF4Linear."""
    return isinstance(module, (nn.Linear, NF4Linear)) or is_transformers_conv1d(module)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module an adapter could wrap.

    An existing adapter layer is yielded (under its own path) but not its
    insides, so a second adapter is added to it rather than nested.
    """
    skip_prefixes: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(prefix) for prefix in skip_prefixes):
            continue
        if isinstance(module, AdapterLayer) or type(module).__name__ == "ModulesToSave":
            skip_prefixes.append(path + ".")
        yield path, module


def output_head(model: nn.Module) -> Optional[nn.Module]:
    """The model's output head (``get_output_embeddings()``) when it has one."""
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        return getter()
    except (AttributeError, NotImplementedError):
        return None


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def bypassed_linears(model: nn.Module) -> list[str]:
    """Paths of Linear layers whose owner reads their weight directly, so a
    layer put in their place is never called: every ``nn.MultiheadAttention``'s
    ``out_proj`` (PEFT wraps it under ``all-linear``, to no effect)."""
    return [f"{path}.out_proj" if path else "out_proj" for path, module in model.named_modules()
            if isinstance(module, nn.MultiheadAttention)]


_BYPASS_REASON = ("nn.MultiheadAttention reads out_proj.weight directly, so an adapter or "
                  "replacement there would have no effect")


def _drop_bypassed(model: nn.Module, found: list[str], field_name: str, spec,
                   require_all: bool) -> list[str]:
    """``found`` without :func:`bypassed_linears`: a warning where ``spec`` is
    ``"all-linear"`` or the caller is lenient (loading a saved adapter), else
    ``ValueError``."""
    bypassed = set(bypassed_linears(model))
    dropped = [path for path in found if path in bypassed]
    if not dropped:
        return found
    if require_all and spec not in (None, ALL_LINEAR):
        raise ValueError(f"{field_name} selects {dropped}: {_BYPASS_REASON}; leave them out")
    warnings.warn(f"{field_name} leaves out {dropped}: {_BYPASS_REASON}", UserWarning,
                  stacklevel=4)
    return [path for path in found if path not in bypassed]


def match_targets(model: nn.Module, spec: TargetSpec, field_name: str = "target_modules",
                  require_all: bool = True, exclude: Sequence[str] = ()) -> list[str]:
    """Paths of the modules ``spec`` selects, in model order.

    ``spec`` is a list (entries match a path exactly or as a ``.``-separated
    suffix), a regex string (full match on the path), or ``"all-linear"``
    (None means the same). Paths :func:`is_excluded` by ``exclude`` (the
    config's ``modules_to_save``) are never selected, as in PEFT.

    Raises ``ValueError`` naming ``field_name`` when nothing matches, or (with
    ``require_all``) when a list entry matches nothing; without it, unmatched
    list entries only warn.
    """
    head = output_head(model)
    every = list(candidate_modules(model))
    candidates = [(path, module) for path, module in every if not is_excluded(path, exclude)]
    if spec is None or spec == ALL_LINEAR:
        found = [path for path, module in candidates
                 if is_linear_like(_base_of(module)) and _base_of(module) is not head
                 and module is not head]
        found = _drop_bypassed(model, found, field_name, spec, require_all)
        if not found:
            raise ValueError(f"{field_name}='all-linear' found no Linear/Conv1D layer "
                             "in the model (besides its output head and modules_to_save)")
        return found
    if isinstance(spec, str):
        found = _drop_bypassed(model, [path for path, _ in candidates
                                       if re.fullmatch(spec, path)], field_name, spec, require_all)
        if not found:
            raise ValueError(f"{field_name} regex {spec!r} matches no module of the model"
                             + (" outside modules_to_save" if exclude else ""))
        return found
    # An entry that names only modules_to_save modules is not unknown (PEFT
    # accepts it and leaves those modules to modules_to_save).
    kept = {path for path, _ in candidates}
    found = []
    used = set()
    for path, _ in every:
        for name in spec:
            if path == name or path.endswith("." + name):
                if path in kept:
                    found.append(path)
                used.add(name)
                break
    unknown = [name for name in spec if name not in used]
    if (require_all and unknown) or not found:
        available = sorted({path.rsplit(".", 1)[-1] for path, module in candidates
                            if is_linear_like(_base_of(module))})
        raise ValueError(f"{field_name} entries {unknown or list(spec)} match no module of "
                         f"the model{' outside modules_to_save' if exclude else ''}; linear "
                         f"layer names it has: {available}")
    if unknown:
        warnings.warn(f"{field_name} entries {unknown} match no module of the model; "
                      "they are ignored", UserWarning, stacklevel=3)
    found = _drop_bypassed(model, found, field_name, spec, require_all)
    if not found:
        raise ValueError(f"{field_name} {list(spec)} selects no module an adapter could act on")
    return found


def is_excluded(path: str, modules_to_save: Sequence[str]) -> bool:
    """True when ``path`` is (inside) a module ``modules_to_save`` names: a whole
    path component sequence matching an entry (PEFT's rule; entries are regexes)."""
    return any(re.match(rf"(^|.*\.){name}($|\..*)", path) for name in modules_to_save)


def match_modules_to_save(model: nn.Module, names: Sequence[str],
                          require_all: bool = True, optional: Sequence[str] = ()) -> list[str]:
    """Paths ``modules_to_save`` wraps: every module whose path ends with an
    entry (PEFT's plain suffix rule, so ``"norm"`` also selects
    ``input_layernorm``), outermost first; none inside an adapter layer.

    Raises ``ValueError`` (only with ``require_all``) when an entry not in
    ``optional`` matches nothing; otherwise, as PEFT, unmatched entries are
    ignored (PEFT's classifier adapters list both ``classifier`` and ``score``).
    """
    found: list[str] = []
    used = set()
    for path, _ in candidate_modules(model):
        if any(path.startswith(outer + ".") for outer in found):
            continue
        hits = [name for name in names if path.endswith(name)]
        if hits:
            found.append(path)
            used.update(hits)
    unknown = [name for name in names if name not in used and name not in optional]
    if require_all and unknown:
        raise ValueError(f"modules_to_save entries {unknown} match no module of the model")
    return found


def get_submodule_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the module at ``path``."""
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def warn_tied_merges(model: nn.Module, layers: Iterator[tuple[str, nn.Module]],
                     adapter_names: Sequence[str]) -> None:
    """Warn for every adapter layer about to merge ``adapter_names`` whose base
    weight is also another module's (tied input/output embeddings): merging
    changes that module too, unlike the unmerged adapter (PEFT warns too)."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(path)
    for path, layer in layers:
        if not any(name in layer.adapter_names for name in adapter_names):
            continue
        weight = layer.base_layer._parameters.get("weight")
        others = [other for other in owners.get(id(weight), [])
                  if other != f"{path}.base_layer"] if weight is not None else []
        if others:
            warnings.warn(f"merging into {path!r} also changes {others}, which share its weight "
                          "(tied embeddings), so the merged model differs from the unmerged "
                          "one; load the model with tie_word_embeddings=False to merge safely",
                          UserWarning, stacklevel=3)

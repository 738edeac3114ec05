"""Adapter configurations, with PEFT's field names so PEFT configs carry over."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch

from ..nn.lora import validate_adapter_arguments

TargetSpec = Optional[Union[list[str], str]]
_BIAS_MODES = ("none", "all", "lora_only")
_INIT_CHOICES = (True, False, "default", "gaussian", "pissa")
# Keyword aliases accepted by the constructors (the layer-level names).
_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"}
# PEFT options (LoraConfig / AdaLoraConfig fields) this library does not
# implement: an adapter that sets one is refused on load, by name, unless the
# value is one of the neutral ones listed (PEFT's default and equivalents), or
# the config class loading it reads the option (LoRAConfig reads use_dora;
# AdaLoRA refuses it, as PEFT does).
_UNSUPPORTED_PEFT_OPTIONS = {
    "use_dora": ((False, None), "DoRA (weight-decomposed LoRA) with this adapter type"),
    "lora_bias": ((False, None), "a trained lora_B bias"),
    "kasa_config": ((None,), "KaSA (knowledge-aware singular-value adaptation)"),
    "velora_config": ((None,), "VeLoRA (compressed activations in the backward pass)"),
    "monteclora_config": ((None,), "MonteCLoRA (Monte Carlo sampled adapters)"),
    "use_bdlora": ((None, False), "BD-LoRA (block-diagonal factors)"),
    "arrow_config": ((None,), "Arrow routing among adapters"),
    "alora_invocation_tokens": ((None,), "aLoRA (activated LoRA)"),
    "trainable_token_indices": ((None,), "trainable tokens"),
    "target_parameters": ((None, []), "adapters on nn.Parameter targets"),
    "layers_to_transform": ((None,), "adapting only some layer indices"),
    "layers_pattern": ((None,), "adapting only some layer indices"),
    "exclude_modules": ((None,), "exclude_modules target exclusion"),
    "layer_replication": ((None,), "layer replication"),
    "use_qalora": ((False, None), "QALoRA (quantization-aware pooling)"),
    "megatron_config": ((None,), "Megatron parallel layers"),
    "ensure_weight_tying": ((False, None), "adapters tied between tied layers"),
}
# PEFT fields that never change what a saved adapter computes: bookkeeping,
# runtime settings, and the settings of inits (their factors are stored; the
# inits that rewrite the base are refused through init_lora_weights).
_IGNORED_PEFT_FIELDS = frozenset({
    "peft_type", "auto_mapping", "peft_version", "revision", "inference_mode",
    "runtime_config", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config"})
# Values an unknown (newer) PEFT option may have and still be left alone.
_UNSET = (None, False, {}, [])


def peft_option_treatment(name: str) -> str:
    """How loading treats PEFT config field ``name``: ``"read"`` (a field of
    :class:`LoRAConfig` or :class:`~lowrank_ext.AdaLoRAConfig`), ``"ignored"``,
    ``"refused"`` (unless neutral) or ``"unknown"``."""
    from .adalora import AdaLoRAConfig

    if name in _UNSUPPORTED_PEFT_OPTIONS and name not in {
            f.name for f in dataclasses.fields(LoRAConfig)}:
        return "refused"
    if name in _IGNORED_PEFT_FIELDS:
        return "ignored"
    if name in {f.name for config in (LoRAConfig, AdaLoRAConfig)
                for f in dataclasses.fields(config)}:
        return "read"
    return "unknown"


def check_peft_options(values: dict[str, Any], read: set[str]) -> None:
    """Raise ``ValueError`` naming the option when an ``adapter_config.json``
    dict sets a PEFT option this library does not implement, or an option it
    does not know (a newer PEFT's) to anything but an unset value."""
    for name, (neutral, feature) in _UNSUPPORTED_PEFT_OPTIONS.items():
        if name in values and values[name] not in neutral and name not in read:
            raise ValueError(f"adapter_config.json sets {name}={values[name]!r}: {feature}, "
                             "which lowrank_ext does not implement")
    for name, value in values.items():
        if name not in read and name not in _IGNORED_PEFT_FIELDS and not any(
                value == unset and type(value) is type(unset) for unset in _UNSET):
            raise ValueError(f"adapter_config.json sets {name}={value!r}, an option lowrank_ext "
                             "does not know (written by a newer PEFT?); it cannot be loaded "
                             "faithfully")


# PEFT's task types, and the heads its task models train whole
# (PeftModelForSequenceClassification & co. add them to modules_to_save,
# which also keeps them out of the targets).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


def task_heads(task_type) -> tuple[str, ...]:
    """The head module names PEFT's ``task_type`` trains as ``modules_to_save``
    (a model has one of them, so none is required to match)."""
    return _TASK_HEADS.get(task_type, ())


def with_task_heads(task_type, modules_to_save):
    """``modules_to_save`` (normalized) plus the heads of ``task_type``, as
    PEFT extends it; raises ``ValueError`` naming task_type for an unknown one."""
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be None or one of PEFT's {TASK_TYPES}, "
                         f"got {task_type!r}")
    modules_to_save = normalized_modules_to_save(modules_to_save)
    heads = [name for name in task_heads(task_type) if name not in (modules_to_save or [])]
    return (modules_to_save or []) + heads if heads else modules_to_save


def normalized_target_modules(target_modules):
    """``target_modules`` as a config stores it: None, a regex / ``"all-linear"``
    string (any case, as PEFT), or a non-empty list of names (sets and tuples
    are sorted into one).

    Raises ``ValueError`` for any other type, an empty list, a non-string
    entry or a regex that does not compile.
    """
    if isinstance(target_modules, (set, tuple)):
        target_modules = sorted(target_modules, key=str)
    if target_modules is not None and not isinstance(target_modules, (str, list)):
        raise ValueError(f"target_modules must be a list of names, a regex string or "
                         f"'all-linear', got {target_modules!r}")
    if isinstance(target_modules, list):
        if not target_modules:
            raise ValueError("target_modules is an empty list; name at least one module")
        _check_names("target_modules", target_modules)
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            return "all-linear"
        _check_regex("target_modules", target_modules)
    return target_modules


def normalized_modules_to_save(modules_to_save):
    """``modules_to_save`` as a config stores it: None or a list of names (a
    single name is put in a list). Raises ``ValueError`` otherwise."""
    if modules_to_save is None:
        return None
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    if isinstance(modules_to_save, (set, tuple)):
        modules_to_save = sorted(modules_to_save, key=str)
    if not isinstance(modules_to_save, list):
        raise ValueError(f"modules_to_save must be a list of module names, got "
                         f"{modules_to_save!r}")
    _check_names("modules_to_save", modules_to_save)
    return modules_to_save


def check_patterns(field_name: str, patterns) -> None:
    """Raise ``ValueError`` naming the field unless ``patterns`` is a dict whose keys compile."""
    if not isinstance(patterns, dict):
        raise ValueError(f"{field_name} must be a dict of {{regex: value}}, got {patterns!r}")
    for key in patterns:
        if not isinstance(key, str):
            raise ValueError(f"{field_name} keys must be strings, got {key!r}")
        _check_regex(f"{field_name} key", key)


def check_flags(config, *names: str) -> None:
    """Raise ``ValueError`` naming the field unless each field is a bool."""
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(config, name)!r}")


def _check_names(field_name: str, names: list) -> None:
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{field_name} entries must be non-empty strings, got {name!r}")
        # modules_to_save entries are regexes where PEFT keeps them out of the targets.
        _check_regex(f"{field_name} entry", name)


def _check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {error}") from None


@dataclass
class LoRAConfig:
    """Settings of one LoRA adapter (field names and defaults as PEFT's ``LoraConfig``).

    Attributes:
        r: rank (positive int). lora_alpha: scale numerator (> 0); scaling is
            ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability in [0, 1) on the adapter input.
        target_modules: a list of module names or name suffixes, a regex
            (full match on the module path), or ``"all-linear"`` (every
            Linear/Conv1D except the output head). None means ``"all-linear"``.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"``
            (train the biases of adapted layers).
        modules_to_save: modules (names or suffixes) trained in full and saved;
            PEFT's ``task_type`` heads are added (``"classifier"`` and
            ``"score"`` for SEQ_CLS / TOKEN_CLS, ``"qa_outputs"`` for QUESTION_ANS).
        rank_pattern / alpha_pattern: ``{regex: value}`` overriding r / alpha
            for modules whose path ends with a match.
        init_lora_weights: True, False, ``"gaussian"`` or ``"pissa"`` (PEFT's
            ``"pissa_niter_<n>"`` runs as exact PiSSA); ``"loftq"`` on
            :class:`QLoRAConfig` only (see there).
        fan_in_fan_out: weights stored ``[in, out]``; detected for Conv1D anyway.
        base_model_name_or_path: recorded in ``adapter_config.json``.
        task_type: None or one of PEFT's task types (recorded, and its head
            trained whole, as PEFT does).
        use_dora: DoRA (weight-decomposed LoRA; PEFT's name and file format:
            a ``lora_magnitude_vector`` per adapted layer) on Linear, Conv1D,
            Conv1d/2d/3d (not grouped), Embedding and NF4 (QDoRA) targets.

    Raises ``ValueError`` naming the field for an out-of-range value.
    """

    peft_type: ClassVar[str] = "LORA"
    # Whether init_lora_weights="loftq" is accepted (it quantizes the base: QLoRA only).
    _takes_loftq: ClassVar[bool] = False

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: TargetSpec = None
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_lora_weights: Union[bool, str] = True
    fan_in_fan_out: bool = False
    base_model_name_or_path: Optional[str] = None
    task_type: Optional[str] = None
    use_dora: bool = False

    def __post_init__(self):
        validate_adapter_arguments(self.r, self.lora_alpha, self.lora_dropout)
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"bias must be one of {_BIAS_MODES}, got {self.bias!r}")
        if _is_loftq(self.init_lora_weights) and not self._takes_loftq:
            raise ValueError("init_lora_weights='loftq' chooses the 4-bit base and the adapter "
                             "together, so it needs a quantized model: use QLoRAConfig / "
                             "QLoRAModule (or QLoRALinear.from_linear(init='loftq')), not "
                             f"{type(self).__name__}")
        if self.init_lora_weights not in _INIT_CHOICES and not _is_pissa(
                self.init_lora_weights) and not (_is_loftq(self.init_lora_weights)
                                                 and self._takes_loftq):
            raise ValueError(f"init_lora_weights must be one of {_INIT_CHOICES} (or PEFT's "
                             f"'pissa_niter_<n>'), got {self.init_lora_weights!r}")
        self.target_modules = normalized_target_modules(self.target_modules)
        self.modules_to_save = with_task_heads(self.task_type, self.modules_to_save)
        if self.use_dora is None:  # PEFT writes null for "off" in some versions
            self.use_dora = False
        check_flags(self, "use_rslora", "fan_in_fan_out", "use_dora")
        check_patterns("rank_pattern", self.rank_pattern)
        check_patterns("alpha_pattern", self.alpha_pattern)
        for pattern, rank in self.rank_pattern.items():
            try:
                validate_adapter_arguments(rank, 1, 0.0)
            except ValueError:
                raise ValueError(f"rank_pattern[{pattern!r}] must be a positive integer, "
                                 f"got {rank!r}") from None
        for pattern, alpha in self.alpha_pattern.items():
            if not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
                raise ValueError(f"alpha_pattern[{pattern!r}] must be > 0, got {alpha!r}")

    @classmethod
    def from_kwargs(cls, config: Optional["LoRAConfig"] = None, **kwargs: Any):
        """``config`` (or defaults) with ``kwargs`` applied; accepts ``alpha``, ``dropout``, ``init``.

        Raises ``TypeError`` for an unknown keyword.
        """
        for alias, name in _ALIASES.items():
            if alias in kwargs:
                if name in kwargs:
                    raise TypeError(f"pass either {alias!r} or {name!r}, not both")
                kwargs[name] = kwargs.pop(alias)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no option(s) {unknown}")
        if config is None:
            return cls(**kwargs)
        if not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        return dataclasses.replace(config, **kwargs)

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """The (r, alpha) for one module, after ``rank_pattern`` / ``alpha_pattern``."""
        rank = _pattern_value(self.rank_pattern, module_path, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_path, self.lora_alpha)
        return rank, alpha

    # ------------------------------------------------------------ PEFT format

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT reads (only its own fields)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(LoRAConfig)}
        values["peft_type"] = self.peft_type
        values["inference_mode"] = True
        if isinstance(values["init_lora_weights"], str) and values["init_lora_weights"] in (
                "default", "loftq"):
            # A LoftQ adapter is saved as a plain one, as PEFT's LoftQ example
            # does ("don't apply LoftQ when loading again"): the stored factors
            # fit the LoftQ base, which loading must not recompute.
            values["init_lora_weights"] = True
        return values

    @classmethod
    def from_peft_dict(cls, values: dict[str, Any]) -> "LoRAConfig":
        """Parse an ``adapter_config.json`` dict; PEFT fields this library does not
        use are ignored unless they change the computation, which raises ``ValueError``."""
        peft_type = values.get("peft_type")
        if peft_type != cls.peft_type:
            raise ValueError(f"adapter_config.json has peft_type {peft_type!r}; "
                             f"{cls.__name__} loads {cls.peft_type!r}")
        names = {f.name for f in dataclasses.fields(LoRAConfig)}
        check_peft_options(values, names)
        kept = {k: v for k, v in values.items() if k in names}
        if "init_lora_weights" in kept:
            kept["init_lora_weights"] = init_for_loading(kept["init_lora_weights"])
        return LoRAConfig(**kept)


@dataclass
class QLoRAConfig(LoRAConfig):
    """:class:`LoRAConfig` plus how the frozen base is quantized to NF4.

    Attributes:
        blocksize: NF4 block size (power of two, 32..4096).
        double_quant: quantize the block scales to 8 bits too.
        compute_dtype: dtype the 4-bit matmuls run in (None: the input's).
        quantize_modules: which Linear/Conv1D layers to store in 4 bits:
            ``"all-linear"`` (default, as loading a model in 4-bit does; the
            output head stays dense) or a target spec like ``target_modules``;
            adapted linear layers are quantized too, except those a Hugging Face
            model keeps in full precision (``_keep_in_fp32_modules``);
            ``modules_to_save`` modules never are (they are trained whole).
        loftq_config: with ``init_lora_weights="loftq"``, a
            :class:`~lowrank_ext.LoftQConfig`, PEFT's ``LoftQConfig`` or a dict
            (``loftq_bits`` must be 4, ``loftq_iter`` >= 1; default
            ``LoftQConfig()``), stored as a :class:`~lowrank_ext.LoftQConfig`.
            LoftQ (Li et al. 2023) then quantizes every targeted ``nn.Linear``
            / ``Conv1D`` together with its adapter's starting factors, so that
            ``Q + scaling * B @ A`` starts close to the dense weight (see
            :mod:`lowrank_ext.loftq`). Targets that stay dense (embeddings,
            convolutions, ``_keep_in_fp32_modules``) take the default init:
            they have no quantization error to absorb. Ignored, with a
            warning, for any other init (as PEFT).
    """

    _takes_loftq: ClassVar[bool] = True

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Optional[torch.dtype] = None
    quantize_modules: TargetSpec = "all-linear"
    loftq_config: Any = None

    def __post_init__(self):
        super().__post_init__()
        from ..loftq import LoftQConfig

        if _is_loftq(self.init_lora_weights):
            self.loftq_config = LoftQConfig.from_any(
                {} if self.loftq_config is None else self.loftq_config)
        elif self.loftq_config is not None and self.loftq_config != {}:
            warnings.warn("loftq_config is ignored: init_lora_weights is "
                          f"{self.init_lora_weights!r}, not 'loftq'", UserWarning, stacklevel=3)
            self.loftq_config = None
        else:
            self.loftq_config = None
        if not isinstance(self.blocksize, int) or self.blocksize < 32 or self.blocksize > 4096 \
                or self.blocksize & (self.blocksize - 1):
            raise ValueError(f"blocksize must be a power of two in [32, 4096], "
                             f"got {self.blocksize!r}")
        if self.compute_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be None, float32, bfloat16 or float16, "
                             f"got {self.compute_dtype!r}")


def _is_loftq(init) -> bool:
    return isinstance(init, str) and init == "loftq"


def _is_pissa(init) -> bool:
    return init == "pissa" or (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init)
                               is not None)


def layer_init(init):
    """The init a layer runs for a config's ``init_lora_weights``: PEFT's fast
    ``pissa_niter_<n>`` (randomized SVD) runs as exact PiSSA; ``"loftq"``
    creates the layer with the default init, its factors set afterwards by
    :class:`~lowrank_ext.QLoRAModule` (from the dense weight it quantizes)."""
    if _is_loftq(init):
        return True
    return "pissa" if _is_pissa(init) else init


# PEFT inits that only choose the first factors and leave the base weight as it was.
_BASE_KEEPING_INITS = ("orthogonal", "eva", "mica")


def init_for_loading(init):
    """A saved adapter's ``init_lora_weights`` as loading needs it.

    The stored factors replace the initial ones, so an init that leaves the
    base alone ("orthogonal", "eva", "mica": MiCA's frozen lora_B is then
    trainable like any factor) loads as a plain one; PiSSA (any variant) is
    kept, its base rebuilt on load. LoftQ loads as a plain adapter, with a
    warning: its factors fit the LoftQ-quantized base only (with
    ``loftq_iter=1`` that is plain NF4 of the dense weights, which
    :class:`~lowrank_ext.QLoRAModule` builds; with more iterations the base
    saved with it). PEFT's other named inits rewrite the base in ways this
    library cannot rebuild (olora, corda, lora_ga) and raise ``ValueError``.
    """
    if _is_pissa(init):
        return "pissa"
    if _is_loftq(init):
        warnings.warn("init_lora_weights='loftq': the adapter loads as a plain one; its "
                      "factors fit only the LoftQ-quantized base they were trained on (with "
                      "loftq_iter=1 the plain NF4 base QLoRAModule makes of the original dense "
                      "model, with the same blocksize and double_quant; with more iterations "
                      "the quantized base saved with it)", UserWarning, stacklevel=3)
        return True
    if init in _INIT_CHOICES:
        return init
    if init in _BASE_KEEPING_INITS:
        return True
    if isinstance(init, str):
        raise ValueError(f"init_lora_weights={init!r}: this adapter was trained on a base that "
                         "its init rewrote, which lowrank_ext cannot rebuild; convert it to a "
                         "plain LoRA adapter in PEFT first (save_pretrained with "
                         "path_initial_model_for_weight_conversion)")
    raise ValueError(f"init_lora_weights must be one of {_INIT_CHOICES}, got {init!r}")


def _pattern_value(patterns: dict, module_path: str, default):
    # A pattern applies when the module path ends with a (regex) match that
    # starts at a path component boundary; the first such pattern wins.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default

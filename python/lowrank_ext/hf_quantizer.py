"""Load Hugging Face models straight into NF4: ``quantization_config=NF4Config()``.

``AutoModelForCausalLM.from_pretrained(path, quantization_config=NF4Config())``
builds the model's linear layers as :class:`~lowrank_ext.nn.NF4Linear`
skeletons on the meta device, then quantizes each weight as transformers
reads it from the checkpoint, so the dense model never exists in memory
whole. The codes are those of :meth:`NF4Weight.from_float` on the
checkpoint's weight (in the load dtype), bit for bit.

``save_pretrained`` writes the layers under bitsandbytes' ``Linear4bit`` keys
and the config under ``quant_method: "lowrank_nf4"``; ``from_pretrained`` of
that directory rebuilds the same codes without requantizing, once this module
is imported (``lowrank_ext.NF4Config`` imports it). ``QLoRAModule`` takes the
loaded ``NF4Linear`` layers as they are.

Both classes reach transformers through its public registration points
(``register_quantization_config`` / ``register_quantizer``) and the weight
conversion ops its loader runs per tensor (transformers >= 5).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

try:
    from transformers.core_model_loading import ConversionOps
except ImportError as error:  # transformers 4.x loads without per-tensor conversion ops
    raise ImportError("lowrank_ext.NF4Config needs transformers >= 5: "
                      "pip install -U 'transformers>=5'") from error
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from .nn import NF4Linear, is_transformers_conv1d
from .quant import NESTED_BLOCKSIZE, NF4Weight

__all__ = ["NF4Config", "NF4HfQuantizer", "QUANT_METHOD"]

QUANT_METHOD = "lowrank_nf4"

# The checkpoint keys of one quantized weight (bitsandbytes' Linear4bit names).
_WEIGHT_KEYS = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4")
_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}


@register_quantization_config(QUANT_METHOD)
class NF4Config(QuantizationConfigMixin):
    """Options for loading a model into :class:`~lowrank_ext.nn.NF4Linear` layers.

    Args:
        blocksize: elements per NF4 block (power of two, 32..4096; bitsandbytes uses 64).
        double_quant: quantize the block scales to 8 bits too (bitsandbytes'
            ``bnb_4bit_use_double_quant`` / ``compress_statistics``).
        compute_dtype: dtype the layers compute in (``torch.float32``,
            ``torch.bfloat16``, ``torch.float16`` or its name); ``None``: the
            input's dtype.
        modules_to_not_convert: module names (or patterns, matched as
            transformers matches bitsandbytes' ``llm_int8_skip_modules``) kept
            dense. ``None``: the output head and any weight tied to it, as
            bitsandbytes does.

    Raises ``ValueError`` for a bad blocksize or compute dtype.
    """

    def __init__(self, blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: Optional[torch.dtype | str] = None,
                 modules_to_not_convert: Optional[list[str]] = None,
                 quant_method: str = QUANT_METHOD):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"NF4Config is quant_method {QUANT_METHOD!r}, got {quant_method!r}")
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not \
                32 <= blocksize <= 4096 or blocksize & (blocksize - 1):
            raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize!r}")
        if isinstance(compute_dtype, str):
            if compute_dtype not in _COMPUTE_DTYPES:
                raise ValueError(f"compute_dtype must be one of {sorted(_COMPUTE_DTYPES)}, "
                                 f"got {compute_dtype!r}")
            compute_dtype = _COMPUTE_DTYPES[compute_dtype]
        elif compute_dtype is not None and compute_dtype not in _COMPUTE_DTYPES.values():
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, "
                             f"got {compute_dtype!r}")
        self.quant_method = QUANT_METHOD
        self.blocksize = blocksize
        self.double_quant = bool(double_quant)
        self.compute_dtype = compute_dtype
        self.modules_to_not_convert = (None if modules_to_not_convert is None
                                       else list(modules_to_not_convert))

    def to_dict(self) -> dict[str, Any]:
        # config.json holds JSON: the dtype goes by name.
        return {"quant_method": QUANT_METHOD, "blocksize": self.blocksize,
                "double_quant": self.double_quant,
                "compute_dtype": None if self.compute_dtype is None
                else str(self.compute_dtype).removeprefix("torch."),
                "modules_to_not_convert": self.modules_to_not_convert}


def _discard_companion_keys(missing_keys: Optional[set], layer_path: str) -> None:
    # The loader tracks every state-dict key of the skeleton; the quantized
    # weight's scale keys are filled here, not by the loader's own copy.
    if missing_keys is not None:
        for key in _WEIGHT_KEYS[1:]:
            missing_keys.discard(f"{layer_path}.{key}")


class _QuantizerOp(ConversionOps):
    def __init__(self, hf_quantizer: "NF4HfQuantizer"):
        # transformers reads ``hf_quantizer`` on an op to leave its tensors' dtype alone.
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo):
        # The loader deep-copies a converter for each layer; every copy must
        # report its weights to the one quantizer that finishes the loading.
        return type(self)(self.hf_quantizer)


class _QuantizeOnLoad(_QuantizerOp):
    """One checkpoint weight (dense, as it arrives) -> NF4 codes for its skeleton layer."""

    def convert(self, input_dict, model=None, missing_keys=None, **kwargs):
        result = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            layer, _ = get_module_from_name(model, name)
            if layer.source_class is not nn.Linear:  # Conv1D stores [in, out]
                value = value.t()
            weight = NF4Weight.from_float(value.contiguous(), self.hf_quantizer.quantization_config
                                          .blocksize, self.hf_quantizer.quantization_config
                                          .double_quant)
            layer_path = name.rpartition(".")[0]
            self.hf_quantizer.loaded_weights[layer_path] = weight
            _discard_companion_keys(missing_keys, layer_path)
            result[name] = weight.packed.reshape(-1, 1)
        return result


class _LoadQuantized(_QuantizerOp):
    """A saved layer's bitsandbytes-format tensors -> its NF4 codes, without requantizing."""

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        tensors = {key: value[0] if isinstance(value, list) else value
                   for key, value in input_dict.items()}
        if set(tensors) == {"weight"}:
            # A dense weight (norms, embeddings, layers kept dense) matched by
            # the same key pattern: cast as the loader casts unquantized weights.
            target = model.get_parameter_or_buffer(full_layer_name)
            value = tensors["weight"]
            if value.is_floating_point() and target.is_floating_point():
                value = value.to(target.dtype)
            return {"weight": value}
        weight = NF4Weight.from_state_dict(tensors, "weight")
        layer_path = full_layer_name.rpartition(".")[0]
        self.hf_quantizer.loaded_weights[layer_path] = weight
        _discard_companion_keys(missing_keys, layer_path)
        return {"weight": weight.packed.reshape(-1, 1)}

    @property
    def reverse_op(self) -> ConversionOps:
        return _SaveAsIs()


class _SaveAsIs(ConversionOps):
    def convert(self, input_dict, **kwargs):
        return input_dict


def _skeleton(module: nn.Module, config: NF4Config) -> NF4Linear:
    """An NF4Linear of ``module``'s shape on the meta device (no memory, no quantization)."""
    if isinstance(module, nn.Linear):
        out_features, in_features = module.out_features, module.in_features
    else:  # Conv1D: weight [in, out]
        in_features, out_features = module.weight.shape
    numel = out_features * in_features
    blocks = -(-numel // config.blocksize)
    with torch.device("meta"):
        scales_dtype = torch.uint8 if config.double_quant else torch.float32
        weight = NF4Weight(
            packed=torch.empty((numel + 1) // 2, dtype=torch.uint8),
            absmax=torch.empty(blocks, dtype=scales_dtype),
            shape=torch.Size((out_features, in_features)), dtype=module.weight.dtype,
            blocksize=config.blocksize,
            nested_absmax=torch.empty(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32)
            if config.double_quant else None,
            nested_code=torch.empty(256, dtype=torch.float32) if config.double_quant else None)
        layer = NF4Linear(weight, module.bias, config.compute_dtype)
    layer.source_class = type(module)
    return layer


@register_quantizer(QUANT_METHOD)
class NF4HfQuantizer(HfQuantizer):
    """transformers' side of :class:`NF4Config` (built by ``from_pretrained``, not by users)."""

    requires_calibration = False
    quantization_config: NF4Config
    serialized_names = {"weight": list(_WEIGHT_KEYS)}

    def __init__(self, quantization_config: NF4Config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        # Layer path -> NF4Weight read or quantized during loading. The loader
        # sets the codes (the ``weight`` buffer) itself but afterwards
        # replaces every non-persistent buffer, which the scales are, with an
        # empty one; they are put in place once loading is over.
        self.loaded_weights: dict[str, NF4Weight] = {}

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("NF4Config quantizes layers in memory; a device_map with 'disk' "
                             "offload is not supported")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        # Saved codes load as they are: only a dense checkpoint is quantized.
        if self.pre_quantized:
            return False
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, NF4Linear) and name == "weight"

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    def get_load_operations(self) -> dict:
        return {"deserialize": _LoadQuantized}

    def _process_model_before_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        keep_dense = list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(
            getattr(model, "_keep_in_fp32_modules_strict", None) or [])
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, config.modules_to_not_convert, keep_dense)
        for path, module in list(model.named_modules()):
            if not (type(module) is nn.Linear or is_transformers_conv1d(module)):
                continue
            if not should_convert_module(path, self.modules_to_not_convert):
                continue
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, _skeleton(module, config))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for path, weight in self.loaded_weights.items():
            model.get_submodule(path).set_quantized_weight(weight)
        self.loaded_weights.clear()
        for module in model.modules():
            # The loader makes every floating tensor it sets a trainable
            # parameter; an NF4Linear's bias is frozen (QLoRA trains adapters).
            if isinstance(module, NF4Linear) and module.bias is not None:
                module.bias.requires_grad_(False)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        for path, module in list(model.named_modules()):
            if isinstance(module, NF4Linear):
                parent, _, name = path.rpartition(".")
                dense = module.to_dense()
                setattr(model.get_submodule(parent), name,
                        dense if dtype is None else dense.to(dtype))
        return model

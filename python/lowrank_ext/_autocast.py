"""Autocast (torch.autocast / AMP) kernels of every op, for CPU and CUDA.

Without them the dispatcher falls through the Autocast key to the backend
kernel with autocast still on, so the ATen GEMMs inside the fused ops cast
some operands and not others ("self and mat2 must have the same dtype").

Forward ops (nf4_linear, lora_linear, qlora_linear, multi_lora_linear)
follow torch's policy for linear: every floating activation and weight
argument (named in _CAST_ARGUMENTS) on the autocast device is cast to the
autocast dtype (float64 is left alone, as torch leaves it), and the op runs
below autocast. The casts sit above autograd, so a float32 trainable factor is
cast differentiably: its gradient comes back float32 through the cast, and the
parameter itself stays float32. NF4 scales (absmax, nested_absmax,
nested_code) and multi_lora's scalings are part of the quantized format or
float32 by contract, never cast (torch.library.register_autocast would cast
them too); the NF4 weight is decoded into the (cast) input's dtype by the op.

The other ops (dropout, the backward ops) cast nothing (dropout runs in its
input's dtype, as torch's does) and run below autocast, so their own GEMMs see
the dtypes they were given (a backward called inside an autocast region).

The Autocast keys are in the dispatch key set only inside an enabled autocast
region, so these Python kernels cost nothing elsewhere.
"""

from __future__ import annotations

import torch

_CAST_ARGUMENTS = frozenset(
    ("input", "lora_input", "weight", "bias", "lora_A", "lora_B", "base_output"))
_CASTING_OPS = ("nf4_linear", "lora_linear", "qlora_linear", "multi_lora_linear")
_PASSING_OPS = ("dropout", "nf4_linear_grad_input", "lora_linear_backward",
                "qlora_linear_backward", "multi_lora_linear_backward")
_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}

_library = torch.library.Library("lowrank_ext", "IMPL")


def _castable(value, device_type: str) -> bool:
    return (isinstance(value, torch.Tensor) and value.is_floating_point()
            and value.dtype != torch.float64 and value.device.type == device_type)


def _make_kernel(op, device_type: str, cast: bool):
    excluded = torch._C.DispatchKeySet(_KEYS[device_type])
    cast_positions = tuple(position for position, argument in enumerate(op._schema.arguments)
                           if argument.name in _CAST_ARGUMENTS) if cast else ()

    def kernel(*args):
        if cast_positions:
            dtype = torch.get_autocast_dtype(device_type)
            args = list(args)
            for position in cast_positions:
                value = args[position]
                if _castable(value, device_type) and value.dtype != dtype:
                    args[position] = value.to(dtype)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args)

    return kernel


# Registered for CUDA in every build: the key exists without a GPU, and a CUDA
# build's kernels then need nothing more.
for _device_type, _key in _KEYS.items():
    for _names, _cast in ((_CASTING_OPS, True), (_PASSING_OPS, False)):
        for _name in _names:
            _op = getattr(torch.ops.lowrank_ext, _name).default
            _library.impl(_name, _make_kernel(_op, _device_type, _cast), _key)
del _device_type, _key, _names, _cast, _name, _op

"""NF4 weights: packed 4-bit codes plus (optionally double-quantized) block scales.

The layout and numerics are those of bitsandbytes' NF4 (see docs/numerics.md), and
:meth:`NF4Weight.state_dict` / :meth:`NF4Weight.from_state_dict` use its
serialization keys, so checkpoints move both ways between the two libraries.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from . import ops

# The 16 NF4 levels, index = code; the one Python mirror of csrc/core/nf4.h.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NESTED_BLOCKSIZE = 256
_STATE_KEY = "quant_state.bitsandbytes__nf4"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def nf4_codebook(device=None) -> torch.Tensor:
    """The NF4 codebook as a float32 tensor of 16 values."""
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


def dynamic_map(device=None) -> torch.Tensor:
    """The signed 8-bit dynamic code map used for double quantization.

    256 sorted float32 values: for each decade 10^(e-6), e = 0..6, the 2^e
    midpoints of an even split of [0.1, 1] (positive and negative), plus 0
    and 1.0 — the map bitsandbytes stores as ``nested_quant_map``.
    """
    values: list[float] = []
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (exponent - 6)
        values += (decade * midpoints).tolist()
        values += (-decade * midpoints).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


# torch's CPU sum reduces fewer elements than its parallel grain (32768) on
# one thread, in an order that depends neither on the thread count nor on the
# CPU's vector width; larger inputs are split across threads.
_SERIAL_SUM_LENGTH = 32767


def mean_block_scale(absmax: torch.Tensor) -> torch.Tensor:
    """Double quantization's offset: the mean of the fp32 block scales, a 0-dim CPU tensor.

    Computed on the same fixed path whatever device ``absmax`` lives on, so
    a weight quantized on a GPU equals the one quantized on the CPU bit for
    bit: the scales are copied to the CPU, summed by torch in chunks of
    ``_SERIAL_SUM_LENGTH`` (each reduced on one thread, in torch's fixed
    order), the chunk sums likewise until one value remains, and that is
    divided by the count in fp32.

    Up to 32767 blocks (2M elements at blocksize 64) this is exactly
    ``absmax.mean()`` on the CPU, which is bitsandbytes' offset there. Beyond
    that, torch's CPU mean (and so bitsandbytes') depends on the thread count
    and this one may differ from it in the last bits; on a GPU bitsandbytes
    takes the device's ``mean``, whose order differs too. The offset is
    stored with the weight, so checkpoints still load bit-exactly both ways.
    """
    partials = absmax.detach().to("cpu", torch.float32).reshape(-1)
    count = partials.numel()
    while True:
        partials = torch.stack([chunk.sum() for chunk in partials.split(_SERIAL_SUM_LENGTH)])
        if partials.numel() == 1:
            return partials[0] / count


def _check_state_fields(state: dict, state_key: str) -> None:
    """Raise ``ValueError`` naming the field unless the quant state's fields have usable types."""
    shape = state.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape):
        raise ValueError(f"{state_key}: shape must be a list of sizes, got {shape!r}")
    blocksize = state.get("blocksize")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 32 \
            or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"{state_key}: blocksize must be a power of two in [32, 4096], "
                         f"got {blocksize!r}")
    for name in ("nested_offset", "nested_blocksize"):
        value = state.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{state_key}: {name} must be a number, got {value!r}")


@dataclass
class NF4Weight:
    """A tensor stored in NF4 with per-block scales.

    Attributes:
        packed: uint8 ``[ceil(numel/2)]``, element 2i in the high nibble.
        absmax: float32 ``[nblocks]``, or uint8 codes when ``double_quant``.
        shape: the original shape; ``dtype`` the original dtype.
        blocksize: elements per block (power of two, 32..4096).
        nested_absmax: float32 ``[ceil(nblocks/256)]`` (double quant only).
        nested_code: float32 ``[256]`` code map (double quant only).
        offset: mean of the absmax values subtracted before double quantization.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    offset: float = 0.0

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_float(cls, weight: torch.Tensor, blocksize: int = 64,
                   double_quant: bool = True) -> "NF4Weight":
        """Quantize ``weight`` (float32/bfloat16/float16/float64, finite, non-empty).

        A float64 weight is quantized from its float32 rounding (the kernels'
        precision; NF4 keeps far fewer bits) and remembers float64 as its dtype.

        With ``double_quant`` the fp32 block scales are themselves quantized
        to 8 bits in blocks of 256 (QLoRA's double quantization).
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        weight = weight.detach()
        source = weight.float() if weight.dtype == torch.float64 else weight
        packed, absmax = ops.nf4_quantize(source, blocksize)
        result = cls(packed=packed, absmax=absmax, shape=weight.shape, dtype=weight.dtype,
                     blocksize=blocksize)
        if double_quant:
            result._compress_absmax()
        return result

    def _compress_absmax(self) -> None:
        offset = mean_block_scale(self.absmax).to(self.absmax.device)
        if not torch.isfinite(offset):
            # Finite weights near the fp32 limit: the mean of the block scales
            # overflows (bitsandbytes would store an infinite offset).
            raise ValueError("weights too large for double quantization: the mean block scale "
                             "overflows float32; quantize with double_quant=False")
        code = dynamic_map(self.absmax.device)
        codes, nested_absmax = ops.quantize_blockwise_8bit(self.absmax - offset, code,
                                                           NESTED_BLOCKSIZE)
        self.absmax, self.nested_absmax, self.nested_code = codes, nested_absmax, code
        self.offset = offset.item()

    def block_absmax(self) -> torch.Tensor:
        """The float32 per-block scales (decoding double quantization)."""
        if not self.double_quant:
            return self.absmax
        decoded = ops.dequantize_blockwise_8bit(self.absmax, self.nested_absmax,
                                                self.nested_code, NESTED_BLOCKSIZE)
        return decoded + self.offset

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense tensor in ``dtype`` (default: the original dtype).

        float64 holds the decoded fp32 values exactly: decoded in fp32, then cast.
        """
        dtype = dtype or self.dtype
        decode = torch.float32 if dtype == torch.float64 else dtype
        dense = ops.nf4_dequantize(self.packed, self.block_absmax(), list(self.shape),
                                   self.blocksize, decode)
        return dense.to(dtype)

    def to(self, device) -> "NF4Weight":
        """A copy on ``device`` (the same object if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.dtype,
                         self.blocksize, move(self.nested_absmax), move(self.nested_code),
                         self.offset)

    def nbytes(self) -> int:
        """Bytes held by the quantized data and scales."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def linear_args(self) -> tuple:
        """The NF4 weight argument group of :func:`lowrank_ext.ops.nf4_linear` (2-D weights)."""
        if len(self.shape) != 2:
            raise ValueError(f"linear ops need a 2-D weight, this one has shape {tuple(self.shape)}")
        return (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset,
                self.shape[0], self.shape[1], self.blocksize)

    # ------------------------------------------------------------ serialization

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """Tensors under bitsandbytes' keys: ``{prefix}``, ``{prefix}.absmax``,
        ``{prefix}.quant_map``, ``{prefix}.nested_absmax``,
        ``{prefix}.nested_quant_map``, ``{prefix}.quant_state.bitsandbytes__nf4``."""
        state = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        tensors = {
            prefix: self.packed.reshape(-1, 1),
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": nf4_codebook(self.device),
        }
        if self.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                         nested_offset=self.offset)
            tensors[f"{prefix}.nested_absmax"] = self.nested_absmax
            tensors[f"{prefix}.nested_quant_map"] = self.nested_code
        encoded = json.dumps(state).encode("utf-8")
        tensors[f"{prefix}.{_STATE_KEY}"] = torch.tensor(list(encoded), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor],
                        prefix: str = "weight") -> "NF4Weight":
        """Rebuild from bitsandbytes-format tensors (ours or ``bnb.nn.Linear4bit``'s).

        Raises ``KeyError`` for missing keys and ``ValueError`` for a quant
        state that is not NF4 or whose tensors do not fit its shape.
        """
        state_key = f"{prefix}.{_STATE_KEY}"
        missing = [k for k in (prefix, f"{prefix}.absmax", state_key) if k not in state_dict]
        if missing:
            raise KeyError(f"NF4 state dict lacks {missing}")
        try:
            state = json.loads(bytes(state_dict[state_key].cpu().tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, TypeError) as error:
            raise ValueError(f"{state_key} is not valid JSON: {error}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{state_key} must hold a JSON object, got {type(state).__name__}")
        _check_state_fields(state, state_key)
        if state.get("quant_type") != "nf4":
            raise ValueError(f"{state_key}: quant_type must be 'nf4', got {state.get('quant_type')!r}")
        if state.get("dtype") not in _DTYPES_BY_NAME:
            raise ValueError(f"{state_key}: unsupported dtype {state.get('dtype')!r}")
        quant_map = state_dict.get(f"{prefix}.quant_map")
        if quant_map is not None and not torch.equal(quant_map.float().cpu(), nf4_codebook()):
            raise ValueError(f"{prefix}.quant_map is not the NF4 codebook")
        packed = state_dict[prefix]
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)  # bitsandbytes' quant_storage may be a float type
        shape = torch.Size(state["shape"])
        blocksize = int(state["blocksize"])
        absmax = state_dict[f"{prefix}.absmax"]
        if "nested_offset" not in state and absmax.dtype in (torch.bfloat16, torch.float16):
            # bitsandbytes' CPU inference path stores its scales in the compute
            # dtype after a forward; they widen to fp32 exactly.
            absmax = absmax.float()
        weight = cls(packed=packed.reshape(-1), absmax=absmax, shape=shape,
                     dtype=_DTYPES_BY_NAME[state["dtype"]], blocksize=blocksize)
        if "nested_offset" in state:
            nested_keys = [f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"]
            missing = [k for k in nested_keys if k not in state_dict]
            if missing:
                raise KeyError(f"double-quantized NF4 state dict lacks {missing}")
            if int(state.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
                raise ValueError(f"{state_key}: nested_blocksize must be {NESTED_BLOCKSIZE}")
            weight.nested_absmax = state_dict[nested_keys[0]]
            weight.nested_code = state_dict[nested_keys[1]]
            weight.offset = float(state["nested_offset"])
        weight._validate()
        return weight

    def _validate(self) -> None:
        numel = self.numel
        blocks = -(-numel // self.blocksize)
        if self.packed.numel() != (numel + 1) // 2:
            raise ValueError(f"packed data has {self.packed.numel()} bytes, shape "
                             f"{tuple(self.shape)} needs {(numel + 1) // 2}")
        if self.absmax.numel() != blocks:
            raise ValueError(f"absmax has {self.absmax.numel()} values, {blocks} blocks of "
                             f"{self.blocksize} need {blocks}")
        if self.double_quant:
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"double-quantized absmax must be uint8, got {self.absmax.dtype}")
            expected = -(-blocks // NESTED_BLOCKSIZE)
            if self.nested_absmax.numel() != expected or self.nested_code.numel() != 256:
                raise ValueError("nested_absmax / nested_quant_map sizes do not fit the weight")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32, got {self.absmax.dtype}")

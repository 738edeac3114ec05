"""LoftQ: quantization-aware initialisation of QLoRA adapters (Li et al. 2023, arXiv 2310.08659).

Plain QLoRA quantizes a weight ``W`` to ``Q`` and starts its adapter at zero,
so the model it fine-tunes starts from ``Q``, off ``W`` by the whole
quantization error. LoftQ chooses ``Q`` and the adapter factors together so
that the adapted layer starts close to ``W``::

    Q + s * (lora_B @ lora_A)  ~=  W           (s: the adapter's scaling)

by alternating the two steps ``num_iter`` times, starting from ``T = W``:

1. quantize the target: ``Q = NF4(T)``;
2. take the best rank-``r`` approximation ``L R`` of the residual ``W - Q``
   (truncated SVD ``U S Vh``), and set the next target ``T = W - L R``.

The factors come from the last SVD, with the square root of the singular
values on each side: ``lora_B = U sqrt(S / s)``, ``lora_A = sqrt(S / s) Vh``,
so ``s * lora_B @ lora_A = U S Vh``. This is PEFT's split for LoftQ and for
PiSSA (which divides ``S`` by the scaling, as here). PEFT's LoftQ itself
does not divide by the scaling: its adapters satisfy ``Q + B A ~= W``, which
is what the layer computes only when ``s == 1`` (``lora_alpha == r``). With
``scaling=1`` the factors here are PEFT's; with any other scaling they are
PEFT's divided by ``sqrt(s)``, so that the layer starts at ``~W`` as intended.

``Q`` is :meth:`lowrank_ext.quant.NF4Weight.from_float` of the last target,
bit for bit (the quantizer is bitsandbytes' NF4, so with
``double_quant=False`` it is also what PEFT's LoftQ gets from bitsandbytes).

:func:`loftq_init` works on one dense ``[out_features, in_features]``
weight on its own device; wiring it into a layer is: quantize the layer's
base with the returned :class:`~lowrank_ext.quant.NF4Weight` and copy the
factors into its ``lora_A`` / ``lora_B`` weights. That is what
``QLoRAModule(model, ..., init_lora_weights="loftq", loftq_config=...)``
(:class:`~lowrank_ext.QLoRAConfig`) does for every targeted linear layer,
and ``QLoRALinear.from_linear(linear, init="loftq")`` for one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional

import torch

from .quant import NF4Weight

__all__ = ["LoftQConfig", "LoftQResult", "loftq_init", "reconstruction_error"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_SVD_METHODS = ("exact", "lowrank")


@dataclass(frozen=True)
class LoftQConfig:
    """LoftQ settings, with PEFT's ``LoftQConfig`` field names.

    Attributes:
        loftq_bits: quantization bits; only 4 (NF4) is supported here.
        loftq_iter: alternating steps (``num_iter`` of :func:`loftq_init`), >= 1.
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.loftq_bits, bool) or self.loftq_bits != 4:
            raise ValueError(f"loftq_bits: only 4-bit (NF4) LoftQ is supported, got "
                             f"{self.loftq_bits!r}")
        _check_positive_int("loftq_iter", self.loftq_iter)

    @classmethod
    def from_any(cls, config: Any) -> "LoftQConfig":
        """Read ``config``: a :class:`LoftQConfig`, PEFT's ``LoftQConfig`` (or any
        object with ``loftq_bits`` / ``loftq_iter`` attributes), or a mapping
        with those keys (PEFT stores the config as a dict once a ``LoraConfig``
        is built). Missing fields take the defaults; raises ``ValueError`` for
        unknown keys or bad values and ``TypeError`` for anything else.
        """
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            unknown = sorted(set(config) - {"loftq_bits", "loftq_iter"})
            if unknown:
                raise ValueError(f"loftq_config: unknown keys {unknown}; expected loftq_bits, "
                                 "loftq_iter")
            return cls(**dict(config))
        if hasattr(config, "loftq_bits") or hasattr(config, "loftq_iter"):
            return cls(getattr(config, "loftq_bits", 4), getattr(config, "loftq_iter", 1))
        raise TypeError(f"loftq_config must be a LoftQConfig or a mapping with loftq_bits / "
                        f"loftq_iter, got {type(config).__name__}")


class LoftQResult(NamedTuple):
    """What :func:`loftq_init` returns; unpacks as ``quantized, lora_A, lora_B``.

    Attributes:
        quantized: the NF4 base weight ``Q`` (its ``dtype`` is the input's).
        lora_A: ``[r, in_features]``, float32 (float64 for a float64 weight).
        lora_B: ``[out_features, r]``, same dtype as ``lora_A``.
    """

    quantized: NF4Weight
    lora_A: torch.Tensor
    lora_B: torch.Tensor


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_weight(weight: Any) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape "
                         f"{tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be float32, bfloat16, float16 or float64, got "
                         f"{weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)})")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight has NaN or infinite values")


def _top_singular(matrix: torch.Tensor, r: int, method: str, niter: int, oversample: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` leading singular triplets ``U [m, r], S [r], Vh [r, n]`` of ``matrix``."""
    if method == "exact":
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    # Randomized range finder with power iterations (Halko, Martinsson & Tropp
    # 2011, algorithms 4.4 and 5.1), from a seeded generator so that the
    # result does not depend on (or disturb) torch's global random state.
    m, n = matrix.shape
    width = min(r + oversample, m, n)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    probe = torch.randn(n, width, generator=generator, device=matrix.device,
                        dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    small_U, S, Vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ small_U)[:, :r], S[:r], Vh[:r]


@torch.no_grad()
def loftq_init(weight: torch.Tensor, r: int, *, scaling: float = 1.0, num_iter: int = 1,
               blocksize: int = 64, double_quant: bool = True, svd: str = "exact",
               svd_niter: int = 4, svd_oversample: int = 16, seed: int = 0) -> LoftQResult:
    """LoftQ-initialise a QLoRA layer: NF4 ``Q`` and factors with ``Q + scaling * B @ A ~= weight``.

    Args:
        weight: the dense ``[out_features, in_features]`` weight (float32,
            bfloat16, float16 or float64; finite). Computed in float32
            (float64 for float64) on ``weight``'s device; not modified.
        r: adapter rank, ``1 <= r <= min(out_features, in_features)``.
        scaling: the layer's adapter scaling, ``alpha / r`` (``alpha / sqrt(r)``
            with rsLoRA); > 0. ``1.0`` gives PEFT's LoftQ factors.
        num_iter: alternating steps (PEFT's ``loftq_iter``), >= 1. One step is
            "quantize ``W``, then SVD of the quantization error".
        blocksize: NF4 blocksize (power of two in [32, 4096]), as the base layer's.
        double_quant: quantize the block scales too (QLoRA's double quantization),
            as the base layer does.
        svd: ``"exact"`` (``torch.linalg.svd``, the default) or ``"lowrank"``
            (a randomized truncated SVD: much faster on large weights, slightly
            larger error — NF4 residuals have a flat spectrum, so the default
            is exact; see ``bench/bench_loftq.py``).
        svd_niter: power iterations of ``"lowrank"`` (>= 0).
        svd_oversample: extra probe columns of ``"lowrank"`` (>= 0).
        seed: seed of ``"lowrank"``'s random probe (torch's global RNG is untouched).

    Returns:
        :class:`LoftQResult` ``(quantized, lora_A, lora_B)``: ``quantized`` is
        ``NF4Weight.from_float(target, blocksize, double_quant)`` for the last
        target ``weight - scaling * lora_B_prev @ lora_A_prev`` (``weight``
        itself when ``num_iter == 1``), with ``dtype`` set to ``weight.dtype``;
        ``lora_A`` is ``[r, in_features]``, ``lora_B`` ``[out_features, r]``.

    Raises:
        TypeError: ``weight`` is not a tensor.
        ValueError: naming the argument, for any other bad argument.
    """
    _check_weight(weight)
    out_features, in_features = weight.shape
    _check_positive_int("r", r)
    if r > min(out_features, in_features):
        raise ValueError(f"r must be <= min(out_features, in_features) = "
                         f"{min(out_features, in_features)} for a weight of shape "
                         f"{tuple(weight.shape)}, got {r}")
    if (isinstance(scaling, bool) or not isinstance(scaling, (int, float))
            or not math.isfinite(scaling) or scaling <= 0):
        raise ValueError(f"scaling must be a finite number > 0, got {scaling!r}")
    _check_positive_int("num_iter", num_iter)
    if (isinstance(blocksize, bool) or not isinstance(blocksize, int)
            or not 32 <= blocksize <= 4096 or blocksize & (blocksize - 1)):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize!r}")
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant must be a bool, got {double_quant!r}")
    if svd not in _SVD_METHODS:
        raise ValueError(f"svd must be one of {_SVD_METHODS}, got {svd!r}")
    for name, value in (("svd_niter", svd_niter), ("svd_oversample", svd_oversample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")

    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dense = weight.detach().to(compute)
    target = dense
    for step in range(num_iter):
        quantized = NF4Weight.from_float(target, blocksize, double_quant)
        residual = dense - quantized.dequantize(compute)
        U, S, Vh = _top_singular(residual, r, svd, svd_niter, svd_oversample, seed)
        root = (S / scaling).sqrt()
        lora_B = U * root
        lora_A = root[:, None] * Vh
        if step + 1 < num_iter:
            # The next target from the factors as returned, so that callers can
            # reproduce it exactly: W - scaling * B @ A.
            target = dense - scaling * (lora_B @ lora_A)
    quantized.dtype = weight.dtype
    return LoftQResult(quantized, lora_A.contiguous(), lora_B.contiguous())


@torch.no_grad()
def reconstruction_error(weight: torch.Tensor, quantized: NF4Weight,
                         lora_A: Optional[torch.Tensor] = None,
                         lora_B: Optional[torch.Tensor] = None,
                         scaling: float = 1.0) -> float:
    """``||weight - (Q + scaling * lora_B @ lora_A)||_F``, in float64.

    Without factors: ``||weight - Q||_F`` (plain QLoRA init's error).
    ``Q`` is ``quantized`` decoded in float32, the precision the layer computes
    in at best. Raises ``ValueError`` if only one of the factors is given.
    """
    if (lora_A is None) != (lora_B is None):
        raise ValueError("pass both lora_A and lora_B, or neither")
    approx = quantized.dequantize(torch.float32).double()
    if lora_A is not None:
        approx = approx + scaling * (lora_B.double() @ lora_A.double())
    return torch.linalg.matrix_norm(weight.detach().double() - approx).item()

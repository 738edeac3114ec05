"""DoRA (Liu et al. 2024, weight-decomposed LoRA) as a variant of any LoRA layer.

DoRA replaces ``W`` by ``m * (W + s B A) / ||W + s B A||``, the norm taken per
output unit (a row of a linear weight, an output channel of a convolution
over all its other dimensions, a column of an embedding table) and treated
as a constant in backward (the paper's section 4.3, as PEFT does): the
trainable magnitude ``m`` (PEFT's ``lora_magnitude_vector``, initialized to
the norm) receives gradients, the norm does not.

The variant is written once for every base kind. A layer kind describes its
weight as a matrix of *units*, ``W_u`` ``[U, K]`` (one row per output unit),
by providing:

* ``_dora_units(t)``: a base-layout tensor (the weight, a delta) as ``[U, K]``;
  ``_dora_from_units(u)``: back to the base layout;
* ``_dora_factors(name)``: ``(A_u [r, K], B_u [U, r])`` with
  ``W_u + s B_u A_u`` the adapted weight;
* ``_dora_row_sq_norms()``: ``||W_u[i]||^2`` (computed once per frozen
  weight and cached; see :func:`base_row_sq_norms`);
* ``_dora_apply_weight(A_u)``: ``A_u @ W_u.T`` ``[r, U]``, without forming
  ``W_u`` where the base does not hold it (the NF4 GEMM for 4-bit bases);
* ``_dora_base_key()``: changes whenever the base weight changes (merge,
  requantize, load), to invalidate the cached squared norms;
* ``_dora_magnitude_shape(U)``: the stored shape of ``m`` (PEFT's: ``[U]``,
  ``[1, U, 1, ...]`` for convolutions).

The norm then never needs the dense ``W + s B A``::

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s sum_k B_ik (W A^T)_ik + s^2 (B (A A^T) B^T)_ii

``W A^T`` costs ``r`` rows through the base's own GEMM (``r/N`` of a forward
over ``N`` tokens), the rest is ``r x r``. Sums are in float32 (float64 for
float64 factors and weights). Against an fp64 evaluation of the dense norm
the relative error of ``||.||^2`` is a few float32 roundings of
``(||W_i|| + s ||(BA)_i||)^2 / ||W_i + s (BA)_i||^2``, i.e. ~1e-6 unless the
update cancels the row; for a bfloat16/float16 dense base ``W A^T`` comes out
of the GEMM in that dtype, adding its rounding (2^-9 relative) to the cross
term only.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .. import ops


class DoRAVariant:
    """DoRA's part of a LoRA layer: magnitude init, the norm, the output scale, merging.

    One stateless instance (:data:`DORA`) serves every layer; per-layer state
    (caches) lives in the layer's ``__dict__``.
    """

    name = "dora"

    # ------------------------------------------------------------------ norm

    def weight_norm(self, layer, adapter_name: str) -> torch.Tensor:
        """``||W_u + s B_u A_u||`` per unit, ``[U]``, detached (float32 / float64).

        Outside training (eval mode) the value is kept while the base weight,
        the factors and the scaling are unchanged.
        """
        if torch.compiler.is_compiling() or layer.training:
            return self._compute_norm(layer, adapter_name)
        factor_A, factor_B = layer._factor_tensors(adapter_name)
        key = (layer._dora_base_key(), _tensor_key(factor_A), _tensor_key(factor_B),
               layer.scaling[adapter_name])
        cache = layer.__dict__.setdefault("_dora_norms", {})
        cached = cache.get(adapter_name)
        if cached is None or cached[0] != key:
            cached = (key, self._compute_norm(layer, adapter_name))
            cache[adapter_name] = cached
        return cached[1]

    def _compute_norm(self, layer, adapter_name: str) -> torch.Tensor:
        factor_A, factor_B = layer._dora_factors(adapter_name)
        dtype = _norm_dtype(factor_A)
        factor_A = factor_A.detach().to(dtype)
        factor_B = factor_B.detach().to(dtype)
        scaling = layer.scaling[adapter_name]
        squares = base_row_sq_norms(layer).to(dtype)
        product = layer._dora_apply_weight(factor_A).to(dtype)      # A W^T: [r, U]
        cross = (factor_B * product.T).sum(1)
        quadratic = ((factor_B @ (factor_A @ factor_A.T)) * factor_B).sum(1)
        return (squares + (2.0 * scaling) * cross + (scaling * scaling) * quadratic
                ).clamp_min(0.0).sqrt()

    def scale(self, layer, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        """``m / ||W + s B A||`` as a ``[U]`` tensor in ``dtype`` (differentiable in ``m``)."""
        magnitude = layer.lora_magnitude_vector[adapter_name]
        norm = self.weight_norm(layer, adapter_name)
        if (torch.compiler.is_compiling() or layer.training
                or (magnitude.requires_grad and torch.is_grad_enabled())):
            return (magnitude.reshape(-1) / norm).to(dtype)
        # Eval without autograd (decoding): the scale itself is kept.
        key = (id(norm), _tensor_key(magnitude), dtype)
        cache = layer.__dict__.setdefault("_dora_scales", {})
        cached = cache.get(adapter_name)
        if cached is None or cached[0] != key:
            cached = (key, (magnitude.detach().reshape(-1) / norm).to(dtype), norm)
            cache[adapter_name] = cached
        return cached[1]

    # ------------------------------------------------------------ lifecycle

    def init(self, layer, adapter_name: str) -> None:
        """Create ``lora_magnitude_vector[adapter_name]`` = the current norm (PEFT's init)."""
        factor_A, _ = layer._factor_tensors(adapter_name)
        norm = self._compute_norm(layer, adapter_name)
        units = norm.shape[0]
        magnitude = torch.nn.Parameter(
            norm.to(factor_A.dtype).reshape(layer._dora_magnitude_shape(units)).clone())
        layer.lora_magnitude_vector[adapter_name] = magnitude
        layer.lora_variant[adapter_name] = self

    def forget(self, layer, adapter_name: str) -> None:
        """Drop the adapter's cached norms and merge records."""
        for cache_name in ("_dora_norms", "_dora_scales", "_dora_merge_norms"):
            layer.__dict__.get(cache_name, {}).pop(adapter_name, None)

    # ----------------------------------------------------------------- merge

    def merged_weight(self, layer, adapter_name: str, current: torch.Tensor,
                      unmerged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base-layout weight after merging: ``m / ||W0 + D|| * (current + D)``.

        ``unmerged`` is the base weight without any merged adapter (W0, where
        the norm is taken, as in forward and PEFT), ``current`` the weight the
        adapter is merged into (W0 plus adapters merged earlier), ``delta``
        ``s B A`` in base layout; all float32/float64. The norm is recorded
        for :meth:`unmerged_weight`.
        """
        norm = torch.linalg.vector_norm(layer._dora_units(unmerged + delta), dim=1)
        layer.__dict__.setdefault("_dora_merge_norms", {})[adapter_name] = norm
        return self._apply_scale(layer, adapter_name, current + delta, norm)

    def unmerged_weight(self, layer, adapter_name: str, current: torch.Tensor,
                        delta: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merged_weight`: ``current / (m / norm) - D``."""
        norm = layer.__dict__["_dora_merge_norms"][adapter_name]
        magnitude = layer.lora_magnitude_vector[adapter_name].detach().reshape(-1)
        factor = (norm.to(current.dtype) / magnitude.to(current.dtype))[:, None]
        return layer._dora_from_units(layer._dora_units(current) * factor) - delta

    def _apply_scale(self, layer, adapter_name, weight, norm):
        magnitude = layer.lora_magnitude_vector[adapter_name].detach().reshape(-1)
        factor = (magnitude.to(weight.dtype) / norm.to(weight.dtype))[:, None]
        return layer._dora_from_units(layer._dora_units(weight) * factor)

    # --------------------------------------------------------------- forward

    def linear_forward(self, layer, adapter_name: str, inputs: torch.Tensor,
                       bias: Optional[torch.Tensor], branch: Optional[torch.Tensor],
                       fused: Callable, base: Callable, dtype: torch.dtype) -> torch.Tensor:
        """The layer output with one DoRA adapter, PEFT's function
        ``base(x) + (g - 1) * W xd + g * s * B A xd`` (``g = m / ||W + sBA||``,
        ``xd`` = ``branch``, the dropped-out input, or ``inputs`` without dropout).

        ``fused(x, bias, lora_input)`` is the base's fused LoRA op (``W x + bias
        + s B A lora_input``), ``base(x, bias)`` its plain product. Without
        dropout that is ``g * (W x + s B A x) + bias``: one fused call and a
        scale. With dropout, ``W (x - xd) + bias + g * (W xd + s B A xd)``.
        """
        output = fused(inputs if branch is None else branch, None, None)
        scale = self.scale(layer, adapter_name, output.dtype)
        if branch is None:
            return scale_rows_(output, scale, None if bias is None else bias.to(output.dtype))
        return base(inputs - branch, bias) + scale_rows_(output, scale, None)

    def extra_linear_term(self, layer, adapter_name: str, result: torch.Tensor,
                          branch: torch.Tensor, fused: Callable, base: Callable) -> torch.Tensor:
        """``result + (g - 1) * W xd + g * s * B A xd``: a DoRA adapter active after
        another one in the same call (``W`` the base weight, not the running result)."""
        output = fused(branch, None, None)
        scale = self.scale(layer, adapter_name, output.dtype)
        return result + output * scale - base(branch, None)


DORA = DoRAVariant()


class _ScaleRows(torch.autograd.Function):
    """``output * scale + bias``, written into ``output`` (see :func:`scale_rows_`)."""

    @staticmethod
    def forward(ctx, output, scale, bias):
        output.mul_(scale)
        if bias is not None:
            output.add_(bias)
        ctx.mark_dirty(output)
        ctx.save_for_backward(output, scale, bias)
        return output

    @staticmethod
    def backward(ctx, grad):
        output, scale, bias = ctx.saved_tensors
        grad_output = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[1]:
            # sum_rows grad * (W x + s B A x) = sum_rows grad * (output - bias) / scale
            plain = output if bias is None else output - bias
            wide = torch.promote_types(scale.dtype, torch.float32)
            summed = (grad * plain).flatten(0, -2).sum(0, dtype=wide)
            divisor = scale.to(wide)
            grad_scale = torch.where(divisor == 0, 0.0, summed / divisor).to(scale.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad.flatten(0, -2).sum(0).to(bias.dtype)
        return grad_output, grad_scale, grad_bias


def scale_rows_(output: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``output * scale + bias`` (``scale`` and ``bias`` ``[U]``, along the last
    dimension), computed in place in ``output``, a fresh tensor no autograd node
    has saved (the fused op's result).

    For the gradient of ``scale`` autograd would keep ``output`` before scaling,
    an ``[N, U]`` activation per layer that LoRA does not keep (+22% of a QLoRA
    step's peak memory on a Llama layer); instead the scaled result is kept
    (often kept downstream anyway) and ``output = (result - bias) / scale`` is
    recovered in backward. A unit whose scale is exactly 0 (a magnitude of
    exactly 0) has lost its ``output`` and gets a zero gradient for its scale.
    """
    if torch.is_grad_enabled() and (output.requires_grad or scale.requires_grad or (
            bias is not None and bias.requires_grad)):
        return _ScaleRows.apply(output, scale, bias)
    output.mul_(scale)
    return output if bias is None else output.add_(bias)


def _tensor_key(tensor: torch.Tensor) -> tuple:
    return (tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device)


def _norm_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def base_row_sq_norms(layer) -> torch.Tensor:
    """``||W_u[i]||^2`` of the layer's frozen base, computed once and kept while
    ``layer._dora_base_key()`` is unchanged (merging, requantizing or loading
    the base changes it)."""
    cached = layer.__dict__.get("_dora_base_norms")
    if torch.compiler.is_compiling():
        return cached[1] if cached is not None else layer._dora_row_sq_norms()
    key = layer._dora_base_key()
    if cached is None or cached[0] != key:
        cached = (key, layer._dora_row_sq_norms())
        layer.__dict__["_dora_base_norms"] = cached
    return cached[1]


def dense_row_sq_norms(units: torch.Tensor) -> torch.Tensor:
    """``||units[i]||^2`` in float32 (float64 for float64), without an fp32 copy of ``units``."""
    dtype = _norm_dtype(units)
    return torch.linalg.vector_norm(units.detach(), dim=1, dtype=dtype).square()


def nf4_row_sq_norms(quantized, rows: int, columns: int,
                     chunk: int = 1 << 18) -> torch.Tensor:
    """``||W[i]||^2`` of an NF4 weight ``[rows, columns]`` (an
    :class:`~lowrank_ext.NF4Weight`), decoded a few whole rows at a time (about
    ``chunk`` elements, a whole number of quantization blocks: blocks may
    straddle rows), so the dense weight never exists; one chunk-sized
    temporary at a time."""
    blocksize = quantized.blocksize
    absmax = quantized.block_absmax()
    # Rows per chunk: a multiple of the smallest row count spanning whole blocks.
    step = blocksize // math.gcd(columns, blocksize)
    per_chunk = max(step, chunk // columns // step * step)
    result = torch.empty(rows, dtype=torch.float32, device=quantized.packed.device)
    for first in range(0, rows, per_chunk):
        count = min(per_chunk, rows - first)
        start, length = first * columns, count * columns
        values = ops.nf4_dequantize(
            quantized.packed[start // 2:(start + length + 1) // 2],
            absmax[start // blocksize:(start + length + blocksize - 1) // blocksize],
            [count, columns], blocksize, torch.float32)
        result[first:first + count] = values.square_().sum(1)
    return result

// The whole op surface of lowrank_ext, in one place (each op's C++ signature
// is in op_calls.h). Backends register their kernels with
// STABLE_TORCH_LIBRARY_IMPL beside the kernels (cpu/*_ops.cpp,
// cuda/*_ops.cpp); autograd, autocast and the fake kernels are Python
// (python/lowrank_ext/_autograd.py, _autocast.py, ops.py).
//
// NF4 weight arguments always come as the same group:
//   packed (uint8 [ceil(numel/2)]), absmax (fp32 [nblocks], or uint8 codes
//   when double-quantized), nested_absmax (fp32 [ceil(nblocks/256)] or None),
//   nested_code (fp32 [256] or None), offset (added to decoded absmax),
//   out_features, in_features, blocksize.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(lowrank_ext, m) {
  // Inverted dropout with a counter-based mask: element i is kept iff
  // hash(seed, i) >= p * 2^32, so the same (p, seed) gives the same mask
  // (its own backward) and nothing is stored. seed: CPU int64, one element.
  m.def("dropout(Tensor input, float p, Tensor seed) -> Tensor");

  // NF4 blockwise quantization of a float tensor (flattened).
  m.def("nf4_quantize(Tensor input, int blocksize) -> (Tensor packed, Tensor absmax)");
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, SymInt[] shape, int blocksize, "
      "ScalarType dtype) -> Tensor");
  // 8-bit blockwise quantization against a 256-entry code map (double quant).
  m.def(
      "quantize_blockwise_8bit(Tensor input, Tensor code, int blocksize) "
      "-> (Tensor codes, Tensor absmax)");
  m.def(
      "dequantize_blockwise_8bit(Tensor codes, Tensor absmax, Tensor code, int blocksize) "
      "-> Tensor");

  // y = x @ dequant(W).T + bias, W [out_features, in_features] in NF4.
  m.def(
      "nf4_linear(Tensor input, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, float offset, SymInt out_features, SymInt in_features, "
      "int blocksize, Tensor? bias) -> Tensor");
  // grad_input = grad_output @ dequant(W).
  m.def(
      "nf4_linear_grad_input(Tensor grad_output, Tensor packed, Tensor absmax, "
      "Tensor? nested_absmax, Tensor? nested_code, float offset, SymInt out_features, "
      "SymInt in_features, int blocksize) -> Tensor");

  // y = x @ W.T + bias + scaling * (lora_input @ A.T) @ B.T, where lora_input
  // is the (dropped-out) input of the adapter branch, or x itself when None.
  m.def(
      "lora_linear(Tensor input, Tensor? lora_input, Tensor weight, Tensor? bias, "
      "Tensor lora_A, Tensor lora_B, float scaling) -> Tensor");
  // Returns (grad_input, grad_lora_input, grad_A, grad_B). With lora_input None,
  // grad_input already holds both paths and grad_lora_input is empty.
  m.def(
      "lora_linear_backward(Tensor grad_output, Tensor input, Tensor? lora_input, "
      "Tensor weight, Tensor lora_A, Tensor lora_B, float scaling) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // Same as lora_linear with an NF4 base weight.
  m.def(
      "qlora_linear(Tensor input, Tensor? lora_input, Tensor packed, Tensor absmax, "
      "Tensor? nested_absmax, Tensor? nested_code, float offset, SymInt out_features, "
      "SymInt in_features, int blocksize, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling) -> Tensor");
  m.def(
      "qlora_linear_backward(Tensor grad_output, Tensor input, Tensor? lora_input, "
      "Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "float offset, SymInt out_features, SymInt in_features, int blocksize, "
      "Tensor lora_A, Tensor lora_B, float scaling) -> (Tensor, Tensor, Tensor, Tensor)");

  // Mixed-adapter batch (Punica SGMV / S-LoRA style): returns base_output plus,
  // for every row i whose adapter a = adapter_indices[i] is not -1,
  // scalings[a] * (x_i @ lora_A[a, :r].T) @ lora_B[a, :, :r].T with r = ranks[a].
  // lora_A [num_adapters, max_rank, in], lora_B [num_adapters, out, max_rank]
  // (zero-padded past each rank), ranks int64, scalings fp32, adapter_indices
  // int64 shaped like a prefix of input's leading dimensions.
  m.def(
      "multi_lora_linear(Tensor input, Tensor base_output, Tensor lora_A, Tensor lora_B, "
      "Tensor ranks, Tensor scalings, Tensor adapter_indices) -> Tensor");
  // Returns (grad_input, grad_lora_A, grad_lora_B) of the adapter term only
  // (base_output's gradient is grad_output itself); zero past each rank and
  // for adapters no row uses.
  m.def(
      "multi_lora_linear_backward(Tensor grad_output, Tensor input, Tensor lora_A, "
      "Tensor lora_B, Tensor ranks, Tensor scalings, Tensor adapter_indices) "
      "-> (Tensor, Tensor, Tensor)");
}

// Glue of the NF4 ops on the CPU (quantize, dequantize, nf4_linear and its
// input gradient) on torch's stable ABI: validates arguments, splits work
// with torch's parallel_for and calls the NF4 kernels of the active ISA.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>

#include "core/nf4.h"
#include "cpu/dispatch.h"
#include "glue_helpers.h"
#include "op_calls.h"
#include "op_checks.h"

namespace lowrank {
namespace cpu {
namespace {

// Large fresh outputs are page-faulted in 4 KiB pages on first write, which
// costs more than the dequantization itself (a 64 MiB weight: ~16K faults).
// Asking for transparent huge pages on the 2 MiB-aligned interior of a new
// buffer cuts that by 512x where the kernel allows THP via madvise.
Tensor empty_for_streaming_write(const std::vector<int64_t>& shape, ScalarType dtype,
                                const torch::stable::Device& device) {
  Tensor out = empty_tensor(shape, dtype, device);
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const size_t bytes = static_cast<size_t>(out.numel()) * out.element_size();
  if (bytes >= 4 * kHugePage) {
    uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    uintptr_t aligned_begin = (begin + kHugePage - 1) & ~(kHugePage - 1);
    uintptr_t aligned_end = (begin + bytes) & ~(kHugePage - 1);
    if (aligned_end > aligned_begin) {
      // Advisory only: failure (e.g. THP disabled) leaves ordinary pages.
      (void)madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin,
                    MADV_HUGEPAGE);
    }
  }
  return out;
}

// Blocks per parallel task: about 64K elements, so small tensors stay on one thread.
int64_t grain_in_blocks(int64_t blocksize) { return std::max<int64_t>(1, 65536 / blocksize); }

Tensors2 nf4_quantize_cpu(const Tensor& input, int64_t blocksize) {
  constexpr const char* op = "nf4_quantize";
  check_float_tensor(op, "input", input);
  check_blocksize(op, blocksize);
  LOWRANK_CHECK(input.numel() > 0, op, ": input must not be empty, got shape ",
                shape_of(input));
  Tensor input_c = make_contiguous(input);
  const int64_t numel = input_c.numel();
  const int64_t blocks = nf4::num_blocks(numel, blocksize);
  Tensor packed = empty_tensor({nf4::packed_bytes(numel)}, kByte, input.device());
  Tensor absmax = empty_tensor({blocks}, kFloat, input.device());
  const CpuKernels& kernels = active_kernels();
  const Dtype dtype = kernel_dtype<Dtype>(input_c.scalar_type());
  std::atomic<bool> finite{true};
  torch::stable::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    bool ok = kernels.nf4.quantize(input_c.const_data_ptr(), dtype, numel, blocksize, begin,
                                   end, packed.mutable_data_ptr<uint8_t>(),
                                   absmax.mutable_data_ptr<float>());
    if (!ok) finite.store(false);
  });
  // A ValueError in Python: ops.nf4.quantize re-raises this message as one
  // (the stable ABI raises every error as RuntimeError).
  LOWRANK_CHECK(finite.load(), op,
                ": input contains NaN or Inf; NF4 cannot represent non-finite weights "
                "(clean or clamp them before quantizing)");
  return {packed, absmax};
}

Tensor nf4_dequantize_cpu(const Tensor& packed, const Tensor& absmax, IntArray shape,
                          int64_t blocksize, ScalarType dtype) {
  const int64_t numel = check_nf4_dequantize_args(packed, absmax, shape, blocksize, dtype);
  const int64_t blocks = nf4::num_blocks(numel, blocksize);
  Tensor packed_c = make_contiguous(packed);
  Tensor absmax_c = make_contiguous(absmax);
  Tensor out = empty_for_streaming_write(std::vector<int64_t>(shape.begin(), shape.end()), dtype,
                                         packed.device());
  const CpuKernels& kernels = active_kernels();
  const Dtype out_dtype = kernel_dtype<Dtype>(dtype);
  torch::stable::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    kernels.nf4.dequantize(packed_c.const_data_ptr<uint8_t>(), absmax_c.const_data_ptr<float>(),
                           numel, blocksize, begin, end, out.mutable_data_ptr(), out_dtype);
  });
  return out;
}

// An NF4 weight made contiguous, with the kernel's view of its block scales.
// Holds the tensors the raw pointers in `scales` point into.
struct KernelWeight {
  Tensor packed;
  Tensor absmax;
  Tensor nested_absmax;
  Tensor nested_code;
  BlockScales scales;
  int64_t out_features;
  int64_t in_features;
  int64_t blocksize;

  explicit KernelWeight(const Nf4WeightArgs& weight)
      : packed(make_contiguous(weight.packed)),
        absmax(make_contiguous(weight.absmax)),
        out_features(weight.out_features),
        in_features(weight.in_features),
        blocksize(weight.blocksize) {
    if (weight.nested()) {
      nested_absmax = make_contiguous(*weight.nested_absmax);
      nested_code = make_contiguous(*weight.nested_code);
      scales.nested_codes = absmax.const_data_ptr<uint8_t>();
      scales.nested_absmax = nested_absmax.const_data_ptr<float>();
      scales.nested_code = nested_code.const_data_ptr<float>();
      scales.offset = static_cast<float>(weight.offset);
    } else {
      scales.absmax = absmax.const_data_ptr<float>();
    }
  }

  const uint8_t* data() const { return packed.const_data_ptr<uint8_t>(); }
};

// Up to this many activation rows the fused GEMV (which reads the 4-bit
// weight once per group of up to 8 rows) beats dequantizing panels for a
// GEMM. Measured (per-thread CPU time, 4096x4096): fp32 GEMV wins up to ~16
// rows, bf16 with AVX512-BF16 (whose GEMM is ~4x faster) up to ~6. Without
// AVX512-BF16 the bf16 GEMM runs in fp32 (gemm_dtype), so bf16 takes fp32's
// limit: on an AVX2-only Zen 5 (1 thread, CPU time), 8 rows of 8192x8192
// or 4096x4096 bf16 took 1.3x as long on the GEMM path as in the GEMV, 16
// rows the same on both.
int64_t gemv_max_rows(ScalarType dtype) {
  return dtype == kBFloat16 && bf16_dot_product_supported() ? 6 : 16;
}

// dtype the GEMM path multiplies in: the activations' own, except float16,
// whose CPU GEMM is several times slower than fp32's without AVX512-FP16
// (measured 2.8x at 24 rows), and bfloat16 on CPUs without AVX512-BF16,
// where ATen's bf16 GEMM has no native instructions: on an AVX2-only Zen 5,
// 64x5632 @ 5632x256 took 654 ms in bf16 against 25 ms in fp32 (1 thread),
// the transposed-weight forward 165 vs 32 ms. Those run in fp32 and round
// once at the end (the weight is then not rounded to 16 bits at all).
ScalarType gemm_dtype(ScalarType dtype) {
  if (dtype == kHalf) return kFloat;
  if (dtype == kBFloat16 && !bf16_dot_product_supported()) return kFloat;
  return dtype;
}

// Weight rows per GEMV task, handed out dynamically: 32 rows of a 4096-wide
// weight are 64 KiB of packed data, plenty to amortize a hand-out, and small
// enough that two threads finish within a task of each other.
constexpr int64_t kGemvGrain = 32;

// Panels for the GEMM path: about kPanelBytes of dequantized weight, rows
// clamped to [kPanelMinRows, kPanelMaxRows]. Each panel costs two parallel
// regions (dequantize, then ATen's threaded GEMM), and every region boundary
// waits for the slowest thread, which gets expensive when other processes
// share the cores; so panels are large. fp32 GEMMs also need N >= 256 to run
// at full speed. Measured on 512x4096x4096: per-thread CPU time with 2, 4
// and 8 MiB panels within 5% of dense for fp32 and bf16, forward and
// grad_input. Running one single-threaded GEMM per thread inside a single
// region was tried too and was several times slower with two threads.
constexpr int64_t kPanelBytes = int64_t{8} << 20;
constexpr int64_t kPanelMinRows = 256;
constexpr int64_t kPanelMaxRows = 4096;
// Elements per parallel dequantization task.
constexpr int64_t kDequantizeGrain = int64_t{1} << 16;

// Scratch for the GEMM paths' dequantized panels and slabs: one buffer per
// calling thread, grown as needed and reused by every later call. A fresh
// empty tensor per call (8 MiB) went back into glibc's heap when freed (its mmap
// threshold rises to the size of the first freed mapping), where the small
// tensors autograd saves between calls pinned it: a 16-layer QLoRA model of
// 2048x2048 projections kept ~150 MiB more resident after a training step,
// a 22-layer TinyLlama-shaped one more than bitsandbytes over the whole
// step (tests/test_memory_retention.py). The tensor returned is valid until
// the next call on this thread.
Tensor gemm_scratch(int64_t elements, ScalarType dtype, const torch::stable::Device& device,
                    int64_t element_size) {
  struct Buffer {
    void* data = nullptr;
    size_t capacity = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  constexpr size_t kAlignment = 64;
  const size_t bytes = static_cast<size_t>(elements * element_size);
  if (bytes > buffer.capacity) {
    const size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    std::free(buffer.data);
    buffer.data = std::aligned_alloc(kAlignment, rounded);
    buffer.capacity = buffer.data == nullptr ? 0 : rounded;
    LOWRANK_CHECK(buffer.data != nullptr, "lowrank_ext: out of memory allocating ", rounded,
                  " bytes of GEMM scratch");
  }
  const std::vector<int64_t> sizes = {elements};
  const std::vector<int64_t> strides = {1};
  return torch::stable::from_blob(buffer.data, IntArray(sizes), IntArray(strides), device, dtype);
}

int64_t panel_rows_for(int64_t row_length, int64_t element_size, int64_t total_rows) {
  const int64_t rows = std::clamp(kPanelBytes / (row_length * element_size), kPanelMinRows,
                                  kPanelMaxRows);
  return std::min(rows, total_rows);
}

// Runs worker(next) once on each of the ATen threads (one parallel region);
// next() hands out the indices 0, 1, ... count - 1 one at a time and then
// -1. Dynamic hand-out keeps every thread busy to the end even when one
// core is slowed down by other load, which a static split would wait for.
template <typename Worker>
void parallel_dynamic(int64_t count, Worker&& worker) {
  std::atomic<int64_t> counter{0};
  auto next = [&]() -> int64_t {
    int64_t index = counter.fetch_add(1, std::memory_order_relaxed);
    return index < count ? index : -1;
  };
  const int64_t threads = std::min<int64_t>(torch::stable::get_num_threads(), count);
  torch::stable::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t thread = begin; thread < end; ++thread) worker(next);
  });
}

// body(begin, end) for every kGemvGrain-row range of [0, out_features),
// ranges handed out dynamically (parallel_dynamic).
template <typename Body>
void parallel_gemv_tasks(int64_t out_features, Body&& body) {
  const int64_t tasks = (out_features + kGemvGrain - 1) / kGemvGrain;
  parallel_dynamic(tasks, [&](auto next) {
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t begin = task * kGemvGrain;
      body(begin, std::min(begin + kGemvGrain, out_features));
    }
  });
}

// rows [M, in] (contiguous bf16) -> [M, out] by the AVX512-BF16 GEMV.
Tensor nf4_gemv_bf16_rows(const CpuKernels& kernels, const KernelWeight& weight,
                          const void* rows_data, int64_t count, const float* bias_data,
                          const std::vector<int64_t>& shape, const torch::stable::Device& device) {
  Tensor buffer = empty_tensor({count, weight.in_features}, kBFloat16, device);
  prepare_gemv_input_bf16(static_cast<const uint16_t*>(rows_data), count,
                          weight.in_features, static_cast<uint16_t*>(buffer.mutable_data_ptr()));
  GemvBf16Input layout;
  layout.data = static_cast<const uint16_t*>(buffer.const_data_ptr());
  layout.rows = count;
  layout.in_features = weight.in_features;
  Tensor out = empty_tensor(shape, kBFloat16, device);
  void* out_data = out.mutable_data_ptr();
  parallel_gemv_tasks(weight.out_features, [&](int64_t begin, int64_t end) {
    kernels.nf4.gemv_bf16(layout, weight.data(), weight.scales, weight.out_features,
                          weight.in_features, weight.blocksize, bias_data, begin, end, out_data,
                          Dtype::BFloat16);
  });
  return out;
}

// rows [count, in] (contiguous, at rows_data, of rows_dtype) -> out of
// `shape` ([..., out]) by the fused GEMV; bf16 rows take the AVX512-BF16
// kernel where the active table has one and the row length suits it.
Tensor nf4_gemv_rows(const KernelWeight& weight, const void* rows_data, ScalarType rows_dtype,
                     int64_t count, const OptionalTensor& bias, const std::vector<int64_t>& shape,
                     const torch::stable::Device& device) {
  const CpuKernels& kernels = active_kernels();
  Tensor bias_fp32;
  if (bias.has_value()) bias_fp32 = make_contiguous(to_dtype(*bias, kFloat));
  const float* bias_data = bias.has_value() ? bias_fp32.const_data_ptr<float>() : nullptr;
  if (rows_dtype == kBFloat16 && kernels.nf4.gemv_bf16 != nullptr &&
      weight.in_features % kGemvBf16Group == 0) {
    return nf4_gemv_bf16_rows(kernels, weight, rows_data, count, bias_data, shape, device);
  }
  GemvInput layout;
  layout.rows = count;
  layout.in_features = weight.in_features;
  Tensor buffer = empty_tensor({count * gemv_row_stride(layout)}, kFloat, device);
  prepare_gemv_input(rows_data, kernel_dtype<Dtype>(rows_dtype), count, weight.in_features,
                     buffer.mutable_data_ptr<float>());
  layout.data = buffer.const_data_ptr<float>();
  Tensor out = empty_tensor(shape, rows_dtype, device);
  const Dtype out_dtype = kernel_dtype<Dtype>(rows_dtype);
  void* out_data = out.mutable_data_ptr();
  parallel_gemv_tasks(weight.out_features, [&](int64_t begin, int64_t end) {
    kernels.nf4.gemv(layout, weight.data(), weight.scales, weight.out_features,
                     weight.in_features, weight.blocksize, bias_data, begin, end, out_data,
                     out_dtype);
  });
  return out;
}

// grad_rows [count, out] (contiguous) -> grad_rows @ W of `shape` ([..., in])
// by the fused transposed GEMV: threads take column ranges and sum in fp32
// straight from the 4-bit weight.
Tensor nf4_gemv_transposed_rows(const KernelWeight& weight, const Tensor& grad_rows, int64_t count,
                                const std::vector<int64_t>& shape) {
  Tensor grad_fp32 = make_contiguous(to_dtype(grad_rows, kFloat));
  Tensor result = empty_tensor(shape, kFloat, grad_rows.device());
  const float* grad_data = grad_fp32.const_data_ptr<float>();
  float* result_data = result.mutable_data_ptr<float>();
  const CpuKernels& kernels = active_kernels();
  const int64_t tasks =
      (weight.in_features + kGemvTransposedMaxColumns - 1) / kGemvTransposedMaxColumns;
  parallel_dynamic(tasks, [&](auto next) {
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t begin = task * kGemvTransposedMaxColumns;
      const int64_t end = std::min(begin + kGemvTransposedMaxColumns, weight.in_features);
      kernels.nf4.gemv_transposed(grad_data, count, weight.data(), weight.scales,
                                  weight.out_features, weight.in_features, weight.blocksize,
                                  begin, end, result_data + begin, weight.in_features);
    }
  });
  return to_dtype(result, grad_rows.scalar_type());
}

// rows [M, in] (contiguous) -> [M, out]: panel by panel, weight rows are
// dequantized (in parallel) into the activation dtype and multiplied by
// ATen's GEMM, which writes straight into the panel's column slice of the
// output (BLAS takes the row stride) with the bias added there; the dense
// weight never exists as a whole.
Tensor nf4_gemm_rows(const KernelWeight& weight, const Tensor& rows, const OptionalTensor& bias) {
  const int64_t in_features = weight.in_features;
  const int64_t out_features = weight.out_features;
  const int64_t item = static_cast<int64_t>(rows.element_size());
  const int64_t panel_rows = panel_rows_for(in_features, item, out_features);
  const torch::stable::Device device = rows.device();
  Tensor panel = view_shape(gemm_scratch(panel_rows * in_features, rows.scalar_type(), device, item),
                      {panel_rows, in_features});
  Tensor out = empty_tensor({rows.size(0), out_features}, rows.scalar_type(), device);
  const CpuKernels& kernels = active_kernels();
  const Dtype dtype = kernel_dtype<Dtype>(rows.scalar_type());
  char* panel_data = static_cast<char*>(panel.mutable_data_ptr());
  for (int64_t first = 0; first < out_features; first += panel_rows) {
    const int64_t count = std::min(panel_rows, out_features - first);
    const int64_t flat = first * in_features;
    torch::stable::parallel_for(0, count * in_features, kDequantizeGrain,
                                [&](int64_t begin, int64_t end) {
                                  kernels.nf4.dequantize_range(
                                      weight.data(), weight.scales, weight.blocksize,
                                      flat + begin, flat + end, panel_data + begin * item, dtype);
                                });
    Tensor weight_panel = transposed(narrow_view(panel, 0, 0, count));
    Tensor out_slice = narrow_view(out, 1, first, count);
    if (bias.has_value()) {
      aten_addmm_out(out_slice, narrow_view(*bias, 0, first, count), rows, weight_panel);
    } else {
      aten_mm_out(out_slice, rows, weight_panel);
    }
  }
  return out;
}

// grad_rows [M, out] (contiguous) -> grad_rows @ W [M, in]: slab by slab of
// weight columns (all out_features rows, a few columns), each slab's product
// written once into its column slice, so every output element is one
// fp32-accumulated GEMM result (no rounding between partial sums in 16-bit
// dtypes).
Tensor nf4_gemm_grad_rows(const KernelWeight& weight, const Tensor& grad_rows) {
  const int64_t in_features = weight.in_features;
  const int64_t out_features = weight.out_features;
  const int64_t item = static_cast<int64_t>(grad_rows.element_size());
  const int64_t slab_columns = panel_rows_for(out_features, item, in_features);
  const torch::stable::Device device = grad_rows.device();
  Tensor slab_storage =
      gemm_scratch(out_features * slab_columns, grad_rows.scalar_type(), device, item);
  Tensor grad_input = empty_tensor({grad_rows.size(0), in_features}, grad_rows.scalar_type(), device);
  const CpuKernels& kernels = active_kernels();
  const Dtype dtype = kernel_dtype<Dtype>(grad_rows.scalar_type());
  char* slab_data = static_cast<char*>(slab_storage.mutable_data_ptr());
  for (int64_t first = 0; first < in_features; first += slab_columns) {
    const int64_t count = std::min(slab_columns, in_features - first);
    torch::stable::parallel_for(
        0, out_features, std::max<int64_t>(1, kDequantizeGrain / count),
        [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const int64_t flat = row * in_features + first;
            kernels.nf4.dequantize_range(weight.data(), weight.scales, weight.blocksize, flat,
                                         flat + count, slab_data + row * count * item, dtype);
          }
        });
    Tensor slab = view_shape(narrow_view(slab_storage, 0, 0, out_features * count), {out_features, count});
    Tensor grad_slice = narrow_view(grad_input, 1, first, count);
    aten_mm_out(grad_slice, grad_rows, slab);
  }
  return grad_input;
}

// input [..., in] -> input @ dequant(W).T + bias [..., out] (validated args).
// Few rows read the input where it lies (when contiguous) and write the
// output in its final shape: at one row the tensor calls around the GEMV are
// a visible share of the call.
Tensor nf4_linear_forward(const Nf4WeightArgs& args, const Tensor& input,
                          const OptionalTensor& bias) {
  KernelWeight weight(args);
  const std::vector<int64_t> shape = output_shape(input, args.out_features);
  const int64_t count = input.numel() / args.in_features;
  if (count == 0) return empty_tensor(shape, input.scalar_type(), input.device());
  if (count <= gemv_max_rows(input.scalar_type())) {
    Tensor input_c = make_contiguous(input);
    return nf4_gemv_rows(weight, input_c.const_data_ptr(), input_c.scalar_type(), count, bias,
                         shape, input.device());
  }
  Tensor rows = make_contiguous(flatten_rows(input));
  const ScalarType compute = gemm_dtype(rows.scalar_type());
  OptionalTensor compute_bias;
  if (bias.has_value()) compute_bias = to_dtype(*bias, compute);
  return view_shape(to_dtype(nf4_gemm_rows(weight, to_dtype(rows, compute), compute_bias),
                       input.scalar_type()),
              shape);
}

}  // namespace

Tensor nf4_linear(const Tensor& input, const Tensor& packed, const Tensor& absmax,
                      const OptionalTensor& nested_absmax, const OptionalTensor& nested_code,
                      double offset, int64_t out_features, int64_t in_features,
                      int64_t blocksize, const OptionalTensor& bias) {
  constexpr const char* op = "nf4_linear";
  Nf4WeightArgs weight = checked_linear_weight(op, input, packed, absmax, nested_absmax,
                                               nested_code, offset, out_features, in_features,
                                               blocksize, bias);
  if (input.scalar_type() == kDouble) {
    // The float64 reference path (see check_linear_float).
    return aten_linear(input,
                  nf4_dense_weight(packed, absmax, nested_absmax, nested_code, offset,
                                   out_features, in_features, blocksize, kDouble),
                  bias);
  }
  return nf4_linear_forward(weight, input, bias);
}

Tensor nf4_linear_grad_input(const Tensor& grad_output, const Tensor& packed,
                                 const Tensor& absmax, const OptionalTensor& nested_absmax,
                                 const OptionalTensor& nested_code, double offset,
                                 int64_t out_features, int64_t in_features, int64_t blocksize) {
  constexpr const char* op = "nf4_linear_grad_input";
  Nf4WeightArgs args = checked_grad_input_weight(op, grad_output, packed, absmax, nested_absmax,
                                                 nested_code, offset, out_features, in_features,
                                                 blocksize);
  if (grad_output.scalar_type() == kDouble) {
    return torch::stable::matmul(grad_output,
                  nf4_dense_weight(packed, absmax, nested_absmax, nested_code, offset,
                                   out_features, in_features, blocksize, kDouble));
  }
  KernelWeight weight(args);
  const std::vector<int64_t> shape = output_shape(grad_output, args.in_features);
  const int64_t count = grad_output.numel() / args.out_features;
  if (count == 0) return empty_tensor(shape, grad_output.scalar_type(), grad_output.device());
  if (count <= gemv_max_rows(grad_output.scalar_type())) {
    return nf4_gemv_transposed_rows(weight, grad_output, count, shape);
  }
  Tensor grad_rows = make_contiguous(flatten_rows(grad_output));
  const ScalarType compute = gemm_dtype(grad_rows.scalar_type());
  return view_shape(to_dtype(nf4_gemm_grad_rows(weight, to_dtype(grad_rows, compute)),
                       grad_output.scalar_type()),
              shape);
}

STABLE_TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  LOWRANK_IMPL(m, nf4_quantize, nf4_quantize_cpu);
  LOWRANK_IMPL(m, nf4_dequantize, nf4_dequantize_cpu);
  LOWRANK_IMPL(m, nf4_linear, nf4_linear);
  LOWRANK_IMPL(m, nf4_linear_grad_input, nf4_linear_grad_input);
}

}  // namespace cpu
}  // namespace lowrank

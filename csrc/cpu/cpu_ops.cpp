// ATen glue for the CPU backend: validates arguments, splits work with
// at::parallel_for and calls the torch-free kernels of the active ISA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "core/nf4.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"
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
at::Tensor empty_for_streaming_write(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const size_t bytes = out.nbytes();
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

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& input, int64_t blocksize) {
  constexpr const char* op = "nf4_quantize";
  check_float_tensor(op, "input", input);
  check_blocksize(op, blocksize);
  TORCH_CHECK(input.numel() > 0, op, ": input must not be empty, got shape ", input.sizes());
  at::Tensor contiguous = input.contiguous();
  const int64_t numel = contiguous.numel();
  const int64_t blocks = nf4::num_blocks(numel, blocksize);
  at::Tensor packed = at::empty({nf4::packed_bytes(numel)}, input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, input.options().dtype(at::kFloat));
  const CpuKernels& kernels = active_kernels();
  const Dtype dtype = kernel_dtype<Dtype>(contiguous.scalar_type());
  std::atomic<bool> finite{true};
  at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    bool ok = kernels.nf4_quantize(contiguous.const_data_ptr(), dtype, numel, blocksize, begin,
                                   end, packed.mutable_data_ptr<uint8_t>(),
                                   absmax.mutable_data_ptr<float>());
    if (!ok) finite.store(false);
  });
  TORCH_CHECK_VALUE(finite.load(), op,
                    ": input contains NaN or Inf; NF4 cannot represent non-finite weights "
                    "(clean or clamp them before quantizing)");
  return {packed, absmax};
}

int64_t checked_numel(const char* op, c10::SymIntArrayRef shape) {
  int64_t numel = 1;
  for (const c10::SymInt& size : shape) {
    int64_t value = size.expect_int();
    TORCH_CHECK(value >= 0, op, ": shape must not have negative sizes, got ", shape);
    numel *= value;
  }
  TORCH_CHECK(numel > 0, op, ": shape must describe a non-empty tensor, got ", shape);
  return numel;
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              c10::SymIntArrayRef shape, int64_t blocksize,
                              at::ScalarType dtype) {
  constexpr const char* op = "nf4_dequantize";
  check_blocksize(op, blocksize);
  TORCH_CHECK(is_supported_float(dtype), op,
              ": dtype must be float32, bfloat16 or float16, got ", dtype);
  check_dtype(op, "packed", packed, at::kByte);
  check_dtype(op, "absmax", absmax, at::kFloat);
  check_same_device(op, "absmax", absmax, packed, "packed");
  const int64_t numel = checked_numel(op, shape);
  const int64_t blocks = nf4::num_blocks(numel, blocksize);
  check_numel(op, "packed", packed, nf4::packed_bytes(numel), "two 4-bit codes per byte of shape");
  check_numel(op, "absmax", absmax, blocks, "one scale per block of shape");
  at::Tensor packed_c = packed.contiguous();
  at::Tensor absmax_c = absmax.contiguous();
  at::Tensor out =
      empty_for_streaming_write(C10_AS_INTARRAYREF_SLOW(shape), packed.options().dtype(dtype));
  const CpuKernels& kernels = active_kernels();
  const Dtype out_dtype = kernel_dtype<Dtype>(dtype);
  at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    kernels.nf4_dequantize(packed_c.const_data_ptr<uint8_t>(), absmax_c.const_data_ptr<float>(),
                           numel, blocksize, begin, end, out.mutable_data_ptr(), out_dtype);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cpu(const at::Tensor& input,
                                                               const at::Tensor& code,
                                                               int64_t blocksize) {
  constexpr const char* op = "quantize_blockwise_8bit";
  check_dtype(op, "input", input, at::kFloat);
  check_dtype(op, "code", code, at::kFloat);
  check_numel(op, "code", code, 256, "an 8-bit code map");
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  TORCH_CHECK(input.numel() > 0, op, ": input must not be empty");
  TORCH_CHECK(at::isfinite(input).all().item<bool>(), op, ": input contains NaN or Inf");
  at::Tensor input_c = input.contiguous();
  at::Tensor code_c = code.contiguous();
  TORCH_CHECK((code_c.slice(0, 1) >= code_c.slice(0, 0, 255)).all().item<bool>(), op,
              ": code must be sorted ascending");
  const int64_t numel = input_c.numel();
  const int64_t blocks = nf4::num_blocks(numel, blocksize);
  at::Tensor codes = at::empty(input.sizes(), input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, input.options().dtype(at::kFloat));
  std::vector<uint8_t> lookup(k8bitLookupSize);
  build_8bit_lookup(code_c.const_data_ptr<float>(), lookup.data());
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / blocksize), [&](int64_t b, int64_t e) {
    quantize_blockwise_8bit(input_c.const_data_ptr<float>(), lookup.data(), numel,
                            blocksize, b, e, codes.mutable_data_ptr<uint8_t>(),
                            absmax.mutable_data_ptr<float>());
  });
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_8bit_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                                         const at::Tensor& code, int64_t blocksize) {
  constexpr const char* op = "dequantize_blockwise_8bit";
  check_dtype(op, "codes", codes, at::kByte);
  check_dtype(op, "absmax", absmax, at::kFloat);
  check_dtype(op, "code", code, at::kFloat);
  check_numel(op, "code", code, 256, "an 8-bit code map");
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  check_numel(op, "absmax", absmax, nf4::num_blocks(codes.numel(), blocksize),
              "one scale per block of codes");
  at::Tensor codes_c = codes.contiguous();
  at::Tensor absmax_c = absmax.contiguous();
  at::Tensor code_c = code.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  at::parallel_for(0, codes.numel(), 65536, [&](int64_t begin, int64_t end) {
    dequantize_blockwise_8bit(codes_c.const_data_ptr<uint8_t>(), absmax_c.const_data_ptr<float>(),
                              code_c.const_data_ptr<float>(), codes.numel(), blocksize, begin, end,
                              out.mutable_data_ptr<float>());
  });
  return out;
}

// An NF4 weight made contiguous, with the kernel's view of its block scales.
// Holds the tensors the raw pointers in `scales` point into.
struct KernelWeight {
  at::Tensor packed;
  at::Tensor absmax;
  at::Tensor nested_absmax;
  at::Tensor nested_code;
  BlockScales scales;
  int64_t out_features;
  int64_t in_features;
  int64_t blocksize;

  explicit KernelWeight(const Nf4WeightArgs& weight)
      : packed(weight.packed.contiguous()),
        absmax(weight.absmax.contiguous()),
        out_features(weight.out_features),
        in_features(weight.in_features),
        blocksize(weight.blocksize) {
    if (weight.nested()) {
      nested_absmax = weight.nested_absmax->contiguous();
      nested_code = weight.nested_code->contiguous();
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
int64_t gemv_max_rows(at::ScalarType dtype) {
  return dtype == at::kBFloat16 && bf16_dot_product_supported() ? 6 : 16;
}

// dtype the GEMM path multiplies in: the activations' own, except float16,
// whose CPU GEMM is several times slower than fp32's without AVX512-FP16
// (measured 2.8x at 24 rows), and bfloat16 on CPUs without AVX512-BF16,
// where ATen's bf16 GEMM has no native instructions: on an AVX2-only Zen 5,
// 64x5632 @ 5632x256 took 654 ms in bf16 against 25 ms in fp32 (1 thread),
// the transposed-weight forward 165 vs 32 ms. Those run in fp32 and round
// once at the end (the weight is then not rounded to 16 bits at all).
at::ScalarType gemm_dtype(at::ScalarType dtype) {
  if (dtype == at::kHalf) return at::kFloat;
  if (dtype == at::kBFloat16 && !bf16_dot_product_supported()) return at::kFloat;
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
// at::empty per call (8 MiB) went back into glibc's heap when freed (its mmap
// threshold rises to the size of the first freed mapping), where the small
// tensors autograd saves between calls pinned it: a 16-layer QLoRA model of
// 2048x2048 projections kept ~150 MiB more resident after a training step,
// a 22-layer TinyLlama-shaped one more than bitsandbytes over the whole
// step (tests/test_memory_retention.py). The tensor returned is valid until
// the next call on this thread.
at::Tensor gemm_scratch(int64_t elements, const at::TensorOptions& options) {
  struct Buffer {
    void* data = nullptr;
    size_t capacity = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  constexpr size_t kAlignment = 64;
  const size_t bytes = static_cast<size_t>(elements) * options.dtype().itemsize();
  if (bytes > buffer.capacity) {
    const size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    std::free(buffer.data);
    buffer.data = std::aligned_alloc(kAlignment, rounded);
    buffer.capacity = buffer.data == nullptr ? 0 : rounded;
    TORCH_CHECK(buffer.data != nullptr, "lowrank_ext: out of memory allocating ", rounded,
                " bytes of GEMM scratch");
  }
  return at::from_blob(buffer.data, {elements}, options);
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
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t thread = begin; thread < end; ++thread) worker(next);
  });
}

// rows [M, in] (contiguous bf16) -> [M, out] by the AVX512-BF16 GEMV.
at::Tensor nf4_gemv_bf16_rows(const CpuKernels& kernels, const KernelWeight& weight,
                              const at::Tensor& rows, const float* bias_data) {
  const int64_t count = rows.size(0);
  at::Tensor buffer = at::empty({count, weight.in_features}, rows.options());
  prepare_gemv_input_bf16(static_cast<const uint16_t*>(rows.const_data_ptr()), count,
                          weight.in_features, static_cast<uint16_t*>(buffer.mutable_data_ptr()));
  GemvBf16Input layout;
  layout.data = static_cast<const uint16_t*>(buffer.const_data_ptr());
  layout.rows = count;
  layout.in_features = weight.in_features;
  at::Tensor out = at::empty({count, weight.out_features}, rows.options());
  const int64_t tasks = (weight.out_features + kGemvGrain - 1) / kGemvGrain;
  parallel_dynamic(tasks, [&](auto next) {
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t begin = task * kGemvGrain;
      kernels.nf4_gemv_bf16(layout, weight.data(), weight.scales, weight.out_features,
                            weight.in_features, weight.blocksize, bias_data, begin,
                            std::min(begin + kGemvGrain, weight.out_features),
                            out.mutable_data_ptr(), Dtype::BFloat16);
    }
  });
  return out;
}

// rows [M, in] (contiguous) -> [M, out] by the fused GEMV; bf16 rows take
// the AVX512-BF16 kernel where the active table has one and the row length
// suits it.
at::Tensor nf4_gemv_rows(const KernelWeight& weight, const at::Tensor& rows,
                         const std::optional<at::Tensor>& bias) {
  const CpuKernels& kernels = active_kernels();
  at::Tensor bias_fp32;
  if (bias.has_value()) bias_fp32 = bias->to(at::kFloat).contiguous();
  const float* bias_data = bias.has_value() ? bias_fp32.const_data_ptr<float>() : nullptr;
  if (rows.scalar_type() == at::kBFloat16 && kernels.nf4_gemv_bf16 != nullptr &&
      weight.in_features % kGemvBf16Group == 0) {
    return nf4_gemv_bf16_rows(kernels, weight, rows, bias_data);
  }
  const int64_t count = rows.size(0);
  GemvInput layout;
  layout.rows = count;
  layout.in_features = weight.in_features;
  at::Tensor buffer =
      at::empty({count * gemv_row_stride(layout)}, rows.options().dtype(at::kFloat));
  prepare_gemv_input(rows.const_data_ptr(), kernel_dtype<Dtype>(rows.scalar_type()), count,
                     weight.in_features, buffer.mutable_data_ptr<float>());
  layout.data = buffer.const_data_ptr<float>();
  at::Tensor out = at::empty({count, weight.out_features}, rows.options());
  const Dtype out_dtype = kernel_dtype<Dtype>(out.scalar_type());
  const int64_t tasks = (weight.out_features + kGemvGrain - 1) / kGemvGrain;
  parallel_dynamic(tasks, [&](auto next) {
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t begin = task * kGemvGrain;
      kernels.nf4_gemv(layout, weight.data(), weight.scales, weight.out_features,
                       weight.in_features, weight.blocksize, bias_data, begin,
                       std::min(begin + kGemvGrain, weight.out_features), out.mutable_data_ptr(),
                       out_dtype);
    }
  });
  return out;
}

// grad_rows [M, out] (contiguous) -> grad_rows @ W [M, in] by the fused
// transposed GEMV: threads take column ranges and sum in fp32 straight from
// the 4-bit weight.
at::Tensor nf4_gemv_transposed_rows(const KernelWeight& weight, const at::Tensor& grad_rows) {
  const int64_t count = grad_rows.size(0);
  at::Tensor grad_fp32 = grad_rows.to(at::kFloat).contiguous();
  at::Tensor result = at::empty({count, weight.in_features}, grad_fp32.options());
  const CpuKernels& kernels = active_kernels();
  const int64_t tasks =
      (weight.in_features + kGemvTransposedMaxColumns - 1) / kGemvTransposedMaxColumns;
  parallel_dynamic(tasks, [&](auto next) {
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t begin = task * kGemvTransposedMaxColumns;
      const int64_t end = std::min(begin + kGemvTransposedMaxColumns, weight.in_features);
      kernels.nf4_gemv_transposed(grad_fp32.const_data_ptr<float>(), count, weight.data(),
                                  weight.scales, weight.out_features, weight.in_features,
                                  weight.blocksize, begin, end,
                                  result.mutable_data_ptr<float>() + begin, weight.in_features);
    }
  });
  return result.to(grad_rows.scalar_type());
}

// rows [M, in] (contiguous) -> [M, out]: panel by panel, weight rows are
// dequantized (in parallel) into the activation dtype and multiplied by
// ATen's GEMM, which writes straight into the panel's column slice of the
// output (BLAS takes the row stride) with the bias added there; the dense
// weight never exists as a whole.
at::Tensor nf4_gemm_rows(const KernelWeight& weight, const at::Tensor& rows,
                         const std::optional<at::Tensor>& bias) {
  const int64_t in_features = weight.in_features;
  const int64_t out_features = weight.out_features;
  const int64_t panel_rows = panel_rows_for(in_features, rows.element_size(), out_features);
  at::Tensor panel = gemm_scratch(panel_rows * in_features, rows.options())
                         .view({panel_rows, in_features});
  at::Tensor out = at::empty({rows.size(0), out_features}, rows.options());
  const CpuKernels& kernels = active_kernels();
  const Dtype dtype = kernel_dtype<Dtype>(rows.scalar_type());
  char* panel_data = static_cast<char*>(panel.mutable_data_ptr());
  const int64_t item = rows.element_size();
  for (int64_t first = 0; first < out_features; first += panel_rows) {
    const int64_t count = std::min(panel_rows, out_features - first);
    const int64_t flat = first * in_features;
    at::parallel_for(0, count * in_features, kDequantizeGrain, [&](int64_t begin, int64_t end) {
      kernels.nf4_dequantize_range(weight.data(), weight.scales, weight.blocksize, flat + begin,
                                   flat + end, panel_data + begin * item, dtype);
    });
    at::Tensor weight_panel = panel.narrow(0, 0, count).t();
    at::Tensor out_slice = out.narrow(1, first, count);
    if (bias.has_value()) {
      at::addmm_out(out_slice, bias->narrow(0, first, count), rows, weight_panel);
    } else {
      at::mm_out(out_slice, rows, weight_panel);
    }
  }
  return out;
}

// grad_rows [M, out] (contiguous) -> grad_rows @ W [M, in]: slab by slab of
// weight columns (all out_features rows, a few columns), each slab's product
// written once into its column slice, so every output element is one
// fp32-accumulated GEMM result (no rounding between partial sums in 16-bit
// dtypes).
at::Tensor nf4_gemm_grad_rows(const KernelWeight& weight, const at::Tensor& grad_rows) {
  const int64_t in_features = weight.in_features;
  const int64_t out_features = weight.out_features;
  const int64_t slab_columns =
      panel_rows_for(out_features, grad_rows.element_size(), in_features);
  at::Tensor slab_storage = gemm_scratch(out_features * slab_columns, grad_rows.options());
  at::Tensor grad_input = at::empty({grad_rows.size(0), in_features}, grad_rows.options());
  const CpuKernels& kernels = active_kernels();
  const Dtype dtype = kernel_dtype<Dtype>(grad_rows.scalar_type());
  char* slab_data = static_cast<char*>(slab_storage.mutable_data_ptr());
  const int64_t item = grad_rows.element_size();
  for (int64_t first = 0; first < in_features; first += slab_columns) {
    const int64_t count = std::min(slab_columns, in_features - first);
    at::parallel_for(0, out_features, std::max<int64_t>(1, kDequantizeGrain / count),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t row = begin; row < end; ++row) {
                         const int64_t flat = row * in_features + first;
                         kernels.nf4_dequantize_range(weight.data(), weight.scales,
                                                      weight.blocksize, flat, flat + count,
                                                      slab_data + row * count * item, dtype);
                       }
                     });
    at::Tensor slab = slab_storage.narrow(0, 0, out_features * count).view({out_features, count});
    at::Tensor grad_slice = grad_input.narrow(1, first, count);
    at::mm_out(grad_slice, grad_rows, slab);
  }
  return grad_input;
}

// input [..., in] -> input @ dequant(W).T + bias [..., out] (validated args).
at::Tensor nf4_linear_forward(const Nf4WeightArgs& args, const at::Tensor& input,
                              const std::optional<at::Tensor>& bias) {
  KernelWeight weight(args);
  at::Tensor rows = flatten_rows(input).contiguous();
  std::vector<int64_t> shape = output_shape(input, args.out_features);
  if (rows.size(0) == 0) {
    return at::empty(shape, input.options());
  }
  if (rows.size(0) <= gemv_max_rows(rows.scalar_type())) {
    return nf4_gemv_rows(weight, rows, bias).view(shape);
  }
  const at::ScalarType compute = gemm_dtype(rows.scalar_type());
  std::optional<at::Tensor> compute_bias;
  if (bias.has_value()) compute_bias = bias->to(compute);
  return nf4_gemm_rows(weight, rows.to(compute), compute_bias)
      .to(input.scalar_type())
      .view(shape);
}

at::Tensor nf4_linear_cpu(const at::Tensor& input, const at::Tensor& packed,
                          const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code, double offset,
                          c10::SymInt out_features, c10::SymInt in_features, int64_t blocksize,
                          const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "nf4_linear";
  Nf4WeightArgs weight = checked_linear_weight(op, input, packed, absmax, nested_absmax,
                                               nested_code, offset, out_features, in_features,
                                               blocksize, bias);
  if (input.scalar_type() == at::kDouble) {
    // The float64 reference path (see check_linear_float).
    return at::linear(input,
                      nf4_dense_weight(packed, absmax, nested_absmax, nested_code, offset,
                                       out_features, in_features, blocksize, at::kDouble),
                      bias);
  }
  return nf4_linear_forward(weight, input, bias);
}

at::Tensor nf4_linear_grad_input_cpu(const at::Tensor& grad_output, const at::Tensor& packed,
                                     const at::Tensor& absmax,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code, double offset,
                                     c10::SymInt out_features, c10::SymInt in_features,
                                     int64_t blocksize) {
  constexpr const char* op = "nf4_linear_grad_input";
  Nf4WeightArgs args = checked_grad_input_weight(op, grad_output, packed, absmax, nested_absmax,
                                                 nested_code, offset, out_features, in_features,
                                                 blocksize);
  if (grad_output.scalar_type() == at::kDouble) {
    return at::matmul(grad_output,
                      nf4_dense_weight(packed, absmax, nested_absmax, nested_code, offset,
                                       out_features, in_features, blocksize, at::kDouble));
  }
  KernelWeight weight(args);
  at::Tensor grad_rows = flatten_rows(grad_output).contiguous();
  std::vector<int64_t> shape = output_shape(grad_output, args.in_features);
  if (grad_rows.size(0) == 0) {
    return at::empty(shape, grad_output.options());
  }
  if (grad_rows.size(0) <= gemv_max_rows(grad_rows.scalar_type())) {
    return nf4_gemv_transposed_rows(weight, grad_rows).view(shape);
  }
  const at::ScalarType compute = gemm_dtype(grad_rows.scalar_type());
  return nf4_gemm_grad_rows(weight, grad_rows.to(compute))
      .to(grad_output.scalar_type())
      .view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize_cpu);
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cpu);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit_cpu);
  m.impl("nf4_linear", &nf4_linear_cpu);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cpu);
}

}  // namespace cpu
}  // namespace lowrank

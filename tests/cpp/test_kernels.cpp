// Torch-free tests of the CPU kernels: every SIMD table against the scalar
// reference on awkward sizes (partial blocks, odd counts, sizes that are not
// multiples of the vector width), plus the fp16/bf16 conversions. Built with
// sanitizers in CI. Prints "N passed, M failed" and exits non-zero on failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/float_convert.h"
#include "core/nf4.h"
#include "check.h"
#include "cpu/blockwise_8bit_kernels.h"
#include "cpu/dispatch.h"
#include "cpu/scalar_tail.h"

namespace {

using lowrank::cpu::CpuKernels;
using lowrank::cpu::Dtype;
using lowrank::cpu::Isa;

using lowrank_test::dtype_name;
using lowrank_test::expect;

// Random values of a given dtype, stored as raw 16/32-bit patterns.
std::vector<std::uint8_t> random_values(std::mt19937& rng, Dtype dtype, std::int64_t count,
                                        float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::size_t width = dtype == Dtype::Float32 ? 4 : 2;
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(count) * width + 64);
  for (std::int64_t i = 0; i < count; ++i) {
    float value = normal(rng);
    if (dtype == Dtype::Float32) {
      std::memcpy(&bytes[i * 4], &value, 4);
    } else {
      std::uint16_t half = dtype == Dtype::BFloat16 ? lowrank::float_to_bf16(value)
                                                    : lowrank::float_to_fp16(value);
      std::memcpy(&bytes[i * 2], &half, 2);
    }
  }
  return bytes;
}

void test_nf4_against_scalar(const CpuKernels& kernels, std::mt19937& rng) {
  const CpuKernels& reference = lowrank::cpu::kernels_for(Isa::Scalar);
  const std::int64_t sizes[] = {1, 2, 15, 31, 33, 64, 100, 257, 1000, 4097, 12345};
  const std::int64_t blocksizes[] = {32, 64, 128, 4096};
  const float scales[] = {1.0f, 1e-30f, 1e4f, 1e-40f};  // 1e-40: subnormal inputs
  for (Dtype dtype : {Dtype::Float32, Dtype::BFloat16, Dtype::Float16}) {
    for (std::int64_t numel : sizes) {
      for (std::int64_t blocksize : blocksizes) {
        for (float scale : scales) {
          if (dtype == Dtype::Float16 && (scale > 1e3f || scale < 1e-3f)) continue;
          auto input = random_values(rng, dtype, numel, scale);
          std::int64_t blocks = lowrank::nf4::num_blocks(numel, blocksize);
          std::int64_t bytes = lowrank::nf4::packed_bytes(numel);
          std::vector<std::uint8_t> packed(bytes), expected_packed(bytes);
          std::vector<float> absmax(blocks), expected_absmax(blocks);
          bool finite = kernels.nf4.quantize(input.data(), dtype, numel, blocksize, 0, blocks,
                                             packed.data(), absmax.data());
          // Expected: the element-by-element block quantizer of scalar_tail.h,
          // independent of the loop every table (the scalar one too) shares.
          for (std::int64_t block = 0; block < blocks; ++block) {
            const std::int64_t begin = block * blocksize;
            const std::int64_t end = std::min(begin + blocksize, numel);
            lowrank::cpu::tail::quantize_block(input.data(), dtype, numel, begin, end,
                                               end - begin == blocksize, expected_packed.data(),
                                               expected_absmax.data() + block);
          }
          std::string where = std::string(lowrank::cpu::isa_name(kernels.isa)) + " " +
                              dtype_name(dtype) + " numel=" + std::to_string(numel) +
                              " blocksize=" + std::to_string(blocksize) +
                              " scale=" + std::to_string(scale);
          expect(finite, "finite " + where);
          expect(packed == expected_packed, "packed " + where);
          expect(std::memcmp(absmax.data(), expected_absmax.data(), blocks * sizeof(float)) == 0,
                 "absmax " + where);
          for (Dtype out_dtype : {Dtype::Float32, Dtype::BFloat16, Dtype::Float16}) {
            std::size_t width = out_dtype == Dtype::Float32 ? 4 : 2;
            std::vector<std::uint8_t> out(numel * width), expected_out(numel * width);
            kernels.nf4.dequantize(packed.data(), absmax.data(), numel, blocksize, 0, blocks,
                                   out.data(), out_dtype);
            reference.nf4.dequantize(packed.data(), absmax.data(), numel, blocksize, 0, blocks,
                                     expected_out.data(), out_dtype);
            expect(out == expected_out,
                   std::string("dequantize to ") + dtype_name(out_dtype) + " " + where);
          }
        }
      }
    }
  }
}

void test_non_finite_is_reported(const CpuKernels& kernels) {
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    std::vector<float> input(200, 0.5f);
    input[131] = bad;
    std::vector<std::uint8_t> packed(100);
    std::vector<float> absmax(4);
    bool finite = kernels.nf4.quantize(input.data(), Dtype::Float32, 200, 64, 0, 4, packed.data(),
                                       absmax.data());
    expect(!finite, std::string("non-finite reported on ") + lowrank::cpu::isa_name(kernels.isa));
  }
}

void test_conversions() {
  // Every 16-bit pattern survives 16 -> 32 -> 16 bits (NaNs stay NaN).
  int bf16_mismatches = 0;
  int fp16_mismatches = 0;
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    auto half = static_cast<std::uint16_t>(bits);
    float bf = lowrank::bf16_to_float(half);
    float fp = lowrank::fp16_to_float(half);
    if (std::isnan(bf) ? !std::isnan(lowrank::bf16_to_float(lowrank::float_to_bf16(bf)))
                       : lowrank::float_to_bf16(bf) != half)
      ++bf16_mismatches;
    if (std::isnan(fp) ? !std::isnan(lowrank::fp16_to_float(lowrank::float_to_fp16(fp)))
                       : lowrank::float_to_fp16(fp) != half)
      ++fp16_mismatches;
  }
  expect(bf16_mismatches == 0, "bf16 round trip of all patterns");
  expect(fp16_mismatches == 0, "fp16 round trip of all patterns");
  // Ties round to even; overflow goes to Inf; tiny values to signed zero.
  expect(lowrank::float_to_bf16(lowrank::bits_float(0x3f808000u)) == 0x3f80, "bf16 tie to even");
  expect(lowrank::float_to_bf16(lowrank::bits_float(0x3f818000u)) == 0x3f82, "bf16 tie up to even");
  expect(lowrank::float_to_fp16(65520.0f) == 0x7c00, "fp16 overflow to inf");
  expect(lowrank::float_to_fp16(65519.0f) == 0x7bff, "fp16 below overflow threshold");
  expect(lowrank::float_to_fp16(std::ldexp(1.0f, -25)) == 0x0000, "fp16 half of min subnormal ties to 0");
  expect(lowrank::float_to_fp16(std::ldexp(3.0f, -25)) == 0x0002, "fp16 1.5 min subnormal to 2");
  expect(lowrank::float_to_fp16(-0.0f) == 0x8000, "fp16 negative zero");
}

void test_blockwise_8bit() {
  // Codes round-trip through dequantization to within half the largest map gap.
  std::vector<float> code(256);
  for (int i = 0; i < 256; ++i) code[i] = -1.0f + 2.0f * static_cast<float>(i) / 255.0f;
  std::vector<std::uint8_t> lookup(lowrank::cpu::k8bitLookupSize);
  lowrank::cpu::build_8bit_lookup(code.data(), lookup.data());
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const std::int64_t numel = 1000;
  std::vector<float> input(numel);
  for (float& value : input) value = normal(rng);
  std::fill(input.begin(), input.begin() + 256, 0.0f);  // an all-zero block
  std::vector<std::uint8_t> codes(numel);
  std::vector<float> absmax(4), restored(numel);
  lowrank::cpu::quantize_blockwise_8bit(input.data(), lookup.data(), numel, 256, 0, 4,
                                        codes.data(), absmax.data());
  lowrank::cpu::dequantize_blockwise_8bit(codes.data(), absmax.data(), code.data(), numel, 256, 0,
                                          numel, restored.data());
  float worst = 0.0f;
  for (std::int64_t i = 256; i < numel; ++i)
    worst = std::fmax(worst, std::fabs(restored[i] - input[i]) / absmax[i / 256]);
  expect(absmax[0] == 0.0f && codes[0] == 0, "all-zero block gets code 0");
  expect(worst <= 1.0f / 255.0f + 1e-6f, "8-bit round trip within half a step");
}

// The AVX512-BF16 GEMV against the scalar GEMV on the same bf16 activations:
// each weight may differ by one bf16 rounding of its codebook value (2^-9
// relative), the sums by fp32 reordering, so per output
// |y - expected| <= (2^-8 + in_features 2^-23) * sum |x| |w|.
void test_gemv_bf16(const CpuKernels& kernels, std::mt19937& rng) {
  const CpuKernels& reference = lowrank::cpu::kernels_for(Isa::Scalar);
  struct Shape { std::int64_t rows, out_features, in_features, blocksize; bool double_quant; };
  const Shape shapes[] = {{1, 37, 320, 64, true}, {2, 19, 128, 32, false}, {3, 33, 192, 4096, true},
                          {4, 21, 192, 128, false}, {6, 70, 640, 32, true}};
  for (const Shape& shape : shapes) {
    const std::int64_t numel = shape.out_features * shape.in_features;
    auto weight = random_values(rng, Dtype::Float32, numel, 1.0f);
    const std::int64_t blocks = lowrank::nf4::num_blocks(numel, shape.blocksize);
    std::vector<std::uint8_t> packed(lowrank::nf4::packed_bytes(numel));
    std::vector<float> absmax(blocks);
    reference.nf4.quantize(weight.data(), Dtype::Float32, numel, shape.blocksize, 0, blocks,
                           packed.data(), absmax.data());
    // Double quantization: one 8-bit code per block on a linear code map.
    std::vector<float> nested_code(256);
    for (int i = 0; i < 256; ++i) nested_code[i] = static_cast<float>(i) / 255.0f;
    std::vector<std::uint8_t> nested_codes(blocks);
    std::vector<float> nested_absmax((blocks + 255) / 256, 2.0f);
    for (std::int64_t block = 0; block < blocks; ++block) nested_codes[block] = rng() & 0xff;
    lowrank::cpu::BlockScales scales;
    if (shape.double_quant) {
      scales.nested_codes = nested_codes.data();
      scales.nested_absmax = nested_absmax.data();
      scales.nested_code = nested_code.data();
      scales.offset = 0.25f;
    } else {
      scales.absmax = absmax.data();
    }
    auto input = random_values(rng, Dtype::BFloat16, shape.rows * shape.in_features, 1.0f);
    const auto* input_bf16 = reinterpret_cast<const std::uint16_t*>(input.data());
    std::vector<std::uint16_t> permuted(shape.rows * shape.in_features);
    lowrank::cpu::prepare_gemv_input_bf16(input_bf16, shape.rows, shape.in_features, permuted.data());
    lowrank::cpu::GemvBf16Input fast_input;
    fast_input.data = permuted.data();
    fast_input.rows = shape.rows;
    fast_input.in_features = shape.in_features;
    lowrank::cpu::GemvInput plain_input;
    plain_input.rows = shape.rows;
    plain_input.in_features = shape.in_features;
    std::vector<float> fp32_input(shape.rows * lowrank::cpu::gemv_row_stride(plain_input));
    lowrank::cpu::prepare_gemv_input(input_bf16, Dtype::BFloat16, shape.rows, shape.in_features,
                                     fp32_input.data());
    plain_input.data = fp32_input.data();
    plain_input.rows = shape.rows;
    plain_input.in_features = shape.in_features;
    std::vector<float> result(shape.rows * shape.out_features);
    std::vector<float> expected(result.size());
    kernels.nf4.gemv_bf16(fast_input, packed.data(), scales, shape.out_features,
                          shape.in_features, shape.blocksize, nullptr, 0, shape.out_features,
                          result.data(), Dtype::Float32);
    reference.nf4.gemv(plain_input, packed.data(), scales, shape.out_features, shape.in_features,
                       shape.blocksize, nullptr, 0, shape.out_features, expected.data(),
                       Dtype::Float32);
    bool within = true;
    for (std::int64_t r = 0; r < shape.rows; ++r) {
      for (std::int64_t o = 0; o < shape.out_features; ++o) {
        double magnitude = 0.0;
        for (std::int64_t k = 0; k < shape.in_features; ++k) {
          const std::int64_t flat = o * shape.in_features + k;
          const double w = lowrank::nf4::kCodebook[(packed[flat / 2] >> ((flat & 1) ? 0 : 4)) & 0x0f] *
                           lowrank::cpu::block_scale(scales, flat / shape.blocksize);
          magnitude += std::fabs(w * lowrank::bf16_to_float(input_bf16[r * shape.in_features + k]));
        }
        const double bound = (std::ldexp(1.0, -8) + shape.in_features * std::ldexp(1.0, -23)) * magnitude;
        const std::int64_t index = r * shape.out_features + o;
        within &= std::fabs(static_cast<double>(result[index]) - expected[index]) <= bound;
      }
    }
    expect(within, "bf16 gemv rows=" + std::to_string(shape.rows) + " in=" +
                       std::to_string(shape.in_features) + " blocksize=" +
                       std::to_string(shape.blocksize));
  }
}

// Weight element `flat` of a packed NF4 tensor, as dequantization gives it.
float weight_at(const std::vector<std::uint8_t>& packed, const lowrank::cpu::BlockScales& scales,
                std::int64_t blocksize, std::int64_t flat) {
  const int code = (packed[flat / 2] >> ((flat & 1) ? 0 : 4)) & 0x0f;
  return lowrank::nf4::kCodebook[code] * lowrank::cpu::block_scale(scales, flat / blocksize);
}

// A random NF4 weight with plain or double-quantized scales (the nested
// tables live in `storage`).
struct TestWeight {
  std::vector<std::uint8_t> packed, nested_codes;
  std::vector<float> absmax, nested_absmax, nested_code;
  lowrank::cpu::BlockScales scales;
};

TestWeight make_weight(std::mt19937& rng, std::int64_t numel, std::int64_t blocksize,
                       bool double_quant) {
  TestWeight weight;
  auto dense = random_values(rng, Dtype::Float32, numel, 1.0f);
  const std::int64_t blocks = lowrank::nf4::num_blocks(numel, blocksize);
  weight.packed.resize(lowrank::nf4::packed_bytes(numel));
  weight.absmax.resize(blocks);
  lowrank::cpu::kernels_for(Isa::Scalar)
      .nf4.quantize(dense.data(), Dtype::Float32, numel, blocksize, 0, blocks,
                    weight.packed.data(), weight.absmax.data());
  if (double_quant) {
    weight.nested_code.resize(256);
    for (int i = 0; i < 256; ++i) weight.nested_code[i] = static_cast<float>(i) / 255.0f;
    weight.nested_codes.resize(blocks);
    for (auto& code : weight.nested_codes) code = rng() & 0xff;
    weight.nested_absmax.assign((blocks + 255) / 256, 2.0f);
    weight.scales.nested_codes = weight.nested_codes.data();
    weight.scales.nested_absmax = weight.nested_absmax.data();
    weight.scales.nested_code = weight.nested_code.data();
    weight.scales.offset = 0.25f;
  } else {
    weight.scales.absmax = weight.absmax.data();
  }
  return weight;
}

// The fp32 GEMV of every table against a float64 reference, for every row
// count up to 17 (the kernels take rows in groups) and output ranges that
// start mid-chunk: products of exact fp32 weights summed in fp32, so per
// output |y - exact| <= in_features * 2^-23 * sum |x| |w| (+ the bias and
// the output's rounding).
void test_gemv(const CpuKernels& kernels, std::mt19937& rng) {
  struct Shape { std::int64_t out_features, in_features, blocksize; bool double_quant; };
  // Odd in_features: rows start mid-byte and blocks straddle rows.
  const Shape shapes[] = {{37, 301, 64, true}, {19, 33, 32, false}, {70, 256, 64, true},
                          {33, 129, 4096, false}, {5, 2100, 128, true}};
  for (const Shape& shape : shapes) {
    const std::int64_t numel = shape.out_features * shape.in_features;
    TestWeight weight = make_weight(rng, numel, shape.blocksize, shape.double_quant);
    for (std::int64_t rows = 1; rows <= 17; ++rows) {
      auto input = random_values(rng, Dtype::Float32, rows * shape.in_features, 1.0f);
      auto bias = random_values(rng, Dtype::Float32, shape.out_features, 1.0f);
      const auto* x = reinterpret_cast<const float*>(input.data());
      const auto* b = reinterpret_cast<const float*>(bias.data());
      lowrank::cpu::GemvInput layout;
      layout.rows = rows;
      layout.in_features = shape.in_features;
      std::vector<float> buffer(rows * lowrank::cpu::gemv_row_stride(layout));
      lowrank::cpu::prepare_gemv_input(x, Dtype::Float32, rows, shape.in_features, buffer.data());
      layout.data = buffer.data();
      const std::int64_t out_begin = shape.out_features / 3;
      std::vector<float> result(rows * shape.out_features, -1.0f);
      kernels.nf4.gemv(layout, weight.packed.data(), weight.scales, shape.out_features,
                       shape.in_features, shape.blocksize, b, out_begin, shape.out_features,
                       result.data(), Dtype::Float32);
      bool within = true, untouched = true;
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t o = 0; o < shape.out_features; ++o) {
          const float got = result[r * shape.out_features + o];
          if (o < out_begin) {
            untouched &= got == -1.0f;
            continue;
          }
          double exact = b[o], magnitude = std::fabs(b[o]);
          for (std::int64_t k = 0; k < shape.in_features; ++k) {
            const double product = static_cast<double>(weight_at(weight.packed, weight.scales,
                                                                 shape.blocksize,
                                                                 o * shape.in_features + k)) *
                                   x[r * shape.in_features + k];
            exact += product;
            magnitude += std::fabs(product);
          }
          const double bound = (shape.in_features + 2) * std::ldexp(1.0, -23) * magnitude;
          within &= std::fabs(got - exact) <= bound;
        }
      }
      const std::string where = std::string(lowrank::cpu::isa_name(kernels.isa)) + " rows=" +
                                std::to_string(rows) + " " + std::to_string(shape.out_features) +
                                "x" + std::to_string(shape.in_features) + " blocksize=" +
                                std::to_string(shape.blocksize);
      expect(within, "fp32 gemv within bound " + where);
      expect(untouched, "fp32 gemv writes only its output range " + where);
    }
  }
}

// The transposed GEMV (column ranges, as the glue splits them) against a
// float64 reference, and dequantize_range on arbitrary bounds against the
// scalar table, bit for bit.
void test_gemv_transposed_and_range(const CpuKernels& kernels, std::mt19937& rng) {
  const CpuKernels& reference = lowrank::cpu::kernels_for(Isa::Scalar);
  struct Shape { std::int64_t out_features, in_features, blocksize; bool double_quant; };
  const Shape shapes[] = {{37, 301, 64, true}, {19, 33, 32, false}, {6, 2100, 128, true}};
  for (const Shape& shape : shapes) {
    const std::int64_t numel = shape.out_features * shape.in_features;
    TestWeight weight = make_weight(rng, numel, shape.blocksize, shape.double_quant);
    const std::string where = std::string(lowrank::cpu::isa_name(kernels.isa)) + " " +
                              std::to_string(shape.out_features) + "x" +
                              std::to_string(shape.in_features);
    for (std::int64_t rows : {1, 3, 8}) {
      auto grad_bytes = random_values(rng, Dtype::Float32, rows * shape.out_features, 1.0f);
      const auto* grad = reinterpret_cast<const float*>(grad_bytes.data());
      std::vector<float> result(rows * shape.in_features);
      for (std::int64_t begin = 0; begin < shape.in_features;
           begin += lowrank::cpu::kGemvTransposedMaxColumns) {
        const std::int64_t end =
            std::min(begin + lowrank::cpu::kGemvTransposedMaxColumns, shape.in_features);
        kernels.nf4.gemv_transposed(grad, rows, weight.packed.data(), weight.scales,
                                    shape.out_features, shape.in_features, shape.blocksize, begin,
                                    end, result.data() + begin, shape.in_features);
      }
      bool within = true;
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t k = 0; k < shape.in_features; ++k) {
          double exact = 0.0, magnitude = 0.0;
          for (std::int64_t o = 0; o < shape.out_features; ++o) {
            const double product = static_cast<double>(weight_at(weight.packed, weight.scales,
                                                                 shape.blocksize,
                                                                 o * shape.in_features + k)) *
                                   grad[r * shape.out_features + o];
            exact += product;
            magnitude += std::fabs(product);
          }
          const double bound = (shape.out_features + 1) * std::ldexp(1.0, -23) * magnitude;
          within &= std::fabs(result[r * shape.in_features + k] - exact) <= bound;
        }
      }
      expect(within, "transposed gemv rows=" + std::to_string(rows) + " " + where);
    }
    for (Dtype dtype : {Dtype::Float32, Dtype::BFloat16, Dtype::Float16}) {
      const std::size_t width = dtype == Dtype::Float32 ? 4 : 2;
      bool same = true;
      for (std::int64_t begin : {std::int64_t{0}, std::int64_t{1}, std::int64_t{7}, numel / 2 + 1}) {
        for (std::int64_t end : {numel, numel - 1, begin + 33}) {
          if (end <= begin || end > numel) continue;
          std::vector<std::uint8_t> out((end - begin) * width), expected(out.size());
          kernels.nf4.dequantize_range(weight.packed.data(), weight.scales, shape.blocksize,
                                       begin, end, out.data(), dtype);
          reference.nf4.dequantize_range(weight.packed.data(), weight.scales, shape.blocksize,
                                         begin, end, expected.data(), dtype);
          same &= out == expected;
        }
      }
      expect(same, std::string("dequantize_range to ") + dtype_name(dtype) + " " + where);
    }
  }
}

// Dropout: every table's output equals dropout_hash's mask bit for bit
// (same mask, same fp32 product, same rounding) on ranges that start and end
// off the vector width; kept elements are x * scale, the others zero; the
// kept fraction is within 5 standard deviations of 1 - p.
void test_dropout(Isa isa, std::mt19937& rng) {
  const auto& kernels = lowrank::cpu::kernels_for(isa).dropout;
  const std::int64_t numel = 10007;
  for (Dtype dtype : {Dtype::Float32, Dtype::BFloat16, Dtype::Float16}) {
    const std::size_t width = dtype == Dtype::Float32 ? 4 : 2;
    auto input = random_values(rng, dtype, numel, 1.0f);
    for (double p : {0.1, 0.5, 0.9}) {
      const auto threshold = static_cast<std::uint32_t>(p * 4294967296.0);
      const float scale = static_cast<float>(1.0 / (1.0 - p));
      const std::uint64_t seed = (static_cast<std::uint64_t>(rng()) << 32) | rng();
      std::vector<std::uint8_t> out(numel * width, 0xff), expected(numel * width, 0xff);
      for (std::int64_t begin : {std::int64_t{0}, std::int64_t{3}, std::int64_t{17}}) {
        const std::int64_t end = numel - begin;
        kernels.apply(input.data(), out.data(), dtype, begin, end, seed, threshold, scale);
        // Expected, element by element from dropout_hash (independent of the
        // loop every table, the scalar one too, shares).
        for (std::int64_t i = begin; i < end; ++i) {
          const bool keep = lowrank::cpu::dropout_hash(static_cast<std::uint32_t>(i),
                                                       static_cast<std::uint32_t>(begin >> 32),
                                                       seed) >= threshold;
          const float x = lowrank::cpu::tail::load_float(input.data(), dtype, i);
          lowrank::cpu::tail::store_float(expected.data(), dtype, i, keep ? x * scale : 0.0f);
        }
      }
      const std::string where = std::string(lowrank::cpu::isa_name(isa)) + " " +
                                dtype_name(dtype) + " p=" + std::to_string(p);
      expect(out == expected, "dropout equals the element-wise reference " + where);
      std::int64_t kept = 0;
      bool values = true;
      for (std::int64_t i = 0; i < numel; ++i) {
        const float x = lowrank::cpu::tail::load_float(input.data(), dtype, i);
        const float y = lowrank::cpu::tail::load_float(out.data(), dtype, i);
        std::uint8_t rounded[4];
        lowrank::cpu::tail::store_float(rounded, dtype, 0, x * scale);
        const float kept_value = lowrank::cpu::tail::load_float(rounded, dtype, 0);
        if (y == 0.0f && x != 0.0f) continue;
        ++kept;
        values &= y == kept_value;
      }
      const double mean = numel * (1.0 - p);
      const double deviation = std::sqrt(numel * p * (1.0 - p));
      expect(values, "dropout keeps x * scale " + where);
      expect(std::fabs(kept - mean) <= 5 * deviation, "dropout keep rate " + where);
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(12345);
  test_conversions();
  test_blockwise_8bit();
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512}) {
    if (!lowrank::cpu::isa_supported(isa)) {
      std::printf("note: %s not supported on this CPU, not tested\n", lowrank::cpu::isa_name(isa));
      // The chooser refuses it rather than hand out code this CPU cannot run.
      bool refused = false;
      try {
        lowrank::cpu::kernels_for(isa);
      } catch (const std::invalid_argument&) {
        refused = true;
      }
      expect(refused, std::string("kernels_for refuses unsupported ") + lowrank::cpu::isa_name(isa));
      continue;
    }
    const CpuKernels& kernels = lowrank::cpu::kernels_for(isa);
    expect(kernels.isa == isa, std::string("table for ") + lowrank::cpu::isa_name(isa));
    test_nf4_against_scalar(kernels, rng);
    test_non_finite_is_reported(kernels);
    test_gemv(kernels, rng);
    test_dropout(isa, rng);
    test_gemv_transposed_and_range(kernels, rng);
    if (kernels.nf4.gemv_bf16 != nullptr) test_gemv_bf16(kernels, rng);
  }
  return lowrank_test::report();
}

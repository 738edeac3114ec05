// Torch-free tests of the multi-adapter LoRA kernels: every SIMD table against
// the scalar reference on awkward sizes (in/out features and ranks that are not
// multiples of the vector width, rank 0, rows without an adapter, adapters
// without rows, output ranges that start and end mid-vector). Built with
// sanitizers in CI. Prints "N passed, M failed" and exits non-zero on failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/float_convert.h"
#include "check.h"
#include "cpu/dispatch.h"

namespace {

using lowrank::cpu::Dtype;
using lowrank::cpu::Isa;
using lowrank::cpu::MultiLoraBatch;
using lowrank::cpu::MultiLoraKernels;

using lowrank_test::dtype_name;
using lowrank_test::expect;

// Exactly `count` elements (no slack), so ASan catches any read past the end.
struct Buffer {
  Dtype dtype;
  std::vector<std::uint8_t> bytes;

  Buffer(Dtype type, std::int64_t count)
      : dtype(type), bytes(static_cast<std::size_t>(count) * (type == Dtype::Float32 ? 4 : 2)) {}

  void set(std::int64_t index, float value) {
    if (dtype == Dtype::Float32) {
      std::memcpy(&bytes[index * 4], &value, 4);
      return;
    }
    std::uint16_t half = dtype == Dtype::BFloat16 ? lowrank::float_to_bf16(value)
                                                  : lowrank::float_to_fp16(value);
    std::memcpy(&bytes[index * 2], &half, 2);
  }

  float get(std::int64_t index) const {
    if (dtype == Dtype::Float32) {
      float value;
      std::memcpy(&value, &bytes[index * 4], 4);
      return value;
    }
    std::uint16_t half;
    std::memcpy(&half, &bytes[index * 2], 2);
    return dtype == Dtype::BFloat16 ? lowrank::bf16_to_float(half) : lowrank::fp16_to_float(half);
  }
};

Buffer random_buffer(std::mt19937& rng, Dtype dtype, std::int64_t count) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Buffer buffer(dtype, count);
  for (std::int64_t i = 0; i < count; ++i) buffer.set(i, normal(rng));
  return buffer;
}

struct Case {
  std::int64_t rows, in_features, out_features, num_adapters, max_rank;
};

// Runs shrink over every (adapter, rank chunk) and expand split as the glue
// splits it between threads: over the outputs in two uneven ranges and,
// for the adapters below the middle one, over the adapters in two ranges.
// The expand adds to `base` (which may be `out` itself).
void run(const MultiLoraKernels& kernels, MultiLoraBatch batch, std::vector<float>& hidden,
         const Buffer& base, Buffer& out) {
  batch.base_output = base.bytes.data();
  for (std::int64_t a = 0; a < batch.num_adapters; ++a) {
    for (std::int64_t k = 0; k < batch.ranks[a]; k += 3) {
      kernels.shrink(batch, a, k, std::min(batch.ranks[a], k + 3), hidden.data());
    }
  }
  const std::int64_t split = batch.out_features / 3;
  const std::int64_t middle = batch.num_adapters / 2;
  // Scratch of exactly the documented size (no slack), so ASan catches any
  // kernel that writes past it.
  auto expand = [&](std::int64_t adapter_begin, std::int64_t adapter_end, std::int64_t out_begin,
                    std::int64_t out_end) {
    const std::int64_t floats =
        lowrank::cpu::multi_lora_expand_scratch_floats(batch, adapter_begin, adapter_end);
    std::vector<float> scratch(static_cast<std::size_t>(floats));
    kernels.expand(batch, hidden.data(), adapter_begin, adapter_end, out_begin, out_end,
                   out.bytes.data(), scratch.data(), floats);
  };
  expand(0, middle / 2, 0, batch.out_features);
  expand(middle / 2, middle, 0, batch.out_features);
  expand(middle, batch.num_adapters, 0, split);
  expand(middle, batch.num_adapters, split, batch.out_features);
}

void test_case(Isa isa, Dtype dtype, const Case& shape, std::mt19937& rng) {
  const MultiLoraKernels& kernels = lowrank::cpu::kernels_for(isa).multi_lora;
  Buffer input = random_buffer(rng, dtype, shape.rows * shape.in_features);
  Buffer lora_A = random_buffer(rng, dtype, shape.num_adapters * shape.max_rank * shape.in_features);
  Buffer lora_B = random_buffer(rng, dtype, shape.num_adapters * shape.out_features * shape.max_rank);
  Buffer base = random_buffer(rng, dtype, shape.rows * shape.out_features);

  std::uniform_int_distribution<std::int64_t> rank_of(0, shape.max_rank);
  std::uniform_real_distribution<float> scaling_of(0.25f, 2.0f);
  std::vector<std::int64_t> ranks(shape.num_adapters);
  std::vector<float> scalings(shape.num_adapters);
  for (std::int64_t a = 0; a < shape.num_adapters; ++a) {
    ranks[a] = a == 0 ? 0 : (a == 1 ? shape.max_rank : rank_of(rng));
    scalings[a] = scaling_of(rng);
  }
  // Index -1 (no adapter) included; the last adapter never gets a row.
  std::uniform_int_distribution<std::int64_t> adapter_of(-1, shape.num_adapters - 2);
  std::vector<std::int64_t> index(shape.rows);
  for (auto& value : index) value = adapter_of(rng);
  std::vector<std::int64_t> offsets(shape.num_adapters + 1, 0);
  for (std::int64_t value : index) {
    if (value >= 0) ++offsets[value + 1];
  }
  for (std::int64_t a = 0; a < shape.num_adapters; ++a) offsets[a + 1] += offsets[a];
  std::vector<std::int64_t> sorted(offsets.back());
  std::vector<std::int64_t> next(offsets.begin(), offsets.end() - 1);
  for (std::int64_t row = 0; row < shape.rows; ++row) {
    if (index[row] >= 0) sorted[next[index[row]]++] = row;
  }

  MultiLoraBatch batch;
  batch.dtype = dtype;
  batch.in_features = shape.in_features;
  batch.out_features = shape.out_features;
  batch.max_rank = shape.max_rank;
  batch.input = input.bytes.data();
  batch.lora_A = lora_A.bytes.data();
  batch.lora_B = lora_B.bytes.data();
  batch.ranks = ranks.data();
  batch.scalings = scalings.data();
  batch.group_offsets = offsets.data();
  batch.sorted_rows = sorted.data();
  batch.num_adapters = shape.num_adapters;

  const std::size_t hidden_size = static_cast<std::size_t>(sorted.size() * shape.max_rank);
  std::vector<float> hidden(hidden_size, 0.0f), expected_hidden(hidden_size, 0.0f);
  // The kernel under test writes a separate buffer, whose rows without an
  // adapter must keep their old contents; the reference works in place.
  const Buffer untouched = random_buffer(rng, dtype, shape.rows * shape.out_features);
  Buffer out = untouched, expected = base;
  run(kernels, batch, hidden, base, out);
  run(lowrank::cpu::kernels_for(Isa::Scalar).multi_lora, batch, expected_hidden, expected, expected);

  // fp32 sums of `in_features` products in another order (and with FMA):
  // relative error ~ in_features * 2^-24 of the sum of |products|, bounded here
  // by a multiple of sqrt(in_features) for unit normal data.
  const std::string where = std::string(lowrank::cpu::isa_name(isa)) + " " +
                            dtype_name(dtype) + " rows=" + std::to_string(shape.rows) +
                            " in=" + std::to_string(shape.in_features) +
                            " out=" + std::to_string(shape.out_features) +
                            " adapters=" + std::to_string(shape.num_adapters) +
                            " max_rank=" + std::to_string(shape.max_rank);
  double hidden_error = 0.0;
  for (std::size_t i = 0; i < hidden_size; ++i) {
    hidden_error = std::max(hidden_error, std::fabs(double(hidden[i]) - expected_hidden[i]));
  }
  expect(hidden_error <= 1e-4 * std::sqrt(double(shape.in_features)) * 4.0,
         where + ": shrink differs by " + std::to_string(hidden_error));

  // Output: within two rounding steps of the output dtype of the reference
  // (the same exact value may round to neighbouring numbers), plus the fp32
  // summation error of the adapter term, ~ (in + rank) * 2^-24 of the sum of
  // the magnitudes of the products that make it up.
  const double ulp = dtype == Dtype::Float32 ? 0x1p-23 : (dtype == Dtype::BFloat16 ? 0x1p-7 : 0x1p-10);
  std::vector<std::int64_t> position(shape.rows, -1);
  for (std::size_t p = 0; p < sorted.size(); ++p) position[sorted[p]] = static_cast<std::int64_t>(p);
  const std::size_t width = dtype == Dtype::Float32 ? 4 : 2;
  bool rows_without_adapter_kept = true;
  double worst = 0.0;
  for (std::int64_t row = 0; row < shape.rows; ++row) {
    for (std::int64_t o = 0; o < shape.out_features; ++o) {
      const std::int64_t i = row * shape.out_features + o;
      if (index[row] < 0 || ranks[index[row]] == 0) {
        rows_without_adapter_kept &=
            std::memcmp(&out.bytes[i * width], &untouched.bytes[i * width], width) == 0 &&
            std::memcmp(&expected.bytes[i * width], &base.bytes[i * width], width) == 0;
        continue;
      }
      const std::int64_t a = index[row];
      double magnitude = 0.0;
      for (std::int64_t k = 0; k < ranks[a]; ++k) {
        magnitude += std::fabs(expected_hidden[position[row] * shape.max_rank + k] *
                               lora_B.get((a * shape.out_features + o) * shape.max_rank + k));
      }
      const double tolerance = 2.0 * ulp * std::fabs(expected.get(i)) +
                               4.0 * 0x1p-24 * double(shape.in_features + ranks[a]) * magnitude;
      worst = std::max(worst, std::fabs(double(out.get(i)) - expected.get(i)) / tolerance);
    }
  }
  expect(rows_without_adapter_kept, where + ": a row without adapter (or rank 0) was written");
  expect(worst <= 1.0, where + ": expand differs by " + std::to_string(worst) +
                           " times the tolerance");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const Case cases[] = {
      {1, 1, 1, 2, 1},     {5, 17, 33, 4, 3},     {64, 256, 128, 8, 16},
      {9, 100, 70, 3, 20}, {33, 64, 47, 6, 33},   {7, 31, 16, 2, 8},
      {16, 513, 15, 5, 17}, {3, 8, 300, 3, 1},
  };
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512}) {
    if (!lowrank::cpu::isa_supported(isa)) {
      std::printf("skipping %s (not supported by this CPU)\n", lowrank::cpu::isa_name(isa));
      continue;
    }
    const lowrank::cpu::CpuKernels& table = lowrank::cpu::kernels_for(isa);
    expect(table.isa == isa, std::string("table for ") + lowrank::cpu::isa_name(isa));
    for (Dtype dtype : {Dtype::Float32, Dtype::BFloat16, Dtype::Float16}) {
      for (const Case& shape : cases) test_case(isa, dtype, shape, rng);
    }
  }
  return lowrank_test::report();
}

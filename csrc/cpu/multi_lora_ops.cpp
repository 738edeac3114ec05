// Glue of multi_lora_linear / multi_lora_linear_backward on CPU: validates
// the arguments, groups the rows by adapter (a counting sort, so the kernels
// see each adapter's rows together and read its factors once) and splits the
// shrink and expand over threads with torch's parallel_for.
#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu/dispatch.h"
#include "glue_helpers.h"
#include "multi_lora_checks.h"
#include "op_calls.h"

namespace lowrank {
namespace cpu {
namespace {

// Ranks one shrink task covers: small enough that 64 rows over a few
// adapters still give every thread work, large enough to amortize a task.
constexpr int64_t kShrinkRankChunk = 8;
// Output features per expand task at least (one task reads out*rank of B).
constexpr int64_t kExpandGrain = 256;

// Rows grouped by adapter: rows of adapter a are
// sorted_rows[group_offsets[a] .. group_offsets[a + 1]), in ascending order.
// Rows with index -1 appear nowhere.
struct RowGroups {
  std::vector<int64_t> group_offsets;
  std::vector<int64_t> sorted_rows;
};

RowGroups group_rows(const Tensor& adapter_indices, const MultiLoraShapes& shapes) {
  Tensor indices = make_contiguous(adapter_indices);
  const int64_t* index = indices.const_data_ptr<int64_t>();
  const int64_t count = indices.numel();
  RowGroups groups;
  groups.group_offsets.assign(static_cast<size_t>(shapes.num_adapters + 1), 0);
  for (int64_t i = 0; i < count; ++i) {
    if (index[i] >= 0) groups.group_offsets[index[i] + 1] += shapes.rows_per_index;
  }
  for (int64_t a = 0; a < shapes.num_adapters; ++a) {
    groups.group_offsets[a + 1] += groups.group_offsets[a];
  }
  groups.sorted_rows.resize(static_cast<size_t>(groups.group_offsets.back()));
  std::vector<int64_t> next(groups.group_offsets.begin(), groups.group_offsets.end() - 1);
  for (int64_t i = 0; i < count; ++i) {
    if (index[i] < 0) continue;
    for (int64_t row = i * shapes.rows_per_index; row < (i + 1) * shapes.rows_per_index; ++row) {
      groups.sorted_rows[next[index[i]]++] = row;
    }
  }
  return groups;
}

// Adapter ranges [parts[i], parts[i + 1]) of about equal work, one per
// thread, or nothing when the work cannot be split that way within 25% (a
// few adapters carry most rows). An adapter's work: reading its factors,
// which costs about as much as kFactorRows rows, plus its rows, times rank.
std::vector<int64_t> adapter_parts(const RowGroups& groups, const int64_t* rank,
                                   int64_t num_adapters) {
  constexpr int64_t kFactorRows = 4;
  const int64_t threads = torch::stable::get_num_threads();
  std::vector<int64_t> work(static_cast<size_t>(num_adapters));
  int64_t total = 0;
  for (int64_t a = 0; a < num_adapters; ++a) {
    const int64_t rows = groups.group_offsets[a + 1] - groups.group_offsets[a];
    work[a] = rows == 0 ? 0 : rank[a] * (kFactorRows + rows);
    total += work[a];
  }
  std::vector<int64_t> parts{0};
  int64_t done = 0;
  int64_t largest = 0;
  int64_t part_work = 0;
  for (int64_t a = 0; a < num_adapters; ++a) {
    done += work[a];
    part_work += work[a];
    const int64_t index = static_cast<int64_t>(parts.size());
    if (index < threads && done * threads >= total * index) {
      parts.push_back(a + 1);
      largest = std::max(largest, part_work);
      part_work = 0;
    }
  }
  if (parts.back() != num_adapters) parts.push_back(num_adapters);
  largest = std::max(largest, part_work);
  if (threads > 1 && largest * threads * 4 > total * 5) return {};
  return parts;
}

Tensor multi_lora_linear_cpu(const Tensor& input, const Tensor& base_output, const Tensor& lora_A,
                             const Tensor& lora_B, const Tensor& ranks, const Tensor& scalings,
                             const Tensor& adapter_indices) {
  constexpr const char* op = "multi_lora_linear";
  const MultiLoraShapes shapes = check_multi_lora_args(
      op, input, base_output, "base_output", lora_A, lora_B, ranks, scalings, adapter_indices);
  check_multi_lora_values(op, shapes, ranks, adapter_indices);
  const RowGroups groups = group_rows(adapter_indices, shapes);
  Tensor ranks_c = make_contiguous(ranks);
  const int64_t* rank = ranks_c.const_data_ptr<int64_t>();
  // Rows the expand does not cover (no adapter, or rank 0) keep the base output.
  std::vector<int64_t> uncovered;
  {
    std::vector<bool> covered(static_cast<size_t>(shapes.rows), false);
    for (int64_t a = 0; a < shapes.num_adapters; ++a) {
      if (rank[a] == 0) continue;
      for (int64_t p = groups.group_offsets[a]; p < groups.group_offsets[a + 1]; ++p) {
        covered[groups.sorted_rows[p]] = true;
      }
    }
    for (int64_t row = 0; row < shapes.rows; ++row) {
      if (!covered[row]) uncovered.push_back(row);
    }
  }
  if (static_cast<int64_t>(uncovered.size()) == shapes.rows || shapes.out_features == 0) {
    return make_contiguous(torch::stable::clone(base_output));
  }

  // The expand writes base + delta straight into `out` (no copy of the base
  // output first); the uncovered rows are copied.
  Tensor base_c = make_contiguous(base_output);
  Tensor out = empty_tensor(sizes_vector(base_output), base_output.scalar_type(), base_output.device());
  const int64_t row_bytes =
      shapes.out_features * static_cast<int64_t>(base_output.element_size());
  const auto* base_bytes = static_cast<const char*>(base_c.const_data_ptr());
  auto* out_bytes = static_cast<char*>(out.mutable_data_ptr());
  torch::stable::parallel_for(0, static_cast<int64_t>(uncovered.size()), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(out_bytes + uncovered[i] * row_bytes, base_bytes + uncovered[i] * row_bytes,
                  static_cast<size_t>(row_bytes));
    }
  });

  Tensor input_c = make_contiguous(input);
  Tensor lora_A_c = make_contiguous(lora_A);
  Tensor lora_B_c = make_contiguous(lora_B);
  Tensor scalings_c = make_contiguous(scalings);
  MultiLoraBatch batch;
  batch.dtype = kernel_dtype<Dtype>(input.scalar_type());
  batch.in_features = shapes.in_features;
  batch.out_features = shapes.out_features;
  batch.max_rank = shapes.max_rank;
  batch.input = input_c.const_data_ptr();
  batch.lora_A = lora_A_c.const_data_ptr();
  batch.lora_B = lora_B_c.const_data_ptr();
  batch.base_output = base_c.const_data_ptr();
  batch.ranks = rank;
  batch.scalings = scalings_c.const_data_ptr<float>();
  batch.group_offsets = groups.group_offsets.data();
  batch.sorted_rows = groups.sorted_rows.data();
  batch.num_adapters = shapes.num_adapters;

  // hidden [rows with an adapter (sorted order), max_rank] fp32; entries past
  // an adapter's rank are never written nor read.
  std::vector<float> hidden(groups.sorted_rows.size() * static_cast<size_t>(shapes.max_rank));
  const MultiLoraKernels& kernels = active_kernels().multi_lora;
  const std::vector<int64_t> parts = adapter_parts(groups, rank, shapes.num_adapters);
  if (!parts.empty()) {
    // One parallel region: each thread takes whole adapters, shrink then
    // expand over every output (their rows are its own), one adapter at a
    // time, so `hidden` stays in cache and the factors are one stream.
    torch::stable::parallel_for(0, static_cast<int64_t>(parts.size()) - 1, 1, [&](int64_t begin, int64_t end) {
      // The kernels allocate nothing: the expand's working memory, for the
      // largest adapter of these parts, reused adapter after adapter.
      std::vector<float> scratch(static_cast<size_t>(
          multi_lora_expand_scratch_floats(batch, parts[begin], parts[end])));
      const int64_t scratch_floats = static_cast<int64_t>(scratch.size());
      for (int64_t part = begin; part < end; ++part) {
        for (int64_t a = parts[part]; a < parts[part + 1]; ++a) {
          if (rank[a] == 0 || groups.group_offsets[a] == groups.group_offsets[a + 1]) continue;
          kernels.shrink(batch, a, 0, rank[a], hidden.data());
          kernels.expand(batch, hidden.data(), a, a + 1, 0, shapes.out_features, out_bytes,
                         scratch.data(), scratch_floats);
        }
      }
    });
    return out;
  }
  // Work concentrated on few adapters: split the shrink by (adapter, chunk of
  // its ranks) and the expand by outputs instead.
  struct ShrinkTask {
    int64_t adapter, rank_begin, rank_end;
  };
  std::vector<ShrinkTask> tasks;
  for (int64_t a = 0; a < shapes.num_adapters; ++a) {
    if (groups.group_offsets[a] == groups.group_offsets[a + 1]) continue;
    for (int64_t k = 0; k < rank[a]; k += kShrinkRankChunk) {
      tasks.push_back({a, k, std::min(rank[a], k + kShrinkRankChunk)});
    }
  }
  torch::stable::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      kernels.shrink(batch, tasks[t].adapter, tasks[t].rank_begin, tasks[t].rank_end,
                     hidden.data());
    }
  });
  const int64_t scratch_floats = multi_lora_expand_scratch_floats(batch, 0, shapes.num_adapters);
  torch::stable::parallel_for(0, shapes.out_features, kExpandGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
    kernels.expand(batch, hidden.data(), 0, shapes.num_adapters, begin, end, out_bytes,
                   scratch.data(), scratch_floats);
  });
  return out;
}

// Per adapter group, in fp32 with ATen GEMMs on the rows sorted by adapter
// (each adapter's factors are read once):
//   hidden = X A^T, grad_hidden = s * dY B, grad_X = grad_hidden A,
//   grad_A = grad_hidden^T X, grad_B = s * dY^T hidden.
Tensors3 multi_lora_linear_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                        const Tensor& lora_A, const Tensor& lora_B,
                                        const Tensor& ranks, const Tensor& scalings,
                                        const Tensor& adapter_indices) {
  constexpr const char* op = "multi_lora_linear_backward";
  const MultiLoraShapes shapes = check_multi_lora_args(
      op, input, grad_output, "grad_output", lora_A, lora_B, ranks, scalings, adapter_indices);
  check_multi_lora_values(op, shapes, ranks, adapter_indices);
  const torch::stable::Device device = input.device();
  Tensor grad_input = zeros_tensor({shapes.rows, shapes.in_features}, kFloat, device);
  Tensor grad_A = zeros_tensor(sizes_vector(lora_A), kFloat, device);
  Tensor grad_B = zeros_tensor(sizes_vector(lora_B), kFloat, device);
  const RowGroups groups = group_rows(adapter_indices, shapes);
  if (!groups.sorted_rows.empty()) {
    const int64_t count_rows = static_cast<int64_t>(groups.sorted_rows.size());
    Tensor order = empty_tensor({count_rows}, kLong, device);
    std::memcpy(order.mutable_data_ptr<int64_t>(), groups.sorted_rows.data(),
                groups.sorted_rows.size() * sizeof(int64_t));
    Tensor x = to_dtype(
        aten_index_select(reshape_to(input, {shapes.rows, shapes.in_features}), 0, order), kFloat);
    Tensor dy = to_dtype(
        aten_index_select(reshape_to(grad_output, {shapes.rows, shapes.out_features}), 0, order),
        kFloat);
    Tensor grad_x = zeros_tensor(sizes_vector(x), kFloat, device);
    Tensor ranks_c = make_contiguous(ranks);
    Tensor scalings_c = make_contiguous(scalings);
    const int64_t* rank = ranks_c.const_data_ptr<int64_t>();
    const float* scaling = scalings_c.const_data_ptr<float>();
    for (int64_t a = 0; a < shapes.num_adapters; ++a) {
      const int64_t begin = groups.group_offsets[a];
      const int64_t count = groups.group_offsets[a + 1] - begin;
      if (count == 0 || rank[a] == 0) continue;
      Tensor x_a = narrow_view(x, 0, begin, count);
      Tensor dy_a = narrow_view(dy, 0, begin, count);
      Tensor A = to_dtype(narrow_view(torch::stable::select(lora_A, 0, a), 0, 0, rank[a]), kFloat);  // [r, in]
      Tensor B = to_dtype(narrow_view(torch::stable::select(lora_B, 0, a), 1, 0, rank[a]), kFloat);  // [out, r]
      Tensor hidden = aten_mm(x_a, transposed(A));                                             // [count, r]
      Tensor grad_hidden = aten_mul(aten_mm(dy_a, B), scaling[a]);                         // [count, r]
      Tensor grad_x_a = narrow_view(grad_x, 0, begin, count);
      aten_mm_out(grad_x_a, grad_hidden, A);
      Tensor grad_A_a = narrow_view(torch::stable::select(grad_A, 0, a), 0, 0, rank[a]);
      copy_into(grad_A_a, aten_mm(transposed(grad_hidden), x_a));
      Tensor grad_B_a = narrow_view(torch::stable::select(grad_B, 0, a), 1, 0, rank[a]);
      copy_into(grad_B_a, aten_mul(aten_mm(transposed(dy_a), hidden), scaling[a]));
    }
    aten_index_copy_(grad_input, 0, order, grad_x);
  }
  const ScalarType dtype = input.scalar_type();
  return {view_shape(to_dtype(grad_input, dtype), sizes_vector(input)), to_dtype(grad_A, dtype),
          to_dtype(grad_B, dtype)};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  LOWRANK_IMPL(m, multi_lora_linear, multi_lora_linear_cpu);
  LOWRANK_IMPL(m, multi_lora_linear_backward, multi_lora_linear_backward_cpu);
}

}  // namespace cpu
}  // namespace lowrank

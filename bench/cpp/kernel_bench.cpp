// Times the raw NF4 kernels of every ISA this CPU supports, on one thread:
// quantize and dequantize of a fp32 matrix (GB/s of fp32 data), and the
// fused GEMV (ms per call and GB/s of packed weight read).
//
// Usage: lowrank_kernel_bench [out_features in_features [gemv_rows [repeats [blocksize]]]]
// (defaults 4096 4096 1 9 64). Prints medians; LOWRANK_BENCH_CLOCK=cpu times
// the thread's CPU time instead of wall time.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <ctime>
#include <vector>

#include "core/nf4.h"
#include "cpu/dispatch.h"

namespace {

using lowrank::cpu::BlockScales;
using lowrank::cpu::CpuKernels;
using lowrank::cpu::Dtype;
using lowrank::cpu::GemvInput;
using lowrank::cpu::Isa;

// Wall time, or with LOWRANK_BENCH_CLOCK=cpu the thread's CPU time: on a
// machine shared with other work, a time slice lost to another process then
// does not count (the wall time of one run doubled now and then on a shared
// two-core machine).
double now_seconds() {
  static const bool cpu_clock = [] {
    const char* clock = std::getenv("LOWRANK_BENCH_CLOCK");
    return clock != nullptr && std::string(clock) == "cpu";
  }();
  if (cpu_clock) {
    timespec time;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &time);
    return static_cast<double>(time.tv_sec) + 1e-9 * static_cast<double>(time.tv_nsec);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <typename Work>
double median_seconds(int repeats, Work&& work) {
  work();  // warm-up: page faults and caches
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    const double start = now_seconds();
    work();
    times.push_back(now_seconds() - start);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t out_features = argc > 2 ? std::atoll(argv[1]) : 4096;
  const std::int64_t in_features = argc > 2 ? std::atoll(argv[2]) : 4096;
  const std::int64_t rows = argc > 3 ? std::atoll(argv[3]) : 1;
  const int repeats = argc > 4 ? std::atoi(argv[4]) : 9;
  const std::int64_t blocksize = argc > 5 ? std::atoll(argv[5]) : 64;
  if (!lowrank::nf4::valid_blocksize(blocksize) || out_features <= 0 || in_features <= 0 ||
      rows <= 0 || repeats <= 0) {
    std::fprintf(stderr, "sizes, rows and repeats must be positive; blocksize a power of two in [32, 4096]\n");
    return 2;
  }
  const std::int64_t numel = out_features * in_features;
  const std::int64_t blocks = lowrank::nf4::num_blocks(numel, blocksize);

  std::mt19937 generator(0);
  std::normal_distribution<float> normal;
  std::vector<float> weight(numel);
  for (float& value : weight) value = normal(generator);
  std::vector<float> activations(rows * in_features);
  for (float& value : activations) value = normal(generator);
  std::vector<std::uint8_t> packed(lowrank::nf4::packed_bytes(numel));
  std::vector<float> absmax(blocks);
  std::vector<float> dense(numel);
  GemvInput input;
  input.rows = rows;
  input.in_features = in_features;
  std::vector<float> gemv_buffer(rows * gemv_row_stride(input));
  lowrank::cpu::prepare_gemv_input(activations.data(), Dtype::Float32, rows, in_features,
                                   gemv_buffer.data());
  input.data = gemv_buffer.data();
  std::vector<float> out(rows * out_features);

  std::printf("NF4 kernels, one thread, weight %lldx%lld fp32, blocksize %lld, GEMV rows %lld\n",
              static_cast<long long>(out_features), static_cast<long long>(in_features),
              static_cast<long long>(blocksize), static_cast<long long>(rows));
  std::printf("%-8s %16s %18s %12s %18s\n", "isa", "quantize GB/s", "dequantize GB/s",
              "gemv ms", "gemv weight GB/s");
  const double fp32_bytes = static_cast<double>(numel) * sizeof(float);
  const double packed_bytes = static_cast<double>(packed.size());
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512}) {
    if (!lowrank::cpu::isa_supported(isa)) continue;
    const CpuKernels& kernels = lowrank::cpu::kernels_for(isa);
    double quantize = median_seconds(repeats, [&] {
      kernels.nf4.quantize(weight.data(), Dtype::Float32, numel, blocksize, 0, blocks,
                           packed.data(), absmax.data());
    });
    double dequantize = median_seconds(repeats, [&] {
      kernels.nf4.dequantize(packed.data(), absmax.data(), numel, blocksize, 0, blocks,
                             dense.data(), Dtype::Float32);
    });
    BlockScales scales;
    scales.absmax = absmax.data();
    double gemv = median_seconds(repeats, [&] {
      kernels.nf4.gemv(input, packed.data(), scales, out_features, in_features, blocksize,
                       nullptr, 0, out_features, out.data(), Dtype::Float32);
    });
    std::printf("%-8s %16.2f %18.2f %12.3f %18.2f\n", lowrank::cpu::isa_name(isa),
                fp32_bytes / quantize * 1e-9, fp32_bytes / dequantize * 1e-9, gemv * 1e3,
                packed_bytes / gemv * 1e-9);
  }
  return 0;
}

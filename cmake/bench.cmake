# C++ microbenchmarks of the raw CPU kernels (torch-free), built with
# -DLOWRANK_BUILD_BENCH=ON and never installed: run them from the build tree.
add_executable(lowrank_kernel_bench bench/cpp/kernel_bench.cpp)
target_link_libraries(lowrank_kernel_bench PRIVATE lowrank_cpu_kernels)

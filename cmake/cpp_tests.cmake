# Torch-free C++ tests of the CPU kernels (every ISA this CPU has), optionally
# under sanitizers:  cmake -S . -B build/cpp -DLOWRANK_KERNELS_ONLY=ON
#   -DLOWRANK_BUILD_CPP_TESTS=ON -DLOWRANK_SANITIZE=address,undefined && ctest
enable_testing()
file(GLOB LOWRANK_CPP_TEST_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/tests/cpp/test_*.cpp)
foreach(test_source ${LOWRANK_CPP_TEST_SOURCES})
  get_filename_component(test_name ${test_source} NAME_WE)
  add_executable(${test_name} ${test_source})
  target_link_libraries(${test_name} PRIVATE lowrank_cpu_kernels)
  if(LOWRANK_SANITIZE)
    target_compile_options(${test_name} PRIVATE -fsanitize=${LOWRANK_SANITIZE} -fno-omit-frame-pointer
                                                -fno-sanitize-recover=all)
    target_link_options(${test_name} PRIVATE -fsanitize=${LOWRANK_SANITIZE})
  endif()
  add_test(NAME ${test_name} COMMAND ${test_name})
endforeach()

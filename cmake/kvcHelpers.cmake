# SPDX-License-Identifier: Apache-2.0
# Helpers for kvc's own tests, benches and examples.

# Flags for kvc's own targets (never for consumers).
add_library(kvc_dev_flags INTERFACE)
target_compile_options(kvc_dev_flags INTERFACE -Wall -Wextra -Wpedantic $<$<BOOL:${KVC_WERROR}>:-Werror>
                                               $<$<BOOL:${KVC_NATIVE}>:-march=native>
                                               # GCC 12-13 report std::string concatenation as
                                               # overlapping memcpy at -O2+ (GCC bug 105329).
                                               $<$<AND:$<CXX_COMPILER_ID:GNU>,$<VERSION_LESS:$<CXX_COMPILER_VERSION>,14>>:-Wno-restrict>)
if(KVC_SANITIZE)
  # GCC's `undefined` group leaves out float-cast-overflow (a double outside an int's range cast
  # to int, the bug class a spec such as bits=1e10 hits); name it so both compilers check it.
  string(REPLACE "," ";" _kvc_san_list "${KVC_SANITIZE}")
  if("undefined" IN_LIST _kvc_san_list)
    list(APPEND _kvc_san_list float-cast-overflow)
  endif()
  string(REPLACE ";" "," _kvc_san "${_kvc_san_list}")
  target_compile_options(kvc_dev_flags INTERFACE -fsanitize=${_kvc_san} -fno-omit-frame-pointer
                                                 -fno-sanitize-recover=all)
  target_link_options(kvc_dev_flags INTERFACE -fsanitize=${_kvc_san})
endif()

# kvc_add_test(name SOURCES a.cpp ... [LABELS l ...] [LIBS ...])
# One Catch2 executable registered as one CTest test.
function(kvc_add_test name)
  cmake_parse_arguments(A "" "" "SOURCES;LABELS;LIBS" ${ARGN})
  add_executable(${name} ${A_SOURCES})
  target_link_libraries(${name} PRIVATE kvc::kvc kvc_test_support kvc_dev_flags ${A_LIBS})
  add_test(NAME ${name} COMMAND ${name})
  if(A_LABELS)
    set_tests_properties(${name} PROPERTIES LABELS "${A_LABELS}")
  endif()
endfunction()

# kvc_add_benchmark(name SOURCES a.cpp ... [LIBS ...])
function(kvc_add_benchmark name)
  cmake_parse_arguments(A "" "" "SOURCES;LIBS" ${ARGN})
  add_executable(${name} ${A_SOURCES})
  target_link_libraries(${name} PRIVATE kvc::kvc kvc_bench_support kvc_dev_flags benchmark::benchmark ${A_LIBS})
endfunction()

// SPDX-License-Identifier: Apache-2.0
// Built with -mavx2 -mfma -mf16c (tests/isa/CMakeLists.txt).
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "isa_tu_avx2.cpp must be built with -mavx2 -mfma -mf16c"
#endif
#define KVC_PROBE_NAME probe_avx2
#include "isa_probe.hpp"

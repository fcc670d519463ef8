// SPDX-License-Identifier: Apache-2.0
// Built without -m flags (tests/isa/CMakeLists.txt).
#if defined(__AVX2__) || defined(__F16C__)
#error "isa_tu_base.cpp must be built without AVX2 / F16C"
#endif
#define KVC_PROBE_NAME probe_base
#include "isa_probe.hpp"

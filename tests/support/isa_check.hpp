// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Which SIMD paths a test binary exercises. The kernels pick their path at compile time
/// (xsimd::default_arch, __F16C__ for half loads, __AVX2__ for bf16 loads, KVC_QUANT_AVX2 for the
/// codecs' unpackers, encoders and the integer decode paths), so a test built with the wrong flags
/// silently tests another path. The _avx2 builds (tests/CMakeLists.txt, kvc_add_test_avx2) define
/// KVC_TEST_EXPECT_AVX2 (the _avx512 builds, kvc_add_test_avx512, KVC_TEST_EXPECT_AVX512): there
/// a wrong path is a compile error here, not a green test of the portable code.
/// kvc_test::simd_path() names the path so the run log says it too.

#include <string>
#include <type_traits>

#include <kvc/cpu/simd.hpp>
#include <kvc/quant/codec.hpp>

#if defined(KVC_TEST_EXPECT_AVX2) && KVC_TEST_EXPECT_AVX2
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "an _avx2 test is built without -mavx2 -mfma -mf16c: it would test the portable paths"
#endif
static_assert(std::is_base_of<xsimd::avx2, kvc::cpu::default_arch>::value,
              "the _avx2 tests must run the kernels on xsimd's AVX2 arch");
static_assert(kvc::cpu::fbatch<kvc::cpu::default_arch>::size == 8, "AVX2 float batches are 8 wide");
static_assert(KVC_QUANT_AVX2 == 1, "the codecs' AVX2 paths (KVC_QUANT_AVX2) must be compiled in");
#endif
#if defined(KVC_TEST_EXPECT_AVX512) && KVC_TEST_EXPECT_AVX512
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "an _avx512 test is built without -mavx512f -mavx512bw ... -mavx2 -mfma -mf16c: it would test another path"
#endif
static_assert(std::is_base_of<xsimd::avx512f, kvc::cpu::default_arch>::value,
              "the _avx512 tests must run the kernels on xsimd's AVX-512 arch");
static_assert(kvc::cpu::fbatch<kvc::cpu::default_arch>::size == 16, "AVX-512 float batches are 16 wide");
static_assert(KVC_QUANT_AVX2 == 1, "the codecs' AVX2 paths (KVC_QUANT_AVX2) must be compiled in");
#endif

namespace kvc_test {

/// xsimd's name of the arch the kernels run on, plus whether the codecs' AVX2 paths are in.
inline std::string simd_path() {
  return std::string(kvc::cpu::default_arch::name()) + (KVC_QUANT_AVX2 ? " +quant-avx2" : " (portable codecs)");
}

/// True when this binary is meant to exercise the AVX2 paths (then simd_path() must say so).
inline constexpr bool expect_avx2() {
#if defined(KVC_TEST_EXPECT_AVX2) && KVC_TEST_EXPECT_AVX2
  return true;
#else
  return false;
#endif
}

/// True when this binary is meant to exercise the AVX-512 paths (16-wide float batches).
inline constexpr bool expect_avx512() {
#if defined(KVC_TEST_EXPECT_AVX512) && KVC_TEST_EXPECT_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace kvc_test

// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// The instruction-set rule (docs/isa.md): kvc is header-only, so a program may build one TU with
/// `-mavx2 -mfma -mf16c` and another without. An inline function whose *body* depends on those
/// flags would then have two definitions under one name, and the linker keeps one of them (an
/// ODR violation: SIGILL or the wrong path in the other TU). Two tools keep that from happening:
///
///  1. Code compiled differently per ISA (the CPU kernels of <kvc/cpu/>) lives in an inline
///     namespace named after the ISA, `KVC_BEGIN_ISA_NAMESPACE ... KVC_END_ISA_NAMESPACE`, so each
///     TU's copy has its own mangled name. Callers write kvc::cpu::decode_attention as before.
///  2. Everything else, the data types above all (half, kv_cache, quant_cache, codecs), is one
///     definition in every TU: its SIMD paths are compiled for a fixed target with
///     `KVC_TARGET_AVX2` and chosen at run time by `detail::cpu_has_avx2_fma_f16c()`, never by
///     the TU's -m flags.
///
/// Rule: code outside an ISA namespace must not test __AVX2__, __F16C__, __FMA__, KVC_HAS_F16C,
/// KVC_QUANT_AVX2 or xsimd::default_arch, nor call into an ISA namespace.

#include <kvc/config.hpp>

// ---- the ISA namespace's name: every macro that changes kvc's or xsimd's choice of code ----

#if defined(__AVX512BW__)
#define KVC_ISA_LEVEL_ avx512bw
#elif defined(__AVX512DQ__)
#define KVC_ISA_LEVEL_ avx512dq
#elif defined(__AVX512CD__)
#define KVC_ISA_LEVEL_ avx512cd
#elif defined(__AVX512F__)
#define KVC_ISA_LEVEL_ avx512f
#elif defined(__AVX2__)
#define KVC_ISA_LEVEL_ avx2
#elif defined(__AVX__)
#define KVC_ISA_LEVEL_ avx
#elif defined(__SSE4_2__)
#define KVC_ISA_LEVEL_ sse4_2
#elif defined(__SSE4_1__)
#define KVC_ISA_LEVEL_ sse4_1
#elif defined(__SSSE3__)
#define KVC_ISA_LEVEL_ ssse3
#elif defined(__SSE3__)
#define KVC_ISA_LEVEL_ sse3
#elif defined(__SSE2__) || defined(_M_X64)
#define KVC_ISA_LEVEL_ sse2
#elif defined(__aarch64__) || defined(_M_ARM64)
#define KVC_ISA_LEVEL_ neon64
#elif defined(__ARM_NEON)
#define KVC_ISA_LEVEL_ neon
#else
#define KVC_ISA_LEVEL_ generic
#endif

#if defined(__FMA__)
#define KVC_ISA_FMA_ _fma
#else
#define KVC_ISA_FMA_
#endif
#if defined(__F16C__)
#define KVC_ISA_F16C_ _f16c
#else
#define KVC_ISA_F16C_
#endif

#define KVC_ISA_CAT_(a, b, c, d) a##b##c##d
#define KVC_ISA_CAT(a, b, c, d) KVC_ISA_CAT_(a, b, c, d)
#define KVC_ISA_STR_(x) #x
#define KVC_ISA_STR(x) KVC_ISA_STR_(x)

/// The ISA namespace of this TU, e.g. `isa_avx2_fma_f16c` or `isa_sse2`.
#define KVC_ISA_NAMESPACE KVC_ISA_CAT(isa_, KVC_ISA_LEVEL_, KVC_ISA_FMA_, KVC_ISA_F16C_)
#define KVC_BEGIN_ISA_NAMESPACE inline namespace KVC_ISA_NAMESPACE {
#define KVC_END_ISA_NAMESPACE }

// ---- fixed-target SIMD in ISA-neutral code, chosen at run time ----

/// 1 where ISA-neutral code may carry AVX2 + FMA + F16C functions selected at run time:
/// GCC or Clang on x86-64, outside nvcc (whose front end is not asked to parse target attributes;
/// a .cu TU runs the portable paths).
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && !defined(__CUDACC__)
#define KVC_X86_DISPATCH 1
/// A function compiled for AVX2 + FMA + F16C whatever the TU's flags; call it only when
/// kvc::detail::cpu_has_avx2_fma_f16c() is true.
#define KVC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#include <immintrin.h>
#include <cpuid.h>
#else
#define KVC_X86_DISPATCH 0
#define KVC_TARGET_AVX2
#endif

KVC_BEGIN_NAMESPACE
namespace detail {

/// Whether this CPU (and OS) runs AVX2, FMA and F16C. Asked once; the same body in every TU.
inline bool cpu_has_avx2_fma_f16c() noexcept {
#if KVC_X86_DISPATCH
  static const bool yes = [] {
    __builtin_cpu_init();  // needed when first called from a static initialiser
    // F16C from CPUID leaf 1 (ECX bit 29): clang before 16 rejects "f16c" in
    // __builtin_cpu_supports, and F16C needs only the AVX state that "avx2" already checks.
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace detail
KVC_END_NAMESPACE

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
#define KVC_ISA_LEVEL_RANK_ 12
#elif defined(__AVX512DQ__)
#define KVC_ISA_LEVEL_ avx512dq
#define KVC_ISA_LEVEL_RANK_ 11
#elif defined(__AVX512CD__)
#define KVC_ISA_LEVEL_ avx512cd
#define KVC_ISA_LEVEL_RANK_ 10
#elif defined(__AVX512F__)
#define KVC_ISA_LEVEL_ avx512f
#define KVC_ISA_LEVEL_RANK_ 9
#elif defined(__AVX2__)
#define KVC_ISA_LEVEL_ avx2
#define KVC_ISA_LEVEL_RANK_ 8
#elif defined(__AVX__)
#define KVC_ISA_LEVEL_ avx
#define KVC_ISA_LEVEL_RANK_ 7
#elif defined(__SSE4_2__)
#define KVC_ISA_LEVEL_ sse4_2
#define KVC_ISA_LEVEL_RANK_ 6
#elif defined(__SSE4_1__)
#define KVC_ISA_LEVEL_ sse4_1
#define KVC_ISA_LEVEL_RANK_ 5
#elif defined(__SSSE3__)
#define KVC_ISA_LEVEL_ ssse3
#define KVC_ISA_LEVEL_RANK_ 4
#elif defined(__SSE3__)
#define KVC_ISA_LEVEL_ sse3
#define KVC_ISA_LEVEL_RANK_ 3
#elif defined(__SSE2__) || defined(_M_X64)
#define KVC_ISA_LEVEL_ sse2
#define KVC_ISA_LEVEL_RANK_ 2
#elif defined(__aarch64__) || defined(_M_ARM64)
#define KVC_ISA_LEVEL_ neon64
#define KVC_ISA_LEVEL_RANK_ 2
#elif defined(__ARM_NEON)
#define KVC_ISA_LEVEL_ neon
#define KVC_ISA_LEVEL_RANK_ 2
#else
#define KVC_ISA_LEVEL_ generic
#define KVC_ISA_LEVEL_RANK_ 1
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

/// This TU's place in run-time dispatch (runtime/isa_dispatch.hpp): the level's rank, then FMA,
/// then F16C. A higher rank is preferred where the CPU runs it.
#define KVC_ISA_RANK (KVC_ISA_LEVEL_RANK_ * 4 + (sizeof(KVC_ISA_STR(KVC_ISA_FMA_)) > 1 ? 2 : 0) + \
                      (sizeof(KVC_ISA_STR(KVC_ISA_F16C_)) > 1 ? 1 : 0))

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

KVC_BEGIN_ISA_NAMESPACE  // its body tests this TU's ISA macros

/// Whether this CPU has every instruction-set feature this TU was compiled for, of those kvc's ISA
/// namespace is named after: run-time dispatch uses a configuration only where this is true.
/// (Not x86 with GCC or Clang: true, the TU's target being the machine's.)
inline bool isa_runs_here() noexcept {
#if KVC_X86_DISPATCH
  __builtin_cpu_init();
  bool ok = true;
#if defined(__AVX512BW__)
  ok = ok && __builtin_cpu_supports("avx512bw");
#endif
#if defined(__AVX512DQ__)
  ok = ok && __builtin_cpu_supports("avx512dq");
#endif
#if defined(__AVX512CD__)
  ok = ok && __builtin_cpu_supports("avx512cd");
#endif
#if defined(__AVX512VL__)
  ok = ok && __builtin_cpu_supports("avx512vl");
#endif
#if defined(__AVX512F__)
  ok = ok && __builtin_cpu_supports("avx512f");
#endif
#if defined(__AVX2__)
  ok = ok && __builtin_cpu_supports("avx2");
#endif
#if defined(__AVX__)
  ok = ok && __builtin_cpu_supports("avx");
#endif
#if defined(__SSE4_2__)
  ok = ok && __builtin_cpu_supports("sse4.2");
#endif
#if defined(__SSE4_1__)
  ok = ok && __builtin_cpu_supports("sse4.1");
#endif
#if defined(__SSSE3__)
  ok = ok && __builtin_cpu_supports("ssse3");
#endif
#if defined(__SSE3__)
  ok = ok && __builtin_cpu_supports("sse3");
#endif
#if defined(__FMA__)
  ok = ok && __builtin_cpu_supports("fma");
#endif
#if defined(__F16C__)
  unsigned a = 0, b = 0, c = 0, d = 0;  // CPUID leaf 1, ECX bit 29 (see cpu_has_avx2_fma_f16c)
  ok = ok && __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
#endif
  return ok;
#else
  return true;
#endif
}

KVC_END_ISA_NAMESPACE
}  // namespace detail
KVC_END_NAMESPACE

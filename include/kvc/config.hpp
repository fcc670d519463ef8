// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Compiler and platform switches shared by every kvc header.

#include <kvc/version.hpp>

/// Functions that must run on the host and, under nvcc, on the device. Outside nvcc this degrades to
/// `inline` so that CUDA is never needed to use the library (CuTe, Eigen and mdspan do the same).
#if defined(__CUDACC__)
#define KVC_HOST_DEVICE __host__ __device__ __forceinline__
#define KVC_DEVICE __device__ __forceinline__
#else
#define KVC_HOST_DEVICE inline
#define KVC_DEVICE inline
#endif

#if defined(_MSC_VER)
#define KVC_FORCEINLINE __forceinline
#define KVC_NOINLINE __declspec(noinline)
#else
#define KVC_FORCEINLINE inline __attribute__((always_inline))
#define KVC_NOINLINE __attribute__((noinline))
#endif

/// True only in a TU compiled by nvcc with the `kvc::cuda` target (which defines KVC_ENABLE_CUDA).
#if defined(__CUDACC__) && defined(KVC_ENABLE_CUDA)
#define KVC_HAS_CUDA 1
#else
#define KVC_HAS_CUDA 0
#endif

#if __cplusplus >= 202002L
#define KVC_CPP20 1
#else
#define KVC_CPP20 0
#endif

#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
#define KVC_HAS_EXCEPTIONS 1
#else
#define KVC_HAS_EXCEPTIONS 0
#endif

/// Vocabulary types live in a versioned inline namespace so that two kvc versions in one program
/// cannot silently merge (fmt and nlohmann do the same).
#define KVC_BEGIN_NAMESPACE \
  namespace kvc {           \
  inline namespace v0 {
#define KVC_END_NAMESPACE \
  }                       \
  }

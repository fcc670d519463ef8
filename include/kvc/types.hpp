// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Storage element types: half, bfloat16, fp8_e4m3, fp8_e5m2, and a uniform float conversion;
/// `seq_id`, the id a store gives a sequence.

#include <cstdint>
#include <type_traits>

#include <kvc/numeric/bfloat16.hpp>
#include <kvc/numeric/fp8.hpp>
#include <kvc/numeric/half.hpp>

KVC_BEGIN_NAMESPACE

/// A sequence's id in a store (kv_cache::add_sequence and the like); a plain integer so that
/// codecs and policies below store/ can name it.
using seq_id = std::int32_t;

/// Whether T is one of the element types kvc stores in full-precision pages.
template <class T>
inline constexpr bool is_storage_float_v = std::is_same<T, float>::value ||
                                           std::is_same<T, half>::value ||
                                           std::is_same<T, bfloat16>::value;

/// Converts any kvc storage type (or float) to float.
template <class T>
KVC_HOST_DEVICE float to_float(T x) noexcept {
  return static_cast<float>(x);
}

/// Converts float to any kvc storage type (or float).
template <class T>
KVC_HOST_DEVICE T from_float(float x) noexcept {
  return T(x);
}

/// Short name used in benchmark and test labels.
template <class T>
constexpr const char* type_name() noexcept {
  if constexpr (std::is_same<T, float>::value) return "fp32";
  else if constexpr (std::is_same<T, half>::value) return "fp16";
  else if constexpr (std::is_same<T, bfloat16>::value) return "bf16";
  else if constexpr (std::is_same<T, fp8_e4m3>::value) return "fp8e4m3";
  else if constexpr (std::is_same<T, fp8_e5m2>::value) return "fp8e5m2";
  else return "unknown";
}

KVC_END_NAMESPACE

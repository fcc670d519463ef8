// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Independent models of the small float formats, written from their definitions (value =
/// (-1)^s * 2^(e - bias) * (1 + m / 2^M), subnormals m * 2^(1 - bias - M)) in double, and
/// round-to-nearest-even encoders that search the code space. They share nothing with
/// include/kvc/numeric and are slow on purpose.

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
#include <algorithm>

namespace kvc_test {

/// A binary minifloat: 1 sign bit, E exponent bits, M mantissa bits.
/// \param ieee  true: the top exponent holds inf (m == 0) and NaN (m != 0);
///              false (OCP E4M3 "FN"): only the all-ones code is NaN and there is no inf.
struct float_format {
  int E, M;
  bool ieee;
  int bias() const { return (1 << (E - 1)) - 1; }
  std::uint32_t sign_bit() const { return 1u << (E + M); }
  std::uint32_t exp_max() const { return (1u << E) - 1u; }
  std::uint32_t man_max() const { return (1u << M) - 1u; }
  bool is_nan(std::uint32_t c) const {
    const std::uint32_t e = (c >> M) & exp_max(), m = c & man_max();
    return ieee ? (e == exp_max() && m != 0) : (e == exp_max() && m == man_max());
  }
  bool is_inf(std::uint32_t c) const {
    const std::uint32_t e = (c >> M) & exp_max(), m = c & man_max();
    return ieee && e == exp_max() && m == 0;
  }
  /// Largest finite positive code.
  std::uint32_t max_finite_code() const {
    return ieee ? ((exp_max() - 1u) << M) | man_max() : (exp_max() << M) | (man_max() - 1u);
  }
  /// The exact value of a code (NaN codes give a quiet NaN).
  double decode(std::uint32_t c) const {
    const bool neg = (c & sign_bit()) != 0;
    const std::uint32_t e = (c >> M) & exp_max(), m = c & man_max();
    double v;
    if (is_nan(c)) return std::numeric_limits<double>::quiet_NaN();
    if (is_inf(c)) v = std::numeric_limits<double>::infinity();
    else if (e == 0) v = std::ldexp(static_cast<double>(m), 1 - bias() - M);
    else v = std::ldexp(1.0 + static_cast<double>(m) / static_cast<double>(1u << M), static_cast<int>(e) - bias());
    return neg ? -v : v;
  }
  /// Value used for rounding decisions: inf counts as the next power of two above max_finite, so
  /// IEEE's overflow rule (>= max + half an ulp goes to inf, ties to even) falls out of nearest.
  double rounding_value(std::uint32_t c) const {
    if (is_inf(c)) return std::ldexp(1.0, static_cast<int>(exp_max()) - bias());
    return decode(c);
  }
  /// Round-to-nearest-even encoding of a finite or infinite x (not NaN).
  /// \param saturate  false: IEEE overflow to inf; true: the nearest *finite* code (OCP FP8 with
  ///                  saturation), inf included.
  std::uint32_t encode_nearest(double x, bool saturate) const {
    const std::uint32_t sign = std::signbit(x) ? sign_bit() : 0u;
    const double ax = std::fabs(x);
    // Candidate positive codes, ascending in value: 0..max_finite, then inf when rounding to it.
    const std::uint32_t top = saturate || !ieee ? max_finite_code() : max_finite_code() + 1u;
    if (std::isinf(ax)) return sign | top;
    // Linear search when the space is small (fp8), binary otherwise; both find the last code
    // whose value is <= ax.
    std::uint32_t lo = 0;
    if (top < 256u) {
      for (std::uint32_t c = 0; c <= top; ++c)
        if (rounding_value(c) <= ax) lo = c;
    } else {
      std::uint32_t a = 0, b = top;  // invariant: value(a) <= ax
      while (a < b) {
        const std::uint32_t mid = a + (b - a + 1) / 2;
        if (rounding_value(mid) <= ax) a = mid;
        else b = mid - 1;
      }
      lo = a;
    }
    if (rounding_value(lo) == ax || lo == top) return sign | lo;
    const double dl = ax - rounding_value(lo), dh = rounding_value(lo + 1) - ax;
    if (dl < dh) return sign | lo;
    if (dh < dl) return sign | (lo + 1);
    return sign | ((lo & 1u) == 0 ? lo : lo + 1);  // tie: even mantissa
  }
};

/// encode_nearest with the code values computed once (the same rule, for loops over many floats).
class nearest_encoder {
 public:
  nearest_encoder(const float_format& f, bool saturate) : f_(f) {
    top_ = saturate || !f.ieee ? f.max_finite_code() : f.max_finite_code() + 1u;
    for (std::uint32_t c = 0; c <= top_; ++c) values_.push_back(f.rounding_value(c));
  }
  std::uint32_t operator()(double x) const {
    const std::uint32_t sign = std::signbit(x) ? f_.sign_bit() : 0u;
    const double ax = std::fabs(x);
    if (std::isinf(ax)) return sign | top_;
    std::uint32_t lo = 0;
    if (top_ < 256u) {  // exhaustive over every code
      for (std::uint32_t c = 0; c <= top_; ++c)
        if (values_[c] <= ax) lo = c;
    } else {
      lo = static_cast<std::uint32_t>(std::upper_bound(values_.begin(), values_.end(), ax) - values_.begin()) - 1u;
    }
    if (values_[lo] == ax || lo == top_) return sign | lo;
    const double dl = ax - values_[lo], dh = values_[lo + 1] - ax;
    if (dl < dh) return sign | lo;
    if (dh < dl) return sign | (lo + 1);
    return sign | ((lo & 1u) == 0 ? lo : lo + 1);
  }

 private:
  float_format f_;
  std::uint32_t top_;
  std::vector<double> values_;
};

inline constexpr float_format binary16{5, 10, true};
inline constexpr float_format bfloat16{8, 7, true};
inline constexpr float_format fp8_e4m3{4, 3, false};
inline constexpr float_format fp8_e5m2{5, 2, true};

}  // namespace kvc_test

// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `kvc::budget`: how much of a stream to keep, as a compression ratio (the fraction of tokens to
/// evict, kvpress's `compression_ratio`) or as a token count. Resolving a budget against a stream
/// length gives the exact number of tokens kept.

#include <cmath>
#include <cstdint>
#include <string>

#include <kvc/error.hpp>

KVC_BEGIN_NAMESPACE

struct budget {
  enum class kind { ratio, tokens };
  kind type = kind::ratio;
  /// ratio: fraction of tokens evicted, in [0, 1) (0 keeps everything). tokens: tokens kept, >= 0.
  double value = 0.0;

  static budget ratio(double r) {
    budget b{kind::ratio, r};
    b.validate("ratio");
    return b;
  }
  static budget tokens(std::int64_t n) {
    budget b{kind::tokens, static_cast<double>(n)};
    b.validate("tokens");
    return b;
  }

  bool is_ratio() const noexcept { return type == kind::ratio; }

  /// Throws kvc::error naming `what` unless the budget is well formed.
  void validate(const char* what = "budget") const {
    if (type == kind::ratio) {
      if (!(value >= 0.0 && value < 1.0))
        detail::fail(detail::concat("kvc::budget: ", what, " = ", value,
                                    ", expected a compression ratio in [0, 1) (the fraction of tokens evicted)"));
    } else {
      if (!(value >= 0.0) || value != std::floor(value) || value > 2147483647.0)
        detail::fail(detail::concat("kvc::budget: ", what, " = ", value,
                                    ", expected a whole number of tokens >= 0"));
    }
  }

  /// Tokens kept out of `length`: floor(length * (1 - ratio)) (kvpress's int(n * (1 - r))), or the
  /// token count. A token count above the length is an error here; the compressor's phases treat
  /// "budget >= length" as nothing to do before calling this.
  std::int32_t keep_count(std::int32_t length) const {
    validate();
    KVC_EXPECTS(length >= 0, "length = ", length, ", expected >= 0");
    if (type == kind::ratio) {
      // The small epsilon makes 100 * (1 - 0.25) come out as 75, not 74.
      return static_cast<std::int32_t>(std::floor(static_cast<double>(length) * (1.0 - value) + 1e-9));
    }
    const auto n = static_cast<std::int32_t>(value);
    if (n > length)
      detail::fail(detail::concat("kvc::budget::keep_count: tokens = ", n, ", expected <= the stream length ",
                                  length, " (nothing to evict)"));
    return n;
  }

  /// Like keep_count but a token budget above the length keeps everything.
  std::int32_t keep_count_clamped(std::int32_t length) const {
    if (type == kind::tokens && value >= length) {
      validate();
      return length;
    }
    return keep_count(length);
  }

  std::string to_string() const {
    return type == kind::ratio ? detail::concat("ratio=", value) : detail::concat("tokens=", static_cast<std::int64_t>(value));
  }
};

KVC_END_NAMESPACE

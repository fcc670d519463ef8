// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// How kvc reports failure: `kvc::error` (host preconditions, thrown), `kvc::status` (kernels and
/// anything device-side, returned), `KVC_ASSERT` (internal invariants, debug only).

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>

#include <kvc/config.hpp>

KVC_BEGIN_NAMESPACE

/// Thrown when a host-side precondition fails. The message names the argument, the value received
/// and what was expected; derived from std::invalid_argument so callers can catch either.
class error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Thrown when a resource (the page pool) is exhausted. Still a kvc::error: the operation that
/// raised it left the cache exactly as it was.
class out_of_memory : public error {
 public:
  using error::error;
};

/// Result of operations that must not throw (kernels, device code, plan/apply steps).
enum class status : int {
  ok = 0,
  invalid_argument,
  unsupported,
  out_of_memory,
  cuda_error,
  arch_mismatch,
};

/// Human-readable name of a status.
constexpr const char* to_string(status s) noexcept {
  switch (s) {
    case status::ok: return "ok";
    case status::invalid_argument: return "invalid_argument";
    case status::unsupported: return "unsupported";
    case status::out_of_memory: return "out_of_memory";
    case status::cuda_error: return "cuda_error";
    case status::arch_mismatch: return "arch_mismatch";
  }
  return "unknown";
}

namespace detail {

template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

/// Throws E, or aborts with the message when exceptions are disabled (fmt's FMT_THROW idea).
template <class E = error>
[[noreturn]] inline void fail(const std::string& msg) {
#if KVC_HAS_EXCEPTIONS
  throw E(msg);
#else
  std::fprintf(stderr, "kvc: fatal: %s\n", msg.c_str());
  std::abort();
#endif
}

/// "{0, 1, 5}" for the keys of a map (the first `most`, then ", ... (N in all)"), or "none": what
/// an error about an unknown id says was expected.
template <class Map>
std::string key_list(const Map& m, std::size_t most = 8) {
  if (m.empty()) return "none";
  std::ostringstream os;
  os << '{';
  std::size_t i = 0;
  for (const auto& kv : m) {
    if (i == most) {
      os << ", ... (" << m.size() << " in all)";
      break;
    }
    os << (i++ ? ", " : "") << kv.first;
  }
  os << '}';
  return os.str();
}

}  // namespace detail

KVC_END_NAMESPACE

/// Host precondition: throws kvc::error with "<function>: <message>" where the message parts are
/// streamed together. Write the message so that it names the argument, the value and the
/// expectation: KVC_EXPECTS(n > 0, "n_tokens = ", n, ", expected > 0").
#define KVC_EXPECTS(cond, ...)                                                         \
  do {                                                                                 \
    if (!(cond)) ::kvc::detail::fail(::kvc::detail::concat("kvc::", __func__, ": ", __VA_ARGS__)); \
  } while (0)

/// Host precondition of a public call named explicitly: throws kvc::error with "<who>: <message>".
/// For checks whose __func__ is not the call the user made: member functions (__func__ lacks the
/// class), helpers such as a constructor's config validation, and checks a public overload makes
/// on behalf of the cache it is given. `who` is the qualified public name, e.g.
/// "kvc::cpu::decode_attention".
#define KVC_EXPECTS_IN(who, cond, ...)                                                 \
  do {                                                                                 \
    if (!(cond)) ::kvc::detail::fail(::kvc::detail::concat(who, ": ", __VA_ARGS__));   \
  } while (0)

/// Internal invariant. Compiled out under NDEBUG; override by defining KVC_ASSERT first.
#ifndef KVC_ASSERT
#ifdef NDEBUG
#define KVC_ASSERT(cond) ((void)0)
#else
#define KVC_ASSERT(cond)                                                                      \
  ((cond) ? (void)0                                                                           \
          : (std::fprintf(stderr, "kvc: assertion failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__), \
             std::abort()))
#endif
#endif

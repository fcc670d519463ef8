// SPDX-License-Identifier: Apache-2.0
/// \file
/// What the storage fuzzers share (fuzz_storage.cpp, fuzz_lowrank.cpp): failure reports that name
/// the spec and the operation, counts of what a run exercised, the input reader and the value
/// generator. A failed check aborts (what libFuzzer wants) or, for the Catch2 runs of the same
/// models (tests/runtime/test_storage_model.cpp, tests/lowrank/test_lowrank_model.cpp), throws.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <kvc/error.hpp>

namespace kvc_fuzz {

template <class... A>
std::string cat(const A&... a) {
  std::ostringstream os;
  os.precision(9);
  (os << ... << a);
  return os.str();
}

/// The fuzzer, the spec and the operation being run, printed with every failed check so a crash
/// file can be read without a debugger.
struct context {
  const char* tool = "fuzz";
  std::string spec;
  int op_index = -1;
  std::string op;
};
inline context& ctx() {
  static context c;
  return c;
}

/// The Catch2 runs of a model set this to get an exception they can report instead of an abort.
inline bool& throw_on_failure() {
  static bool t = false;
  return t;
}
struct check_failed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail_check(const std::string& msg) {
  if (throw_on_failure())
    throw check_failed(cat(msg, "\n  storage: ", ctx().spec, "\n  op #", ctx().op_index, ": ", ctx().op));
  std::fprintf(stderr, "%s: CHECK FAILED: %s\n  storage: %s\n  op #%d: %s\n", ctx().tool, msg.c_str(), ctx().spec.c_str(),
               ctx().op_index, ctx().op.c_str());
  std::abort();
}
#define SF_CHECK(cond, ...)                                                  \
  do {                                                                       \
    if (!(cond)) ::kvc_fuzz::fail_check(::kvc_fuzz::cat(__VA_ARGS__));       \
  } while (0)

/// With KVC_FUZZ_STATS set, counts of what the runs exercised are printed at exit: a fuzzer
/// whose operations all fail early, or never reach the paths it is for, checks little.
struct stats {
  std::map<std::string, long> n;
  ~stats() {
    if (!std::getenv("KVC_FUZZ_STATS")) return;
    for (const auto& kv : n) std::fprintf(stderr, "%s stat %-40s %ld\n", ctx().tool, kv.first.c_str(), kv.second);
  }
};
inline void count(const std::string& what) {
  static stats s;
  static const bool on = std::getenv("KVC_FUZZ_STATS") != nullptr;
  if (on) ++s.n[what];
}

/// The fuzzer's bytes as choices. An exhausted input reads zeros, so the rare choices are given
/// the largest values and a short input makes ordinary calls.
class input {
 public:
  input(const std::uint8_t* p, std::size_t n) : p_(p), n_(n) {}
  bool empty() const noexcept { return i_ >= n_; }
  std::uint32_t u8() noexcept { return i_ < n_ ? p_[i_++] : 0u; }
  std::uint32_t u16() noexcept { return u8() | (u8() << 8); }
  /// 0..m-1 (0 when m <= 1).
  int below(int m) noexcept { return m <= 1 ? 0 : static_cast<int>(u16() % static_cast<std::uint32_t>(m)); }
  template <class T, std::size_t N>
  const T& pick(const T (&a)[N]) noexcept {
    return a[below(static_cast<int>(N))];
  }

 private:
  const std::uint8_t* p_;
  std::size_t n_, i_ = 0;
};

/// splitmix64: K/V values come from a generator seeded by two input bytes, so an append of
/// n x H x D values costs the fuzzer a few bytes, not thousands.
struct rng {
  std::uint64_t s;
  std::uint64_t next() noexcept {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform() noexcept { return static_cast<float>(next() >> 40) * (2.0f / 16777216.0f) - 1.0f; }  // [-1, 1)
};

/// What a call did: returned, refused as invalid (kvc::error), or refused for lack of pages.
enum class outcome { ok, error, oom };
inline const char* name(outcome o) { return o == outcome::ok ? "success" : o == outcome::oom ? "kvc::out_of_memory" : "kvc::error"; }

/// Runs a call, classifies it (only kvc's errors are caught: anything else is a finding), counts
/// it under `label` and, with KVC_FUZZ_TRACE set, prints it. `what` gets the error's message.
template <class Call>
outcome classify(Call&& call, const std::string& label, std::string& what) {
  outcome got = outcome::ok;
  what.clear();
  try {
    call();
  } catch (const kvc::out_of_memory& e) {
    got = outcome::oom;
    what = e.what();
  } catch (const kvc::error& e) {
    got = outcome::error;
    what = e.what();
  }
  count(cat(label, " -> ", name(got)));
  static const bool trace = std::getenv("KVC_FUZZ_TRACE") != nullptr;
  if (trace)
    std::fprintf(stderr, "%s trace: %s #%d %s -> %s %s\n", ctx().tool, ctx().spec.c_str(), ctx().op_index, ctx().op.c_str(),
                 name(got), what.c_str());
  return got;
}

/// Softmax attention of one query over n rows in double: the fuzzers' reference for decode
/// attention, over the rows the cache says it holds (gather()). k, v: [n][d] floats.
struct attention_ref {
  std::vector<double> p;    ///< [n] probabilities
  std::vector<double> out;  ///< [d]
  double lse = 0;           ///< log Σ exp(scale q·k)
  double vmax = 0;          ///< max |v|: the scale of out's tolerance
};
inline attention_ref attend(const float* q, const float* k, const float* v, int n, int d, double scale) {
  attention_ref r;
  r.p.resize(static_cast<std::size_t>(n));
  r.out.assign(static_cast<std::size_t>(d), 0.0);
  double mx = -1e300;
  for (int t = 0; t < n; ++t) {
    double a = 0;
    for (int c = 0; c < d; ++c) a += static_cast<double>(q[c]) * k[static_cast<std::size_t>(t) * d + c];
    r.p[static_cast<std::size_t>(t)] = a * scale;
    mx = std::max(mx, a * scale);
  }
  double z = 0;
  for (double& x : r.p) z += (x = std::exp(x - mx));
  for (double& x : r.p) x /= z;
  for (int t = 0; t < n; ++t)
    for (int c = 0; c < d; ++c) {
      const float x = v[static_cast<std::size_t>(t) * d + c];
      r.out[static_cast<std::size_t>(c)] += r.p[static_cast<std::size_t>(t)] * x;
      r.vmax = std::max(r.vmax, static_cast<double>(std::fabs(x)));
    }
  r.lse = mx + std::log(z);
  return r;
}

}  // namespace kvc_fuzz

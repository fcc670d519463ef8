// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Parser for runtime policy specs, the strings research harnesses pass on the command line:
///
///     spec    := stage ('+' stage)*
///     stage   := name [ '(' [ arg (',' arg)* ] ')' ]
///     arg     := key '=' value | stage            (a bare stage is a wrapped policy: ada(snapkv(...)))
///     value   := number | identifier | stage
///
/// e.g. `snapkv(ratio=0.25,window=32)+kivi(bits=2,group=32)`. Parsing only checks the grammar;
/// the builder checks names and keys and says which ones exist. Every error names the position,
/// what was found and what was expected.
///
/// Specs come from command lines and config files, so the parser treats them as hostile: numbers
/// are read with std::from_chars (the C locale's '.', whatever setlocale() says; strtod would read
/// "0.5" as 0 under a comma-decimal locale and then report "a number followed by ','"), must be
/// finite, nesting is bounded (max_spec_depth) so a spec cannot exhaust the stack, and integers
/// are range-checked before any cast (spec_args::integer).

#include <algorithm>
#include <cctype>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <system_error>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <kvc/error.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {

struct spec_stage;

/// A value: a number (kept with its text), a bare word, or a nested stage.
struct spec_value {
  std::string text;                     ///< as written (numbers and words)
  bool is_number = false;
  double number = 0.0;
  std::shared_ptr<spec_stage> stage;    ///< set for a nested stage
};

struct spec_arg {
  std::string key;  ///< empty for a positional nested stage
  spec_value value;
};

struct spec_stage {
  std::string name;
  std::vector<spec_arg> args;
  std::string text;  ///< the stage as written, for error messages

  const spec_arg* find(const std::string& key) const noexcept {
    for (const auto& a : args)
      if (a.key == key) return &a;
    return nullptr;
  }
};

/// How deeply stages may nest (`vnorm(chunkkv(snapkv))` is 3). Far above any real policy, far
/// below what would overflow the parser's recursion.
inline constexpr int max_spec_depth = 32;

namespace detail {

/// Edit distance between short identifiers, for "did you mean" hints.
inline std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

/// The closest of `candidates` to `word` when it is a plausible typo (at most 2 edits, fewer than
/// the word's length), else empty.
inline std::string closest(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  std::size_t best_d = 3;
  for (const auto& c : candidates) {
    // The distance is at least the difference in length: skip the O(|word| |c|) table for words
    // that cannot be near (a hostile key of thousands of characters must not cost a matrix each).
    if ((word.size() > c.size() ? word.size() - c.size() : c.size() - word.size()) >= best_d) continue;
    const std::size_t d = edit_distance(word, c);
    if (d < best_d && d < word.size()) {
      best_d = d;
      best = c;
    }
  }
  return best;
}

class spec_parser {
 public:
  explicit spec_parser(const std::string& s) : s_(s) {}

  std::vector<spec_stage> parse() {
    std::vector<spec_stage> out;
    skip_ws();
    if (pos_ == s_.size()) fail("a policy name", "the end of the spec (the spec is empty)");
    out.push_back(stage());
    skip_ws();
    while (pos_ < s_.size()) {
      if (s_[pos_] != '+') fail("'+' between stages or the end of the spec", quote_here());
      ++pos_;
      out.push_back(stage());
      skip_ws();
    }
    return out;
  }

 private:
  spec_stage stage() {
    skip_ws();
    if (depth_ == max_spec_depth)
      fail(kvc::detail::concat("at most ", max_spec_depth, " nested policies"), quote_here());
    ++depth_;
    const std::size_t begin = pos_;
    spec_stage st;
    st.name = ident();
    if (st.name.empty()) fail("a policy name", quote_here());
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == '(') {
      ++pos_;
      skip_ws();
      if (pos_ < s_.size() && s_[pos_] == ')') {
        ++pos_;
      } else {
        for (;;) {
          st.args.push_back(arg());
          skip_ws();
          if (pos_ < s_.size() && s_[pos_] == ',') {
            ++pos_;
            continue;
          }
          if (pos_ < s_.size() && s_[pos_] == ')') {
            ++pos_;
            break;
          }
          fail("',' or ')' in the arguments of '" + st.name + "'", quote_here());
        }
      }
    }
    st.text = s_.substr(begin, pos_ - begin);
    for (std::size_t i = 0; i < st.args.size(); ++i)
      for (std::size_t j = 0; j < i; ++j)
        if (!st.args[i].key.empty() && st.args[i].key == st.args[j].key)
          kvc::detail::fail(kvc::detail::concat("kvc::runtime::parse_spec: '", st.name, "' sets '", st.args[i].key,
                                      "' twice; expected each key once"));
    --depth_;
    return st;
  }

  spec_arg arg() {
    skip_ws();
    const std::size_t save = pos_;
    std::string key = ident();
    skip_ws();
    spec_arg a;
    if (!key.empty() && pos_ < s_.size() && s_[pos_] == '=') {
      ++pos_;
      a.key = key;
      a.value = value();
      return a;
    }
    pos_ = save;  // a positional nested stage
    if (key.empty()) fail("'key=value' or a nested policy", quote_here());
    a.value.stage = std::make_shared<spec_stage>(stage());
    return a;
  }

  spec_value value() {
    skip_ws();
    spec_value v;
    if (pos_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '-' ||
                             s_[pos_] == '+' || s_[pos_] == '.')) {
      const std::size_t begin = pos_;
      // from_chars takes a leading '-' but not '+'; "+-1" stays an error.
      if (s_[pos_] == '+' && pos_ + 1 < s_.size() && s_[pos_ + 1] != '-') ++pos_;
      const char* b = s_.data() + pos_;
      const auto r = std::from_chars(b, s_.data() + s_.size(), v.number, std::chars_format::general);
      if (r.ec == std::errc::invalid_argument) {
        pos_ = begin;
        fail("a number", quote_here());
      }
      pos_ += static_cast<std::size_t>(r.ptr - b);
      v.text = s_.substr(begin, pos_ - begin);
      v.is_number = true;
      // "1e999" (out of range) and "-inf"/"-nan" (from_chars reads them after a sign) would reach
      // builders as values no range check of theirs is written for.
      if (r.ec == std::errc::result_out_of_range || !std::isfinite(v.number)) {
        pos_ = begin;
        fail("a finite number (magnitude below 1.8e308)", "'" + v.text + "'");
      }
      if (pos_ < s_.size() && (std::isalpha(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '_'))
        fail("a number followed by ',' or ')'", quote_here());
      return v;
    }
    const std::size_t save = pos_;
    std::string word = ident();
    if (word.empty()) fail("a value (number, word or nested policy)", quote_here());
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == '(') {
      pos_ = save;
      v.stage = std::make_shared<spec_stage>(stage());
      return v;
    }
    v.text = word;
    return v;
  }

  std::string ident() {
    const std::size_t b = pos_;
    while (pos_ < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '_')) ++pos_;
    if (b < pos_ && std::isdigit(static_cast<unsigned char>(s_[b]))) {
      pos_ = b;
      return {};
    }
    return s_.substr(b, pos_ - b);
  }

  void skip_ws() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }

  std::string quote_here() const {
    if (pos_ >= s_.size()) return "the end of the spec";
    std::string q(1, '\'');  // appended, not `"'" + ...`: GCC 12 warns falsely (-Wrestrict, bug 105329)
    return q.append(s_, pos_, 12).append(1, '\'');
  }

  [[noreturn]] void fail(const std::string& expected, const std::string& found) const {
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::parse_spec: in \"", s_, "\" at column ", pos_ + 1, ": expected ",
                                expected, ", found ", found));
  }

  const std::string& s_;
  std::size_t pos_ = 0;
  int depth_ = 0;
};

}  // namespace detail

/// Parses a spec into its stages; throws kvc::error on malformed input.
inline std::vector<spec_stage> parse_spec(const std::string& spec) { return detail::spec_parser(spec).parse(); }

/// Reads a stage's arguments by name and reports unknown or ill-typed ones. `call` is the public
/// function whose spec this is (kvc::runtime::make_cache, ...): messages start with it so that a
/// user who sees one knows which argument of which call to fix.
class spec_args {
 public:
  explicit spec_args(const spec_stage& st, std::string call = "kvc::runtime")
      : st_(st), used_(st.args.size(), false), call_(std::move(call)) {}

  double number(const std::string& key, double def) { return number_impl(key, &def); }
  double number(const std::string& key) { return number_impl(key, nullptr); }
  int integer(const std::string& key, int def) { return integer_impl(key, &def); }
  int integer(const std::string& key) { return integer_impl(key, nullptr); }
  bool has(const std::string& key) const noexcept { return st_.find(key) != nullptr; }
  std::string word(const std::string& key, const std::string& def) {
    const spec_arg* a = take(key);
    if (!a) return def;
    if (a->value.stage || a->value.is_number) bad(key, a->value, "a word");
    return a->value.text;
  }
  /// The nested stage passed positionally (ada(snapkv(...))) or as key=stage.
  const spec_stage* nested(const std::string& key = "") {
    for (std::size_t i = 0; i < st_.args.size(); ++i)
      if (st_.args[i].key == key && st_.args[i].value.stage) {
        used_[i] = true;
        return st_.args[i].value.stage.get();
      }
    return nullptr;
  }
  /// Throws if an argument was never read: it is a typo or belongs to another policy. The message
  /// lists `known` and, when the key is a near miss of one that was asked for, suggests it.
  void finish(const std::string& known) const {
    for (std::size_t i = 0; i < st_.args.size(); ++i) {
      if (used_[i]) continue;
      const spec_arg& a = st_.args[i];
      if (a.key.empty())
        kvc::detail::fail(kvc::detail::concat(call_, ": '", st_.name, "' takes no nested policy, found '",
                                              a.value.stage->text, "' in \"", st_.text, "\"; expected arguments: ",
                                              known));
      // Candidates: the keys the builder asked for and the words of `known` (which may name keys
      // read before this spec_args existed, e.g. make_evictor's budget).
      std::vector<std::string> cands = asked_;
      for (std::size_t b = 0; b < known.size();) {
        std::size_t e = b;
        while (e < known.size() && (std::isalnum(static_cast<unsigned char>(known[e])) || known[e] == '_')) ++e;
        if (e > b) cands.push_back(known.substr(b, e - b));
        b = e + 1;
      }
      const std::string hint = detail::closest(a.key, cands);
      kvc::detail::fail(kvc::detail::concat(call_, ": '", st_.name, "' has no argument '", a.key, "' (in \"",
                                            st_.text, "\")", hint.empty() ? "" : "; did you mean '",
                                            hint, hint.empty() ? "" : "'?", "; expected one of: ", known));
    }
  }
  const spec_stage& stage() const noexcept { return st_; }
  const std::string& call() const noexcept { return call_; }
  /// The keys read so far, comma-separated: what a builder accepts, for finish()'s message.
  std::string asked() const {
    std::string s;
    for (const auto& k : asked_) s.append(s.empty() ? "" : ", ").append(k);
    return s;
  }

 private:
  const spec_arg* take(const std::string& key) {
    if (std::find(asked_.begin(), asked_.end(), key) == asked_.end()) asked_.push_back(key);
    for (std::size_t i = 0; i < st_.args.size(); ++i)
      if (st_.args[i].key == key) {
        used_[i] = true;
        return &st_.args[i];
      }
    return nullptr;
  }
  const spec_arg* number_arg(const std::string& key, bool required) {
    const spec_arg* a = take(key);
    if (!a) {
      if (!required) return nullptr;
      kvc::detail::fail(kvc::detail::concat(call_, ": '", st_.name, "' needs '", key, "=<number>' (in \"", st_.text, "\")"));
    }
    if (!a->value.is_number) bad(key, a->value, "a number");
    // parse_spec refuses non-finite numbers; a hand-built spec_stage may still carry one.
    if (!std::isfinite(a->value.number)) bad(key, a->value, "a finite number");
    return a;
  }
  double number_impl(const std::string& key, const double* def) {
    const spec_arg* a = number_arg(key, def == nullptr);
    return a ? a->value.number : *def;
  }
  int integer_impl(const std::string& key, const int* def) {
    const spec_arg* a = number_arg(key, def == nullptr);
    if (!a) return *def;
    const double v = a->value.number;
    // Range before the cast: converting a double outside int's range (1e10, NaN) is undefined.
    if (!(v >= static_cast<double>(INT_MIN) && v <= static_cast<double>(INT_MAX)))
      bad(key, a->value, "an integer in [-2147483648, 2147483647]");
    if (v != std::trunc(v)) bad(key, a->value, "an integer");
    return static_cast<int>(v);
  }
  [[noreturn]] void bad(const std::string& key, const spec_value& v, const char* expected) const {
    kvc::detail::fail(kvc::detail::concat(call_, ": '", st_.name, "': ", key, " = ",
                                          v.stage ? v.stage->text : v.text.empty() ? kvc::detail::concat(v.number) : v.text,
                                          ", expected ", expected, " (in \"", st_.text, "\")"));
  }

  const spec_stage& st_;
  std::vector<bool> used_;
  std::vector<std::string> asked_;
  std::string call_;
};

}  // namespace runtime
KVC_END_NAMESPACE

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

#include <cctype>
#include <cstddef>
#include <cstdlib>
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

namespace detail {

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
      const char* b = s_.c_str() + pos_;
      char* e = nullptr;
      v.number = std::strtod(b, &e);
      if (e == b) fail("a number", quote_here());
      v.text = std::string(b, static_cast<std::size_t>(e - b));
      v.is_number = true;
      pos_ += static_cast<std::size_t>(e - b);
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
};

}  // namespace detail

/// Parses a spec into its stages; throws kvc::error on malformed input.
inline std::vector<spec_stage> parse_spec(const std::string& spec) { return detail::spec_parser(spec).parse(); }

/// Reads a stage's arguments by name and reports unknown or ill-typed ones.
class spec_args {
 public:
  explicit spec_args(const spec_stage& st) : st_(st), used_(st.args.size(), false) {}

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
  /// Throws if an argument was never read: it is a typo or belongs to another policy.
  void finish(const std::string& known) const {
    for (std::size_t i = 0; i < st_.args.size(); ++i)
      if (!used_[i])
        kvc::detail::fail(kvc::detail::concat("kvc::runtime: '", st_.name, "' has no argument '",
                                    st_.args[i].key.empty() ? st_.args[i].value.stage->name : st_.args[i].key,
                                    "'; expected one of: ", known));
  }
  const spec_stage& stage() const noexcept { return st_; }
  /// The keys read so far, comma-separated: what a builder accepts, for finish()'s message.
  std::string asked() const {
    std::string s;
    for (const auto& k : asked_) s.append(s.empty() ? "" : ", ").append(k);
    return s;
  }

 private:
  const spec_arg* take(const std::string& key) {
    bool seen = false;
    for (const auto& k : asked_) seen = seen || k == key;
    if (!seen) asked_.push_back(key);
    for (std::size_t i = 0; i < st_.args.size(); ++i)
      if (st_.args[i].key == key) {
        used_[i] = true;
        return &st_.args[i];
      }
    return nullptr;
  }
  double number_impl(const std::string& key, const double* def) {
    const spec_arg* a = take(key);
    if (!a) {
      if (def) return *def;
      kvc::detail::fail(kvc::detail::concat("kvc::runtime: '", st_.name, "' needs '", key, "=<number>' (in \"", st_.text, "\")"));
    }
    if (!a->value.is_number) bad(key, a->value, "a number");
    return a->value.number;
  }
  int integer_impl(const std::string& key, const int* def) {
    const double dd = def ? static_cast<double>(*def) : 0.0;
    const double v = number_impl(key, def ? &dd : nullptr);
    if (v != static_cast<double>(static_cast<int>(v)))
      kvc::detail::fail(kvc::detail::concat("kvc::runtime: '", st_.name, "': ", key, " = ", v, ", expected an integer"));
    return static_cast<int>(v);
  }
  [[noreturn]] void bad(const std::string& key, const spec_value& v, const char* expected) const {
    kvc::detail::fail(kvc::detail::concat("kvc::runtime: '", st_.name, "': ", key, " = ",
                                v.stage ? v.stage->text : v.text, ", expected ", expected));
  }

  const spec_stage& st_;
  std::vector<bool> used_;
  std::vector<std::string> asked_;
};

}  // namespace runtime
KVC_END_NAMESPACE

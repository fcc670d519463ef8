// SPDX-License-Identifier: Apache-2.0
// Hostile specs (issue 16): numbers no cast may see, unbounded nesting, the C locale's decimal
// point whatever setlocale() says, and messages a newcomer can act on.
#include <clocale>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/quant_storages.hpp>  // included, never registered: see "make_cache names the call ..."
#include <kvc/runtime/spec.hpp>

#include "kvc_catch.hpp"

using kvc::runtime::parse_spec;
using kvc::runtime::spec_args;

TEST_CASE("integers out of int's range are refused before any cast", "[runtime][hostile]") {
  // Before: static_cast<int>(1e10) (undefined; UBSan's float-cast-overflow reports it).
  for (const char* s : {"kivi(bits=1e10)", "kivi(bits=-3e9)", "kivi(bits=2147483648)"}) {
    INFO(s);
    const auto st = parse_spec(s)[0];
    spec_args a(st, "kvc::runtime::make_cache");
    REQUIRE_THROWS_WITH(a.integer("bits"), Catch::StartsWith("kvc::runtime::make_cache: 'kivi': bits = ") &&
                                               Catch::Contains("expected an integer in [-2147483648, 2147483647]") &&
                                               Catch::Contains(s));
  }
  const auto edge = parse_spec("x(a=2147483647,b=-2147483648)")[0];
  spec_args e(edge);
  CHECK(e.integer("a") == 2147483647);
  CHECK(e.integer("b") == -2147483647 - 1);
}

TEST_CASE("non-finite and out-of-range numbers are parse errors", "[runtime][hostile]") {
  struct bad {
    const char* spec;
    const char* fragment;
  };
  const bad cases[] = {
      {"snapkv(ratio=0.5,sinks=-inf)", "expected a finite number (magnitude below 1.8e308), found '-inf'"},
      {"x(a=-nan)", "found '-nan'"},
      {"x(a=+inf)", "found '+inf'"},
      {"x(a=1e999)", "found '1e999'"},
      {"x(a=-1e400)", "column 5"},
      {"x(a=+-1)", "expected a number"},
      {"x(a=+)", "expected a number"},
      {"x(a=.)", "expected a number"},
  };
  for (const auto& c : cases) {
    INFO(c.spec);
    REQUIRE_THROWS_WITH(parse_spec(c.spec), Catch::StartsWith("kvc::runtime::parse_spec: ") && Catch::Contains(c.fragment));
  }
  CHECK(parse_spec("x(a=+2)")[0].args[0].value.number == 2);
  CHECK(parse_spec("x(a=-.5)")[0].args[0].value.number == -0.5);
  CHECK(parse_spec("x(a=5.)")[0].args[0].value.number == 5);
  CHECK(parse_spec("x(a=1E3)")[0].args[0].value.number == 1000);
  CHECK(parse_spec("x(a=+2)")[0].args[0].value.text == "+2");
  // A bare word stays a word: inf and nan are not numbers unless signed (and then refused).
  CHECK_FALSE(parse_spec("x(a=nan)")[0].args[0].value.is_number);
}

TEST_CASE("a hand-built non-finite value is refused by the readers", "[runtime][hostile]") {
  kvc::runtime::spec_stage st;
  st.name = st.text = "p";
  kvc::runtime::spec_arg a;
  a.key = "bits";
  a.value.is_number = true;
  a.value.number = std::numeric_limits<double>::quiet_NaN();
  a.value.text = "nan";
  st.args.push_back(a);
  spec_args r(st);
  REQUIRE_THROWS_WITH(r.integer("bits"), Catch::Contains("bits = nan, expected a finite number"));
  spec_args r2(st);
  REQUIRE_THROWS_WITH(r2.number("bits", 1.0), Catch::Contains("expected a finite number"));
}

TEST_CASE("nesting is bounded, so a spec cannot exhaust the stack", "[runtime][hostile]") {
  const auto deep = [](int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += "a(";
    s += "b";
    for (int i = 0; i < n; ++i) s += ")";
    return s;
  };
  // max_spec_depth stages: n "a(" wrappers plus the innermost b.
  CHECK_NOTHROW(parse_spec(deep(kvc::runtime::max_spec_depth - 1)));
  REQUIRE_THROWS_WITH(parse_spec(deep(kvc::runtime::max_spec_depth)),
                      Catch::Contains("expected at most 32 nested policies"));
  // Before: one recursion per level; a million levels overflowed the stack (SIGSEGV).
  REQUIRE_THROWS_WITH(parse_spec(deep(1000000)), Catch::Contains("nested policies"));
  REQUIRE_THROWS_WITH(parse_spec(std::string(1000000, '(')), Catch::Contains("expected a policy name"));
}

TEST_CASE("numbers are read with '.' whatever the C locale", "[runtime][hostile]") {
  // strtod follows LC_NUMERIC: under de_DE "0.5" read as 0 and then ".5" was "a number followed
  // by ','"-style garbage. from_chars ignores the locale.
  const char* comma_locales[] = {"de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8", "nl_NL.UTF-8", "ru_RU.UTF-8"};
  const char* used = nullptr;
  for (const char* l : comma_locales)
    if (std::setlocale(LC_NUMERIC, l)) {
      used = l;
      break;
    }
  if (!used) {
    WARN("no comma-decimal locale is installed (e.g. `localedef -i de_DE -f UTF-8 de_DE.UTF-8`); "
         "the locale-independence check did not run");
    return;
  }
  INFO(used);
  // The locale really is in effect: strtod stops at the '.'.
  CHECK(std::strtod("0.5", nullptr) == 0.0);
  double v = -1;
  bool threw = false;
  try {
    v = parse_spec("snapkv(ratio=0.25,window=32)")[0].args[0].value.number;
  } catch (...) {
    threw = true;
  }
  std::setlocale(LC_NUMERIC, "C");
  CHECK_FALSE(threw);
  CHECK(v == 0.25);
}

TEST_CASE("a misspelt key is named with the valid keys and the closest one", "[runtime][hostile]") {
  const auto st = parse_spec("p(rato=0.5)")[0];
  spec_args a(st, "kvc::runtime::make_evictor");
  (void)a.number("ratio", 0.0);
  (void)a.integer("window", 8);
  REQUIRE_THROWS_WITH(a.finish(a.asked()),
                      Catch::StartsWith("kvc::runtime::make_evictor: 'p' has no argument 'rato' (in \"p(rato=0.5)\")") &&
                          Catch::Contains("did you mean 'ratio'?") && Catch::Contains("expected one of: ratio, window"));
  // Far from every key: no guess.
  const auto st2 = parse_spec("p(zzzzzz=1)")[0];
  spec_args b(st2);
  (void)b.number("ratio", 0.0);
  REQUIRE_THROWS_WITH(b.finish(b.asked()), !Catch::Contains("did you mean") && Catch::Contains("expected one of: ratio"));
  // A positional policy where none is taken.
  const auto st3 = parse_spec("p(tova)")[0];
  spec_args c(st3);
  REQUIRE_THROWS_WITH(c.finish("(none)"), Catch::Contains("'p' takes no nested policy, found 'tova'"));
}

TEST_CASE("make_cache names the call that registers a quantized storage", "[runtime][hostile]") {
  // This executable includes <kvc/runtime/quant_storages.hpp> and never calls
  // register_quant_storages(): including a storage header registers nothing.
  kvc::cache_config cfg;
  cfg.head_dim = 32;
  cfg.max_pages = 4;
  REQUIRE_FALSE(kvc::runtime::is_storage("kivi"));
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("kivi(bits=2)", cfg),
                      Catch::StartsWith("kvc::runtime::make_cache: storage 'kivi' (in \"kivi(bits=2)\") is not registered") &&
                          Catch::Contains("expected a call to kvc::runtime::register_quant_storages() from "
                                          "<kvc/runtime/quant_storages.hpp> before make_cache") &&
                          Catch::Contains("fp16"));
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("mikv", cfg),
                      Catch::Contains("kvc::runtime::register_mikv_storage() from <kvc/runtime/mikv_storage.hpp>"));
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("xkv", cfg), Catch::Contains("kvc::runtime::register_xkv_storage()"));
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("fp61", cfg),
                      Catch::Contains("unknown storage 'fp61'") && Catch::Contains("did you mean 'fp16'?"));
  REQUIRE_THROWS_WITH(kvc::runtime::make_cache("fp16(bits=2)", cfg),
                      Catch::StartsWith("kvc::runtime::make_cache: 'fp16' has no argument 'bits'"));
}

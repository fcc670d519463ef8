// SPDX-License-Identifier: Apache-2.0
#include <random>
#include <string>

#include <kvc/runtime/spec.hpp>

#include "kvc_catch.hpp"

using kvc::runtime::parse_spec;
using kvc::runtime::spec_args;

TEST_CASE("specs parse into stages, arguments and nested stages", "[runtime]") {
  const auto st = parse_spec(" snapkv( ratio = 0.25 , window=32 ) + kivi(bits=2,group=32,mode=asym) ");
  REQUIRE(st.size() == 2);
  CHECK(st[0].name == "snapkv");
  REQUIRE(st[0].args.size() == 2);
  CHECK(st[0].args[0].key == "ratio");
  CHECK(st[0].args[0].value.is_number);
  CHECK(st[0].args[0].value.number == 0.25);
  CHECK(st[1].find("mode")->value.text == "asym");
  CHECK_FALSE(st[1].find("mode")->value.is_number);

  const auto nested = parse_spec("ada(snapkv(ratio=0.2),floor=0.2)");
  REQUIRE(nested.size() == 1);
  REQUIRE(nested[0].args.size() == 2);
  REQUIRE(nested[0].args[0].value.stage);
  CHECK(nested[0].args[0].value.stage->name == "snapkv");
  CHECK(nested[0].args[0].value.stage->find("ratio")->value.number == 0.2);
  CHECK(parse_spec("full")[0].args.empty());
  CHECK(parse_spec("full()")[0].args.empty());
  CHECK(parse_spec("x(a=-1e-3)")[0].args[0].value.number == -1e-3);
}

TEST_CASE("malformed specs name the column, what was found and what was expected", "[runtime]") {
  struct bad {
    const char* spec;
    const char* fragment;
  };
  const bad cases[] = {
      {"", "the spec is empty"},
      {"snapkv(ratio=)", "column 14: expected a value"},
      {"a+", "expected a policy name, found the end of the spec"},
      {"a(b=1", "expected ',' or ')' in the arguments of 'a'"},
      {"a(b=1 c=2)", "expected ',' or ')'"},
      {"a(b=2x)", "expected a number followed by ',' or ')'"},
      {"a(b=1,b=2)", "'a' sets 'b' twice"},
      {"a b", "expected '+' between stages"},
      {"1a", "expected a policy name"},
      {"a(=1)", "expected 'key=value' or a nested policy"},
  };
  for (const auto& c : cases) {
    INFO(c.spec);
    REQUIRE_THROWS_WITH(parse_spec(c.spec), Catch::Contains(c.fragment));
    REQUIRE_THROWS_AS(parse_spec(c.spec), kvc::error);
  }
}

TEST_CASE("spec_args reads typed arguments and rejects the rest", "[runtime]") {
  const auto st = parse_spec("p(ratio=0.5,bits=4,mode=sym,inner=q(x=1))")[0];
  spec_args a(st);
  CHECK(a.number("ratio") == 0.5);
  CHECK(a.integer("bits") == 4);
  CHECK(a.integer("window", 32) == 32);
  CHECK(a.word("mode", "asym") == "sym");
  REQUIRE(a.nested("inner") != nullptr);
  CHECK_NOTHROW(a.finish("ratio, bits, mode, inner"));

  spec_args b(st);
  b.number("ratio");
  REQUIRE_THROWS_WITH(b.finish("ratio"), Catch::Contains("'p' has no argument 'bits'"));
  spec_args c(st);
  REQUIRE_THROWS_WITH(c.integer("ratio"), Catch::Contains("ratio = 0.5, expected an integer"));
  spec_args d(st);
  REQUIRE_THROWS_WITH(d.number("mode"), Catch::Contains("mode = sym, expected a number"));
  spec_args e(st);
  REQUIRE_THROWS_WITH(e.number("missing"), Catch::Contains("needs 'missing=<number>'"));
}

TEST_CASE("random well-formed specs parse back to what generated them", "[runtime]") {
  std::mt19937 rng(7);
  for (int it = 0; it < 200; ++it) {
    const int stages = 1 + static_cast<int>(rng() % 3);
    std::string s;
    std::vector<std::pair<std::string, std::vector<std::pair<std::string, int>>>> want;
    for (int i = 0; i < stages; ++i) {
      const std::string name = "p" + std::to_string(rng() % 100);
      std::vector<std::pair<std::string, int>> args;
      const int na = static_cast<int>(rng() % 4);
      for (int j = 0; j < na; ++j) args.emplace_back("k" + std::to_string(j), static_cast<int>(rng() % 1000) - 500);
      s += (i ? "+" : "") + name;
      if (na || rng() % 2) {
        s += "(";
        for (int j = 0; j < na; ++j) s += (j ? "," : "") + args[j].first + "=" + std::to_string(args[j].second);
        s += ")";
      }
      want.emplace_back(name, args);
    }
    INFO(s);
    const auto got = parse_spec(s);
    REQUIRE(got.size() == want.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
      CHECK(got[i].name == want[i].first);
      REQUIRE(got[i].args.size() == want[i].second.size());
      for (std::size_t j = 0; j < got[i].args.size(); ++j) {
        CHECK(got[i].args[j].key == want[i].second[j].first);
        CHECK(got[i].args[j].value.number == want[i].second[j].second);
      }
    }
  }
}

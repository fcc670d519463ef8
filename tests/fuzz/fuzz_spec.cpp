// SPDX-License-Identifier: Apache-2.0
/// \file fuzz_spec.cpp
/// Spec strings as hostile input: parse_spec, then every stage through make_evictor and the plain
/// storages of make_cache (the quantized ones are left out: their registry is minutes of compile
/// time, and their argument reading is the same spec_args). The only acceptable failure is
/// kvc::error with a message that names the call; anything else (another exception, a sanitizer
/// report, a non-finite parsed number, a nesting deeper than max_spec_depth) is a finding.
/// With KVC_FUZZ_SPEC_PARSE_ONLY=1 in the environment only the parser runs (parse, the checks on
/// its stages, parse back), for long runs of the parser alone: 4038 executions/s against 404 with
/// every stage built (ASan + UBSan, loaded 2-core VM, 2026-12), where building the evictors and
/// caches of a valid spec dominates.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <kvc/runtime/evictor_registry.hpp>
#include <kvc/runtime/make_cache.hpp>

namespace {

[[noreturn]] void finding(const char* what, const std::string& detail) {
  std::fprintf(stderr, "fuzz_spec: %s: %s\n", what, detail.c_str());
  std::abort();
}

void require_kvc_message(const kvc::error& e, const char* call) {
  const std::string m = e.what();
  if (m.rfind(call, 0) != 0) finding("error message does not start with the call", m);
}

/// Every number the parser produced is finite and every stage lies within the depth bound.
void check_stage(const kvc::runtime::spec_stage& st, int depth) {
  if (depth > kvc::runtime::max_spec_depth) finding("stage nested deeper than max_spec_depth", st.text);
  if (st.name.empty()) finding("stage without a name", st.text);
  for (const auto& a : st.args) {
    if (a.value.stage) check_stage(*a.value.stage, depth + 1);
    else if (a.value.is_number && !std::isfinite(a.value.number)) finding("non-finite number parsed", st.text);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  namespace rt = kvc::runtime;
  static const bool parse_only = [] {
    const char* e = std::getenv("KVC_FUZZ_SPEC_PARSE_ONLY");
    return e && *e && *e != '0';
  }();
  if (size > 4096) return 0;  // longer specs only make the quadratic duplicate-key check slow
  const std::string spec(reinterpret_cast<const char*>(data), size);
  std::vector<rt::spec_stage> stages;
  try {
    stages = rt::parse_spec(spec);
  } catch (const kvc::error& e) {
    require_kvc_message(e, "kvc::runtime::parse_spec: ");
    return 0;
  }
  for (const auto& st : stages) {
    check_stage(st, 1);
    // A stage's text parses back to the same stage.
    const auto again = rt::parse_spec(st.text);
    if (again.size() != 1 || again[0].name != st.name || again[0].args.size() != st.args.size())
      finding("stage text does not parse back to the stage", st.text);
    if (parse_only) continue;

    rt::evictor_context ctx;
    ctx.num_layers = 2;
    try {
      const rt::evictor ev = rt::make_evictor(st, ctx);
      (void)ev.compressor();
    } catch (const kvc::error& e) {
      require_kvc_message(e, "kvc::runtime::make_evictor: ");
    }
    kvc::cache_config cfg;
    cfg.num_layers = 1;
    cfg.num_kv_heads = 1;
    cfg.head_dim = 32;
    cfg.max_pages = 4;
    try {
      (void)rt::make_cache(st, cfg);
    } catch (const kvc::error& e) {
      require_kvc_message(e, "kvc::runtime::make_cache: ");
    }
    // The generic readers on every key: numbers and integers either convert or throw kvc::error.
    for (const auto& a : st.args) {
      if (a.key.empty()) continue;
      rt::spec_args r(st, "fuzz");
      try {
        (void)r.integer(a.key);
      } catch (const kvc::error&) {
      }
      try {
        (void)r.number(a.key, 0.0);
        (void)r.word(a.key, "");
      } catch (const kvc::error&) {
      }
    }
  }
  return 0;
}

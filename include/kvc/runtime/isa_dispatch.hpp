// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Run-time choice of instruction set for the caches of `make_cache` (issue 17 item 6). kvc is
/// header-only, so its kernels are compiled with the flags of the TU that includes them: a program
/// built without `-mavx2 -mfma -mf16c` (as most engines ship) runs the SSE2 kernels, about 17x
/// slower on fp16 decode, even on a CPU that has AVX2. Every ISA configuration of a program (the
/// TUs built with the same -m flags, docs/isa.md) that includes <kvc/runtime/make_cache.hpp>
/// registers its `make_cache` here, with the CPU features its kernels need; `make_cache_for_cpu`
/// builds the cache with the best registered configuration this CPU runs. A program gets a faster
/// configuration by compiling one more TU with its flags that includes make_cache.hpp and the
/// storage headers it uses and calls their register functions (the CMake function
/// `kvc_add_isa_variants` writes that TU); nothing
/// else changes, since every cache is reached through the ISA-neutral `any_cache`.
///
/// Everything here is ISA-neutral (one body in every TU).

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/isa.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/spec.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {

struct storage_options;

/// One ISA configuration of the program, as make_cache.hpp (and register_merged_storage())
/// registered it.
struct isa_variant {
  const char* name;  ///< its ISA namespace, e.g. "isa_avx2_fma_f16c"
  int rank;          ///< higher runs faster where it runs at all (KVC_ISA_RANK)
  bool (*runs_here)();  ///< whether this CPU has every feature the configuration was compiled for
  /// Whether its registry knows the storage, and its make_cache: null until make_cache.hpp
  /// registered the configuration.
  bool (*has_storage)(const std::string& name);
  std::unique_ptr<any_cache> (*make)(const spec_stage&, const cache_config&, const storage_options&);
  /// Its make_merged_cache (runtime/merged_storage.hpp), once register_merged_storage() ran in
  /// the configuration; null before.
  std::unique_ptr<any_cache> (*make_merged)(const std::string& storage, const cache_config&) = nullptr;
};

/// The registered configurations, one entry each (registration runs at static initialisation,
/// before main; lookups only after).
inline std::vector<isa_variant>& isa_variants() {
  static std::vector<isa_variant> v;
  return v;
}

/// Registers a configuration once (by name); a second registration of a name only fills what
/// the first left null (make_cache.hpp and register_merged_storage() each register, in an order
/// static initialisation does not fix). Returns true for use as an initialiser.
inline bool add_isa_variant(const isa_variant& v) {
  for (isa_variant& e : isa_variants())
    if (std::strcmp(e.name, v.name) == 0) {
      if (!e.has_storage) e.has_storage = v.has_storage, e.make = v.make;
      if (!e.make_merged) e.make_merged = v.make_merged;
      return true;
    }
  isa_variants().push_back(v);
  return true;
}

namespace detail {
/// The configuration `who` builds with: the one named `isa` when given (else the environment
/// variable KVC_ISA when set and not empty), which must be registered, run on this CPU and
/// have `what` (`has`); otherwise the highest-ranked one that runs here and has it. `expect_named`
/// and `expect_any` say what registers `what`, for the errors.
template <class Has>
const isa_variant& choose_isa_variant(const char* who, const char* isa, Has has, const std::string& what,
                                      const char* expect_named, const char* expect_any) {
  if (!isa || !*isa) isa = std::getenv("KVC_ISA");
  std::string names;
  for (const isa_variant& e : isa_variants()) names += std::string(names.empty() ? "" : ", ") + e.name;
  if (isa && *isa) {
    for (const isa_variant& e : isa_variants()) {
      if (std::strcmp(e.name, isa) != 0) continue;
      KVC_EXPECTS_IN(who, e.runs_here(), "isa = \"", isa, "\" is not supported by this CPU, expected one of the ",
                     "configurations it runs (registered: ", names, ")");
      KVC_EXPECTS_IN(who, has(e), what, " is not registered in the ", isa, " configuration, expected ", expect_named);
      return e;
    }
    kvc::detail::fail(kvc::detail::concat(who, ": isa = \"", isa, "\" (argument or KVC_ISA) is not registered, expected "
                                          "one of: ", names));
  }
  const isa_variant* best = nullptr;
  for (const isa_variant& e : isa_variants())
    if ((!best || e.rank > best->rank) && has(e) && e.runs_here()) best = &e;
  KVC_EXPECTS_IN(who, best != nullptr, what, " is not registered in any configuration this CPU runs (registered: ", names,
                 "), expected ", expect_any);
  return *best;
}

/// Whether some configuration registered `name` as a storage.
inline bool any_variant_has(const std::string& name) {
  for (const isa_variant& e : isa_variants())
    if (e.has_storage && e.has_storage(name)) return true;
  return false;
}
/// The storages a stage builds: its own, and every nested stage that some configuration knows as
/// a storage (the parts of `layers(fp16, l0_3=pca(...))`), which the configuration that builds
/// the stage must know too.
inline void stage_storages(const spec_stage& st, bool top, std::vector<std::string>& out) {
  if (top || any_variant_has(st.name)) out.push_back(st.name);
  for (const spec_arg& a : st.args) {
    if (a.value.stage) stage_storages(*a.value.stage, false, out);
    else if (!a.value.is_number && any_variant_has(a.value.text)) out.push_back(a.value.text);  // l1=fp32
  }
}
}  // namespace detail

/// The configuration make_cache_for_cpu builds a stage with: the one named `isa` when given
/// (else the environment variable KVC_ISA when set and not empty), which must be registered, run
/// on this CPU and know the stage's storages (its own and its parts'); otherwise the
/// highest-ranked one that runs here and knows them.
inline const isa_variant& choose_isa_variant(const spec_stage& st, const char* isa = nullptr) {
  constexpr const char* who = "kvc::runtime::make_cache_for_cpu";
  std::vector<std::string> need;
  detail::stage_storages(st, true, need);
  // What configuration e lacks of the stage's storages, quoted ("" when nothing).
  auto missing = [&](const isa_variant& e) {
    std::string m;
    for (const std::string& n : need)
      if (!e.has_storage || !e.has_storage(n)) m += (m.empty() ? "'" : ", '") + n + "'";
    return m;
  };
  if (need.size() > 1) {  // a stage with parts: name the parts a configuration lacks
    const char* forced = isa && *isa ? isa : std::getenv("KVC_ISA");
    std::string lacks;
    bool some = false;
    for (const isa_variant& e : isa_variants()) {
      if (forced && *forced && std::strcmp(e.name, forced) == 0 && e.runs_here() && !missing(e).empty())
        kvc::detail::fail(kvc::detail::concat(who, ": '", st.name, "' needs storage(s) ", missing(e), " (in \"", st.text,
                                              "\"), not registered in the ", forced, " configuration, expected "
                                              "its TU to include and register them"));
      if (!e.runs_here()) continue;
      some = some || missing(e).empty();
      lacks += kvc::detail::concat(lacks.empty() ? "" : "; ", e.name, " lacks ", missing(e));
    }
    if (!(forced && *forced) && !some)
      kvc::detail::fail(kvc::detail::concat(who, ": no configuration this CPU runs registers every storage '", st.name,
                                            "' needs (in \"", st.text, "\"): ", lacks, "; expected one configuration "
                                            "with all of them (register the missing ones in its TU)"));
  }
  return detail::choose_isa_variant(
      who, isa, [&](const isa_variant& e) { return missing(e).empty(); }, "storage '" + st.name + "'",
      "its TU to include the storage's header",
      "its register call (e.g. kvc::runtime::register_quant_storages()) in a TU of this program");
}

/// choose_isa_variant for a storage name alone.
inline const isa_variant& choose_isa_variant(const std::string& storage, const char* isa = nullptr) {
  spec_stage st;
  st.name = storage;
  return choose_isa_variant(st, isa);
}

}  // namespace runtime
KVC_END_NAMESPACE

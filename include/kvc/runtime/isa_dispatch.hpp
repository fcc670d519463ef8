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

/// One ISA configuration of the program, as its make_cache.hpp registered it.
struct isa_variant {
  const char* name;  ///< its ISA namespace, e.g. "isa_avx2_fma_f16c"
  int rank;          ///< higher runs faster where it runs at all (KVC_ISA_RANK)
  bool (*runs_here)();  ///< whether this CPU has every feature the configuration was compiled for
  bool (*has_storage)(const std::string& name);  ///< whether its registry knows the storage
  std::unique_ptr<any_cache> (*make)(const spec_stage&, const cache_config&, const storage_options&);
};

/// The registered configurations, one entry each (registration runs at static initialisation,
/// before main; lookups only after).
inline std::vector<isa_variant>& isa_variants() {
  static std::vector<isa_variant> v;
  return v;
}

/// Registers a configuration once (by name); returns true for use as an initialiser.
inline bool add_isa_variant(const isa_variant& v) {
  for (const isa_variant& e : isa_variants())
    if (std::strcmp(e.name, v.name) == 0) return true;
  isa_variants().push_back(v);
  return true;
}

/// The configuration make_cache_for_cpu builds a `storage` with: the one named `isa` when given
/// (else the environment variable KVC_ISA when set and not empty), which must be registered, run
/// on this CPU and know the storage; otherwise the highest-ranked one that runs here and knows
/// the storage.
inline const isa_variant& choose_isa_variant(const std::string& storage, const char* isa = nullptr) {
  constexpr const char* who = "kvc::runtime::make_cache_for_cpu";
  if (!isa || !*isa) isa = std::getenv("KVC_ISA");
  std::string names;
  for (const isa_variant& e : isa_variants()) names += std::string(names.empty() ? "" : ", ") + e.name;
  if (isa && *isa) {
    for (const isa_variant& e : isa_variants()) {
      if (std::strcmp(e.name, isa) != 0) continue;
      KVC_EXPECTS_IN(who, e.runs_here(), "isa = \"", isa, "\" is not supported by this CPU, expected one of the ",
                     "configurations it runs (registered: ", names, ")");
      KVC_EXPECTS_IN(who, e.has_storage(storage), "storage '", storage, "' is not registered in the ", isa,
                     " configuration, expected its TU to include the storage's header");
      return e;
    }
    kvc::detail::fail(kvc::detail::concat(who, ": isa = \"", isa, "\" (argument or KVC_ISA) is not registered, expected "
                                          "one of: ", names));
  }
  const isa_variant* best = nullptr;
  for (const isa_variant& e : isa_variants())
    if ((!best || e.rank > best->rank) && e.has_storage(storage) && e.runs_here()) best = &e;
  KVC_EXPECTS_IN(who, best != nullptr, "storage '", storage, "' is not registered in any configuration this CPU runs ",
                 "(registered: ", names, "), expected its register call (e.g. kvc::runtime::register_quant_storages()) in a TU "
                 "of this program");
  return *best;
}

}  // namespace runtime
KVC_END_NAMESPACE

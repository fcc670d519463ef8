// SPDX-License-Identifier: Apache-2.0
/// \file
/// Registers kvc's low-rank storages (pca, palu, think from runtime/lowrank_storages.hpp; xkv from
/// runtime/xkv_storage.hpp) in the module's baseline ISA configuration, for session_cache.hpp's
/// make_cache_for_cpu. A TU of its own so it compiles beside module.cpp (the templates are large).
/// Baseline only, not in the AVX2/AVX-512 variants: see python/CMakeLists.txt. module.cpp calls
/// register_lowrank_storages() when the module is imported.

#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/lowrank_storages.hpp>
#include <kvc/runtime/xkv_storage.hpp>

namespace kvc_python {
void register_lowrank_storages() {
  kvc::runtime::register_lowrank_storages();
  kvc::runtime::register_xkv_storage();
}
}  // namespace kvc_python

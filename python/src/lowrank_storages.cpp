// SPDX-License-Identifier: Apache-2.0
/// \file
/// Registers kvc's low-rank storages (pca, palu, think from runtime/lowrank_storages.hpp; xkv from
/// runtime/xkv_storage.hpp) in the module's baseline ISA configuration, for session_cache.hpp's
/// make_cache_for_cpu. A TU of its own so it compiles beside module.cpp (the templates are large).
/// Baseline only, not in the AVX2/AVX-512 variants: see python/CMakeLists.txt. Nothing here is
/// called directly: the registration is the initialiser of an inline variable of each header.

#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/lowrank_storages.hpp>
#include <kvc/runtime/xkv_storage.hpp>

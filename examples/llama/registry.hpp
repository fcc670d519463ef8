// SPDX-License-Identifier: Apache-2.0
/// \file registry.hpp
/// kvc's run-time registries in the engine, spread over five TUs so each compiles in under a
/// minute and they build side by side (docs/design.md, "Compile time"): kvc's storage headers
/// register nothing by being included; the register calls do, and they are where the engine
/// pays for the caches and kernels it offers. The evictor registry (every scorer of kvc/evict/)
/// is built in evictors.cpp only; stores.cpp reaches it through the functions below.
/// stores.cpp calls register_storages() before it builds any cache.
#pragma once

#include <string>
#include <vector>

#include <kvc/runtime/evictor_registry.hpp>

namespace llama {

void register_int_storages();      ///< register_int.cpp: int8, int4, int2, gear, mikv
void register_kivi_storages();     ///< register_kivi.cpp: kivi, rotated, outliers, fp8
void register_lowrank_storages();  ///< register_lowrank.cpp: pca, palu, think, xkv
void register_other_storages();    ///< register_other.cpp: layers, quest, minicache

/// All four, once per program (thread-safe); before the first make_cache.
void register_storages();

// evictors.cpp: kvc::runtime's evictor registry (is_evictor, known_evictors, make_evictor).
bool is_evictor(const std::string& name);
std::string known_evictors();
kvc::runtime::evictor make_evictor(const kvc::runtime::spec_stage& stage, const kvc::runtime::evictor_context& ctx);

}  // namespace llama

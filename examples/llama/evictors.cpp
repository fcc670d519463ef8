// SPDX-License-Identifier: Apache-2.0
/// \file evictors.cpp
/// kvc's evictor registry: every scorer of kvc/evict/ built from a spec (registry.hpp).
#include "registry.hpp"
#include "stores.hpp"

bool llama::is_evictor(const std::string& name) { return kvc::runtime::is_evictor(name); }

std::string llama::known_evictors() { return kvc::runtime::known_evictors(); }

kvc::runtime::evictor llama::make_evictor(const kvc::runtime::spec_stage& stage, const kvc::runtime::evictor_context& ctx) {
    return kvc::runtime::make_evictor(stage, ctx);
}

std::vector<std::string> llama::evictor_names() {
    std::vector<std::string> v;
    for (const auto& kv : kvc::runtime::evictor_registry()) v.push_back(kv.first);
    return v;
}

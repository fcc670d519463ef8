// SPDX-License-Identifier: Apache-2.0
/// \file register_other.cpp
/// Storages by layer (`layers`), Quest's page reads and MiniCache's cross-layer merge (registry.hpp).
#include <mutex>

#include <kvc/runtime/layered_storage.hpp>
#include <kvc/runtime/minicache_storage.hpp>
#include <kvc/runtime/quest_storage.hpp>

#include "registry.hpp"

void llama::register_other_storages() {
    kvc::runtime::register_layered_storage();
    kvc::runtime::register_quest_storage();
    kvc::runtime::register_minicache_storage();
}

void llama::register_storages() {
    static std::once_flag once;
    std::call_once(once, [] {
        register_int_storages();
        register_kivi_storages();
        register_lowrank_storages();
        register_other_storages();
    });
}

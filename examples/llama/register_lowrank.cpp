// SPDX-License-Identifier: Apache-2.0
/// \file register_lowrank.cpp
/// The low-rank storages: pca, palu, think (projected caches, Eigen's eigensolvers) and xkv
/// (cross-layer SVD) (registry.hpp).
#include <kvc/runtime/lowrank_storages.hpp>
#include <kvc/runtime/xkv_storage.hpp>

#include "registry.hpp"

void llama::register_lowrank_storages() {
    kvc::runtime::register_lowrank_storages();
    kvc::runtime::register_xkv_storage();
}

// SPDX-License-Identifier: Apache-2.0
/// \file register_kivi.cpp
/// kivi, rotated, outliers and fp8: their quant_cache instantiations with their kernels
/// (registry.hpp).
#include <kvc/runtime/quant_storages.hpp>

#include "registry.hpp"

void llama::register_kivi_storages() {
    kvc::runtime::register_kivi_storage();
    kvc::runtime::register_rotated_storage();
    kvc::runtime::register_outliers_storage();
    kvc::runtime::register_fp8_storage();
}

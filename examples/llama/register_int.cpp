// SPDX-License-Identifier: Apache-2.0
/// \file register_int.cpp
/// int8, int4, int2, gear (int codes plus a low-rank and a sparse residual), mikv (built from
/// the int codecs) and nuq (KIVI's layout with fitted key levels): their quant_cache and mixed_precision_cache instantiations with their kernels
/// (registry.hpp). fp8 is in register_kivi.cpp, which balances the two TUs at ~53 CPU-s each.
#include <kvc/runtime/mikv_storage.hpp>
#include <kvc/runtime/quant_storages.hpp>

#include "registry.hpp"

void llama::register_int_storages() {
    kvc::runtime::register_int8_storage();
    kvc::runtime::register_int4_storage();
    kvc::runtime::register_int2_storage();
    kvc::runtime::register_gear_storage();
    kvc::runtime::register_mikv_storage();
    kvc::runtime::register_nuq_storage();
}

// SPDX-License-Identifier: Apache-2.0
/// \file
/// The run-time storage registry's quantized storages and mikv, compiled once per test
/// configuration (tests/CMakeLists.txt: kvc_test_storages). The calls below register them in the
/// registry of this TU's ISA configuration (runtime/make_cache.hpp) before main; a test linked
/// with this object (an OBJECT library, so the linker keeps it) builds them by spec with
/// make_cache and includes only make_cache.hpp. Why: the registration instantiates every
/// quantized cache with its kernels, about 120 s of GCC -O3 (st_tu.cpp, 2026-12-03), which each
/// of six test TUs used to pay. This is also the pattern for an engine: register in one TU (or a
/// few: examples/llama/registry.hpp), call make_cache from the others.
#include <kvc/runtime/mikv_storage.hpp>
#include <kvc/runtime/quant_storages.hpp>

[[maybe_unused]] static const bool storages_registered =
    (kvc::runtime::register_quant_storages(), kvc::runtime::register_mikv_storage(), true);

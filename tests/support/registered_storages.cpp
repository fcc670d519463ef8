// SPDX-License-Identifier: Apache-2.0
/// \file
/// The run-time storage registry's quantized storages and mikv, compiled once per test
/// configuration (tests/CMakeLists.txt: kvc_test_storages). Including these two headers registers
/// them in the registry of this TU's ISA configuration (runtime/make_cache.hpp); a test linked
/// with this object builds them by spec with make_cache and includes only make_cache.hpp. Why:
/// the registration instantiates every quantized cache with its kernels, about 120 s of GCC -O3
/// (st_tu.cpp, these two includes alone, 2026-12-03), which each of six test TUs used to pay.
/// This is also the pattern for an engine: register in one TU, call make_cache from the others.
#include <kvc/runtime/mikv_storage.hpp>
#include <kvc/runtime/quant_storages.hpp>

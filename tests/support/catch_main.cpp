// SPDX-License-Identifier: Apache-2.0
// Catch2's main, compiled once for every test executable.
#if !defined(KVC_CATCH3)
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif

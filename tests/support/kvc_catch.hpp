// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Catch2 shim: Debian ships v2 (one header), newer systems v3 (split headers). Tests include
/// this and use the v2 names, which v3 keeps.
#if defined(KVC_CATCH3)
#include <catch2/catch_all.hpp>
#else
#include <catch2/catch.hpp>
#endif

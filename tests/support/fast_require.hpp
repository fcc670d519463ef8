// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// Exhaustive tests check millions of values; Catch's REQUIRE and INFO cost microseconds each.
/// KVC_REQUIRE(cond, context) costs a branch when cond holds and reports like REQUIRE (with the
/// streamed context) when it does not.

#include "kvc_catch.hpp"

#define KVC_REQUIRE(cond, context) \
  do {                             \
    if (!(cond)) {                 \
      INFO(context);               \
      REQUIRE(cond);               \
    }                              \
  } while (0)

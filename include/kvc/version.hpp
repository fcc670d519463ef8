// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// kvc's version. CMake parses these three lines, so the header and the package cannot drift.

#define KVC_VERSION_MAJOR 0
#define KVC_VERSION_MINOR 1
#define KVC_VERSION_PATCH 0

#define KVC_VERSION (KVC_VERSION_MAJOR * 10000 + KVC_VERSION_MINOR * 100 + KVC_VERSION_PATCH)

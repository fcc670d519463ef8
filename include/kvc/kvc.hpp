// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// kvc's host umbrella: everything except CUDA. Library headers include exactly what they use;
/// this one is for users.

#include <kvc/attention.hpp>
#include <kvc/attention/options.hpp>
#include <kvc/attention/reference.hpp>
#include <kvc/attention/rope.hpp>
#include <kvc/config.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/prefill_attention.hpp>
#include <kvc/cpu/simd.hpp>
#include <kvc/error.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/page_pool.hpp>
#include <kvc/types.hpp>
#include <kvc/version.hpp>
#include <kvc/view/accessor.hpp>
#include <kvc/view/engine.hpp>
#include <kvc/view/extents.hpp>
#include <kvc/view/heads.hpp>
#include <kvc/view/kv_view.hpp>
#include <kvc/view/layout_dense.hpp>
#include <kvc/view/layout_paged.hpp>
#include <kvc/view/layout_sink_window.hpp>

// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Every eviction policy, budget allocator and the compressor driver.

#include <kvc/budget/allocator.hpp>
#include <kvc/budget/budget.hpp>
#include <kvc/evict/a2sf.hpp>
#include <kvc/evict/any_scorer.hpp>
#include <kvc/evict/cake.hpp>
#include <kvc/evict/chunkkv.hpp>
#include <kvc/evict/compressor.hpp>
#include <kvc/evict/core.hpp>
#include <kvc/evict/curdkv.hpp>
#include <kvc/evict/expected_attention.hpp>
#include <kvc/evict/finch.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/evict/keydiff.hpp>
#include <kvc/evict/knorm.hpp>
#include <kvc/evict/lagkv.hpp>
#include <kvc/evict/leverage.hpp>
#include <kvc/evict/noncausal_attention.hpp>
#include <kvc/evict/observer.hpp>
#include <kvc/evict/pyramidkv.hpp>
#include <kvc/evict/qfilters.hpp>
#include <kvc/evict/random.hpp>
#include <kvc/evict/rkv.hpp>
#include <kvc/evict/scissorhands.hpp>
#include <kvc/evict/select.hpp>
#include <kvc/evict/simlayerkv.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/evict/streaming_llm.hpp>
#include <kvc/evict/tova.hpp>
#include <kvc/evict/vnorm.hpp>
#include <kvc/evict/window_attention.hpp>

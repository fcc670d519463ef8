// SPDX-License-Identifier: Apache-2.0
// kv_view is rank 3 (token, head, dim).
#include <kvc/view/kv_view.hpp>
#include <kvc/view/layout_dense.hpp>
#ifdef KVC_SHOULD_FAIL
using E = kvc::extents<std::int32_t, kvc::dynamic_extent, 64>;
#else
using E = kvc::kv_extents<1, 64>;
#endif
int cf_view_rank2() { return static_cast<int>(kvc::kv_view<float, E, kvc::layout_nhd>::rank()); }

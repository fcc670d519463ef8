// SPDX-License-Identifier: Apache-2.0
// A static page size must be a power of two.
#include <kvc/view/layout_paged.hpp>
#ifdef KVC_SHOULD_FAIL
constexpr std::size_t page = 24;
#else
constexpr std::size_t page = 32;
#endif
using M = kvc::layout_paged<kvc::page_order::nhd, page>::mapping<kvc::kv_dextents<>>;
int cf_page_size_not_pow2() { return M().page_size(); }

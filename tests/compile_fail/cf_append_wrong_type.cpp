// SPDX-License-Identifier: Apache-2.0
// append takes float or the cache's own element type, nothing else.
#include <kvc/store/kv_cache.hpp>
#ifdef KVC_SHOULD_FAIL
using In = double;
#else
using In = kvc::half;
#endif
void cf_append_wrong_type(kvc::kv_cache<kvc::half>& c, const In* k, const In* v) { c.append(0, 0, k, v, 1); }

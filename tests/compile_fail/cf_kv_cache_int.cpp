// SPDX-License-Identifier: Apache-2.0
// kv_cache stores float, half or bfloat16 only.
#include <kvc/store/kv_cache.hpp>
#ifdef KVC_SHOULD_FAIL
using T = int;
#else
using T = float;
#endif
int cf_kv_cache_int() { return kvc::kv_cache<T>(kvc::cache_config{}).config().page_size; }

// SPDX-License-Identifier: Apache-2.0
// The CPU kernel refuses views whose accessor says device memory.
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/view/heads.hpp>
#include <kvc/view/kv_view.hpp>
#include <kvc/view/layout_dense.hpp>
#ifdef KVC_SHOULD_FAIL
using A = kvc::device_accessor<kvc::default_accessor<const float>>;
#else
using A = kvc::default_accessor<const float>;
#endif
using V = kvc::kv_view<const float, kvc::kv_dextents<>, kvc::layout_nhd, A>;
void cf_device_view_on_cpu(const V& k, const V& v, const float* q, float* out) {
  kvc::cpu::decode_attention(kvc::make_same_heads(k, v), q, 1, out);
}

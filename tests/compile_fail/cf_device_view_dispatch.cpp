// SPDX-License-Identifier: Apache-2.0
// kvc::decode_attention picks the backend from the views' memory space: a device view in a TU
// without <kvc/cuda.cuh> (here: a plain C++ TU) must not compile, and the error must say to
// include the CUDA header and link kvc::cuda.
#include <kvc/attention.hpp>
#include <kvc/view/heads.hpp>
#include <kvc/view/kv_view.hpp>
#include <kvc/view/layout_paged.hpp>
#ifdef KVC_SHOULD_FAIL
using A = kvc::device_accessor<kvc::default_accessor<const float>>;
#else
using A = kvc::default_accessor<const float>;
#endif
using V = kvc::kv_view<const float, kvc::kv_dextents<>, kvc::layout_paged<kvc::page_order::nhd>, A>;
void cf_device_view_dispatch(const V& k, const V& v, const float* q, float* out) {
  kvc::decode_attention(kvc::make_same_heads(k, v), q, 1, out);
}
